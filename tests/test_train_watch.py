"""Watching a run (`progress.json`) and stopping it with SIGINT/SIGTERM: the weights and a
resume checkpoint of the last step trained are saved, and resuming gives the same weights."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dbtools.train.watch import PROGRESS_FILE, Progress, StopSignal, eta_seconds, rate, smoothed

ROOT = Path(__file__).resolve().parents[1]


def test_smoothing_rate_and_time_left():
    assert smoothed(None, 2.0) == 2.0 and smoothed(2.0, 1.0) == pytest.approx(1.9)
    assert rate([(10.0, 4)]) is None and rate([(10.0, 4), (12.0, 8)]) == 2.0
    assert eta_seconds(8, 20, 2.0) == 6.0 and eta_seconds(8, 20, None) is None


def test_progress_file_is_written_on_state_changes_and_every_few_seconds(tmp_path):
    now = [0.0]
    progress = Progress(tmp_path, clock=lambda: now[0])
    progress.state("running", step=0, max_train_steps=10)
    seen = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert (seen["state"], seen["step"], seen["max_train_steps"]) == ("running", 0, 10)
    now[0] = 0.5
    progress.step(1, 10, 1.0, 1e-4)
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["step"] == 0  # not yet: written 0.5 s ago
    now[0] = 2.5
    progress.step(2, 10, 0.0, 1e-4)
    seen = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert (seen["step"], seen["loss"], seen["lr"], seen["steps_per_second"], seen["eta_seconds"]) == \
        (2, pytest.approx(0.9), 1e-4, 0.5, 16.0)
    assert seen["gpu_memory_gib"] is None and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError):
        progress.state("paused")
    quiet = Progress(tmp_path / "other", enabled=False)  # the other processes of a multi-process run
    quiet.state("running")
    assert not (tmp_path / "other").exists()


def test_progress_names_the_last_save_its_samples_and_the_newest_metrics(tmp_path):
    from dbtools.after.evaluate import append_metrics

    (tmp_path / "20" / "samples").mkdir(parents=True)
    for i in (1, 0):
        (tmp_path / "20" / "samples" / f"{i}.png").write_bytes(b"png")
    append_metrics(tmp_path, {"step": 10, "validation_loss": 0.5})
    append_metrics(tmp_path, {"step": 20, "validation_loss": 0.25})
    append_metrics(tmp_path, {"step": 20, "likeness": 0.7, "prompt_fidelity": 0.3})
    progress = Progress(tmp_path)
    progress.saved(tmp_path, 20)
    seen = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert (seen["last_saved_step"], seen["weights_dir"]) == (20, str(tmp_path / "20"))
    assert seen["last_saved_samples"] == [str(tmp_path / "20" / "samples" / f"{i}.png") for i in (0, 1)]
    assert seen["validation_loss"] == {"step": 20, "loss": 0.25}
    assert seen["scores"] == {"step": 20, "likeness": 0.7, "prompt_fidelity": 0.3}
    assert not progress.read_metrics(tmp_path)  # unchanged file: not read again


def test_second_signal_is_ignored_and_the_third_aborts(caplog):
    stop = StopSignal()
    stop.install()
    try:
        with pytest.raises(KeyboardInterrupt):  # before the loop there is nothing to save
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        stop.count, stop.armed = 0, True
        with caplog.at_level(logging.WARNING):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
        assert stop.count == 2
        assert "SIGTERM: stopping after this step" in caplog.text and "SIGINT ignored: already stopping" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def toy_run(tmp_path: Path, model: Path, max_train_steps: int) -> tuple[dict, list[str]]:
    """Training settings for two captioned toy images (one held out for the validation loss):
    as TrainConfig fields and as flags."""
    from conftest import make_captioned

    make_captioned(tmp_path / "inst", sizes=[(48, 48)] * 2, colors=[(200, 0, 0), (200, 90, 0)])
    fields = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(tmp_path / "inst"),
                  resolution=32, train_batch_size=1, max_train_steps=max_train_steps, seed=3, learning_rate=1e-3,
                  lr_warmup_steps=0, report_to="none", save_interval=1000, save_sample_prompt="sks toy",
                  n_save_sample=1, save_infer_steps=1, validation_split=0.5)
    return {**fields, "read_prompts_from_txts": True}, [f"--{k}={v}" for k, v in fields.items()] + \
        ["--read_prompts_from_txts"]


def wait_until_running(proc: subprocess.Popen, out: Path) -> list[str]:
    """The states progress.json went through until `running` (polled)."""
    states: list[str] = []
    deadline = time.monotonic() + 600
    while "running" not in states:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        if (out / PROGRESS_FILE).is_file():
            state = json.loads((out / PROGRESS_FILE).read_text())["state"]
            states += [state] if state not in states else []
        time.sleep(0.02)
    return states


def assert_stopped_with_saves(out: Path, stdout: str, max_steps: int) -> int:
    """progress.json says `stopped` at a step whose weights and checkpoint are complete; the
    command's last line says where they are. Returns the step."""
    progress = json.loads((out / PROGRESS_FILE).read_text())
    step = progress["step"]
    assert progress["state"] == "stopped" and 1 <= step < max_steps
    assert progress["last_saved_step"] == step
    assert progress["last_saved_samples"] == [str(out / str(step) / "samples" / "0.png")]
    assert progress["resume_from"] == str(out / f"checkpoint-{step}")
    assert progress["validation_loss"]["step"] == step  # the held-out loss of the saved step
    assert (out / str(step) / "model_index.json").is_file() and (out / f"checkpoint-{step}").is_dir()
    assert stdout.strip().splitlines()[-1] == (
        f"Stopped at step {step}: weights in {out / str(step)}; resume with the same command plus "
        f"--resume_from_checkpoint {out / f'checkpoint-{step}'} (or latest).")
    return step


@pytest.mark.slow
def test_sigint_saves_the_step_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_sd):
    from safetensors.torch import load_file

    from dbtools.train import loop as T
    from dbtools.train.config import TrainConfig

    common, flags = toy_run(tmp_path, tiny_sd, 12)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_dreambooth.py"), f"--output_dir={out}", *flags],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        states = wait_until_running(proc, out)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # a second interrupt while stopping is ignored
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert states[-2:] == ["caching", "running"]  # "starting" lasts too short to be seen here
    assert "SIGINT ignored: already stopping" in stderr
    step = assert_stopped_with_saves(out, stdout, 12)

    # Resume (in this process, on the subprocess's single thread: float sums depend on the
    # thread count) and compare with a run that was never stopped.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = T.train(TrainConfig(output_dir=str(out), resume_from_checkpoint="latest", **common))
        straight = T.train(TrainConfig(output_dir=str(tmp_path / "straight"), **common))
    finally:
        torch.set_num_threads(threads)
    assert resumed.resumed_from == out / f"checkpoint-{step}"
    assert json.loads((out / PROGRESS_FILE).read_text())["state"] == "finished"
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(resumed.weights_dir / part)), load_file(str(straight.weights_dir / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, tiny_sd):
    _, flags = toy_run(tmp_path, tiny_sd, 200)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", str(ROOT / "train_dreambooth.py"),
                             f"--output_dir={out}", *flags], env={**ENV, "ACCELERATE_USE_CPU": "true"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_running(proc, out)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        rank1 = next(int(w) for w in workers if b"LOCAL_RANK=1\0" in Path(f"/proc/{w}/environ").read_bytes())
        os.kill(rank1, signal.SIGTERM)  # only the second process hears it
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("SIGTERM: stopping after this step") == 1
    assert_stopped_with_saves(out, stdout, 200)
    assert stdout.count("Stopped at step") == 1  # said once, by the main process


def test_a_failed_run_says_failed_and_why_without_secrets(tmp_path):
    from dbtools.train.watch import Watch

    with pytest.raises(RuntimeError), Watch(Progress(tmp_path), None):
        raise RuntimeError("upload refused for hf_abcdefghijklmnopqrstuvwxyz0123456789")
    seen = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert (seen["state"], seen["message"]) == ("failed", "RuntimeError: upload refused for <redacted>")
