"""Environment probes and quiet output (`dbtools.core.env`)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from dbtools.core import env

ROOT = Path(__file__).resolve().parents[1]

NOISY = """
import logging, warnings
from dbtools.core.env import quiet_third_party
quiet_third_party({verbose})
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from transformers import CLIPImageProcessor  # the torchvision notice, without torchvision
warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("a real problem", UserWarning)
logging.getLogger("transformers.utils.import_utils").warning("another transformers warning")
"""


def run(verbose: bool) -> str:
    proc = subprocess.run([sys.executable, "-W", "default", "-c", NOISY.format(verbose=verbose)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "DBTOOLS_VERBOSE": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_known_harmless_third_party_lines_are_hidden_and_real_ones_stay():
    quiet = run(verbose=False)
    assert "requires torchvision" not in quiet and "gradient_checkpointing_enable" not in quiet
    assert "a real problem" in quiet and "another transformers warning" in quiet
    loud = run(verbose=True)
    assert "requires torchvision" in loud and "gradient_checkpointing_enable" in loud and "a real problem" in loud


def test_quiet_is_by_message_and_category_not_blanket():
    env.quiet_third_party()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        env.quiet_third_party()  # re-applies its filters over "default"
        warnings.warn("`gradient_checkpointing_enable` is deprecated", UserWarning, stacklevel=1)  # other category
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["`gradient_checkpointing_enable` is deprecated", "something else"]


def test_accelerate_checkpoint_file_lines_are_hidden_but_its_other_lines_stay(caplog):
    """accelerate names every file it writes into a checkpoint's temporary folder (RNG pickles
    we then drop among them); our own line names the finished folder."""
    import logging

    env.quiet_third_party()
    log = logging.getLogger("accelerate.checkpointing")
    with caplog.at_level(logging.INFO, logger="accelerate.checkpointing"):
        log.info("Random states saved in out/.tmp-checkpoint-3-x/random_states_0.pkl")
        log.info("Sampler state for dataloader 0 saved in out/.tmp-checkpoint-3-x/sampler.bin")
        log.info("All model weights loaded successfully")
        log.info("Could not find a sampler state to load")
        log.info("[RANK 0] Could not load random states")  # every resume: we drop the RNG pickles on purpose
    assert [r.getMessage() for r in caplog.records] == ["Could not find a sampler state to load"]


def test_accelerate_temporary_folder_and_bitsandbytes_kernel_lines_are_hidden(caplog):
    import logging

    env.quiet_third_party()
    lines = [("accelerate.accelerator", "[RANK 0] Saving current state to out/.tmp-checkpoint-2-0ed8d6ff"),
             ("accelerate.accelerator", "Loading states from out/checkpoint-2"),
             ("accelerate.accelerator", "[RANK 0] Loading in 0 custom states"),
             ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-"
                                           "bitsandbytes' because Hugging Face Hub is in offline mode."),
             ("accelerate.accelerator", "Saving the state of a model that is not prepared"),
             ("kernels._internals.hf_hub", "Skipping publisher trust check for 'someone-else/repo'")]
    with caplog.at_level(logging.INFO):
        for name, message in lines:
            logging.getLogger(name).info(message)
    assert [r.getMessage() for r in caplog.records] == [lines[4][1], lines[5][1]]


def test_gpu_figures_come_from_nvidia_smi_without_waking_cuda_here(monkeypatch):
    """A CUDA context in the notebook's kernel would hold GPU memory the training process needs."""
    import subprocess

    import torch

    assert env.parse_nvidia_smi("Tesla T4, 15360, 15095\nNVIDIA A100-SXM4-40GB, 40960, 40000\n") == [
        ("Tesla T4", 15360 * 2**20, 15095 * 2**20), ("NVIDIA A100-SXM4-40GB", 40960 * 2**20, 40000 * 2**20)]

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda was asked")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi")
    answer = subprocess.CompletedProcess([], 0, "Tesla T4, 15360, 15095\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: answer)
    assert env.gpu_report() == "GPU 0: Tesla T4, 15.0 GiB total, 14.7 GiB free"
    assert env.gpu_memory_gib() == 15.0 and env.gpu_memory_gib(1) is None
