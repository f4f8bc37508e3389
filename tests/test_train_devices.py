"""Training paths that matter on GPUs, checked on the CPU with stand-ins.

The `meta` device stands in for `cuda` where a tensor must stay on the device, probes
such as `torch.cuda.is_bf16_supported` are monkeypatched, and reentrant checkpointing
is forced where an older transformers would use it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch

from dbtools import train as T
from dbtools.train import TrainConfig


@pytest.fixture
def dataset(tmp_path, image_factory):
    """Two captioned instance images."""
    inst = tmp_path / "inst"
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0)]):
        img = image_factory(inst / f"toy_{i}.png", size=(32, 32), color=colour)
        Path(f"{img}.txt").write_text(f"a photo of sks toy, red, number {i}", encoding="utf-8")
    return inst


def config(model, data, out, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(data), output_dir=str(out),
                read_prompts_from_txts=True, resolution=32, train_batch_size=1, max_train_steps=1, seed=3,
                learning_rate=1e-3, lr_warmup_steps=0, report_to="none", checkpointing_steps=1000,
                save_interval=1000, n_save_sample=1, save_infer_steps=1)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- processes and precision


def test_process_group_waits_hours_not_the_ten_minute_default(tmp_path):
    acc = T.make_accelerator(TrainConfig(output_dir=str(tmp_path), report_to="none"))
    assert acc.init_handler is not None and acc.init_handler.timeout >= timedelta(hours=1)


def _probe(monkeypatch, native: bool) -> list:
    """`is_bf16_supported` of a GPU that runs bf16 natively or, like a T4, only emulates it."""
    calls = []

    def probe(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", probe)
    return calls


def test_gpu_is_asked_about_bf16_only_when_bf16_is_requested(monkeypatch):
    calls = _probe(monkeypatch, native=True)
    for requested in ("no", "fp16"):
        assert T.usable_precision(requested, cuda=True) == (requested, None)
    assert calls == []  # asking wakes CUDA on GPU 0 in every process
    assert T.usable_precision("bf16", cuda=True) == ("bf16", None)
    assert calls == [False]


def test_emulated_bf16_is_not_support(monkeypatch):
    _probe(monkeypatch, native=False)
    precision, warning = T.usable_precision("bf16", cuda=True)
    assert precision == "no" and "does not support bf16" in warning


@pytest.mark.slow
def test_two_processes_share_class_image_generation(tmp_path, dataset, tiny_sd):
    import os
    import subprocess
    import sys

    from dbtools.classgen import image_index

    root = Path(__file__).resolve().parents[1]
    out, classes = tmp_path / "ddp", tmp_path / "class"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(root / "train_dreambooth.py"),
         f"--pretrained_model_name_or_path={tiny_sd}", f"--instance_data_dir={dataset}", "--read_prompts_from_txts",
         f"--output_dir={out}", "--resolution=32", "--train_batch_size=1", "--max_train_steps=1", "--seed=1",
         "--report_to=none", "--with_prior_preservation", f"--class_data_dir={classes}",
         "--class_prompt=a photo of a toy", "--num_class_images=4", "--sample_batch_size=1"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
             "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("class images: generating 2 for") == 2  # each process made half
    assert sorted(image_index(p) for p in classes.iterdir()) == [0, 1, 2, 3]
