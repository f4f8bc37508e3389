"""Watching a training run and stopping it well.

`<output_dir>/0/progress.json` is replaced atomically (by the main process only) whenever the
run changes state, after each save, and at least every `PROGRESS_INTERVAL` seconds while it
trains. It holds `state` (one of `STATES`), `step`, `max_train_steps`, `loss` (smoothed),
`lr`, `steps_per_second`, `eta_seconds`, `gpu_memory_gib` (peak allocated, on a GPU; else
null), `last_saved_step` with its `last_saved_samples`, `validation_loss` and `scores` (the
newest of `metrics.jsonl`), `weights_dir` and `resume_from` once known, `message` (why it
failed or how to resume) and `updated_at` (Unix time).

SIGINT or SIGTERM (Ctrl-C, a notebook's stop button, `kill`) during the training loop asks
for a clean stop: the current optimizer step is finished, every process agrees on that step,
a complete weights folder and a resume checkpoint are saved at it, `state` becomes
`stopped`, and the command exits 0 saying where the weights are and how to resume. A second
signal is ignored with a message; a third aborts (what is half-saved stays invisible, as
every folder is written under a temporary name). Before the loop starts there is nothing to
save and a signal interrupts at once.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dbtools.core.atomic import atomic_write_text
from dbtools.core.redact import mask_secret_text
from dbtools.train.checkpoints import RUN_FILES_DIR, weights_due
from dbtools.train.config import TrainConfig
from dbtools.train.metrics import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LRScheduler

logger = logging.getLogger(__name__)

PROGRESS_FILE = f"{RUN_FILES_DIR}/progress.json"
"""Relative to the output folder: in the run's own folder, beside the logs (see `RUN_FILES_DIR`)."""
STATES = ("starting", "caching", "class images", "running", "saving", "finished", "stopped", "failed")
PROGRESS_INTERVAL = 2.0
"""Seconds between two writes of progress.json while steps go by (state changes write at once)."""
LOSS_SMOOTHING = 0.9
"""Weight of the previous smoothed loss (an exponential moving average over about 10 steps)."""
RATE_WINDOW = 20
"""Steps over which steps/s is measured."""


# --------------------------------------------------------------------------- pure rules


def smoothed(previous: float | None, loss: float, weight: float = LOSS_SMOOTHING) -> float:
    """The exponential moving average of the loss; the first loss is its own average."""
    return loss if previous is None or not math.isfinite(previous) else weight * previous + (1 - weight) * loss


def rate(times: list[tuple[float, int]]) -> float | None:
    """Steps per second from (time, step) pairs, oldest first; None with fewer than two."""
    if len(times) < 2 or times[-1][0] <= times[0][0]:
        return None
    return (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])


def eta_seconds(step: int, max_steps: int, steps_per_second: float | None) -> float | None:
    """Seconds left at `steps_per_second` (None while the rate is unknown)."""
    if not steps_per_second:
        return None
    return max(max_steps - step, 0) / steps_per_second


def resume_hint(checkpoint: Path) -> str:
    return f"resume with the same command plus --resume_from_checkpoint {checkpoint} (or latest)"


# --------------------------------------------------------------------------- progress.json


class Progress:
    """The fields of progress.json and when they are written (a no-op when not `enabled`)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, clock=time.monotonic):
        self.path = Path(output_dir) / PROGRESS_FILE
        self.enabled, self.clock = enabled, clock
        self.fields: dict = {"state": "starting", "step": 0, "max_train_steps": None, "loss": None, "lr": None,
                             "steps_per_second": None, "eta_seconds": None, "gpu_memory_gib": None,
                             "last_saved_step": None, "last_saved_samples": [], "validation_loss": None,
                             "scores": {}, "weights_dir": None, "resume_from": None, "message": None}
        self._times: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)
        self._written = -math.inf
        self._metrics_seen: int | None = None

    def state(self, state: str, **fields) -> None:
        """Enter `state` and write at once."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        self.fields.update(fields, state=state)
        if state == "running":
            self._times.clear()  # a save or the caching is not training speed
        self.write()

    def step(self, step: int, max_steps: int, loss: float, lr: float, gpu_memory_gib: float | None = None) -> None:
        """Record a finished optimizer step; write when `PROGRESS_INTERVAL` has passed."""
        now = self.clock()
        self._times.append((now, step))
        speed = rate(list(self._times))
        self.fields.update(step=step, max_train_steps=max_steps, loss=smoothed(self.fields["loss"], loss), lr=lr,
                           steps_per_second=speed, eta_seconds=eta_seconds(step, max_steps, speed),
                           gpu_memory_gib=gpu_memory_gib)
        if now - self._written >= PROGRESS_INTERVAL:
            self.write()

    def saved(self, output_dir: str | Path, step: int, folder: Path | None = None) -> None:
        """Note the weights folder saved at `step` (`<output_dir>/<step>` unless given), if it
        is complete, and the newest metrics."""
        folder = folder or Path(output_dir) / str(step)
        if folder.is_dir():
            self.fields.update(last_saved_step=step, weights_dir=str(folder),
                               last_saved_samples=[str(p) for p in sorted((folder / "samples").glob("*.png"))])
        self.read_metrics(output_dir)
        self.write()

    def read_metrics(self, output_dir: str | Path) -> bool:
        """Take the newest validation loss and scores from `metrics.jsonl`; True if it changed."""
        path = Path(output_dir) / METRICS_FILE
        mtime = path.stat().st_mtime_ns if path.is_file() else None
        if mtime is None or mtime == self._metrics_seen:
            return False
        self._metrics_seen = mtime
        for record in read_metrics(output_dir):
            if "validation_loss" in record:
                self.fields["validation_loss"] = {"step": record["step"], "loss": record["validation_loss"]}
            scores = {k: v for k, v in record.items() if k not in ("step", "validation_loss")}
            if scores:
                self.fields["scores"] = {"step": record["step"], **scores}
        return True

    def write(self) -> None:
        if not self.enabled:
            return
        self._written = self.clock()
        payload = json.dumps({**self.fields, "updated_at": time.time()}, indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, payload, fsync=False)  # replaced every few seconds: no fsync
        except OSError as exc:  # watching must never stop the training
            logger.warning("could not write %s: %s", self.path, exc)


# --------------------------------------------------------------------------- signals


class StopSignal:
    """SIGINT/SIGTERM handling: once `armed` (the training loop runs), the first signal asks
    for a stop after the current step, a second is ignored with a message, a third aborts
    (`KeyboardInterrupt`). Unarmed, a signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.count = 0
        self.armed = False
        self.stopping = False
        """Set once the processes agreed to stop (see `agreed`)."""
        self._previous: dict = {}

    def install(self) -> None:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self.handle)
        except ValueError:  # not the main thread (e.g. a notebook runs train() in a thread)
            logger.info("not the main thread: SIGINT/SIGTERM keep their usual effect")
            self.uninstall()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def handle(self, signum, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if not self.armed or self.count >= 3:
            raise KeyboardInterrupt(name)
        if self.count == 1 and not self.stopping:
            logger.warning("%s: stopping after this step; the weights and a resume checkpoint will be saved "
                           "(interrupt twice more to abort without them)", name)
        else:
            logger.warning("%s ignored: already stopping, saving the weights and a resume checkpoint; "
                           "interrupt once more to abort without them", name)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether to stop now: a signal reached any process (every process calls this at the
        same point of each step, so all of them stop after the same step)."""
        wanted = self.count > 0
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([1.0 if wanted else 0.0], device=accelerator.device)
            wanted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        self.stopping = self.stopping or wanted
        return self.stopping


# --------------------------------------------------------------------------- the watch


class RunState(Protocol):
    """What the watch reads from a run (`dbtools.train.run.Run`, which holds the watch)."""

    cfg: TrainConfig
    accelerator: Accelerator
    lr_scheduler: LRScheduler
    start_step: int
    max_train_steps: int


class Watch:
    """progress.json and the clean stop for one run; every process has one (only the main
    process writes), `train` enters it around the run."""

    def __init__(self, progress: Progress, stop: StopSignal | None):
        self.progress, self.stop = progress, stop
        self._cuda = False

    @classmethod
    def disabled(cls) -> Watch:
        """Writes nothing and leaves the signals alone."""
        return cls(Progress(".", enabled=False), None)

    @classmethod
    def start(cls, cfg: TrainConfig, accelerator: Accelerator) -> Watch:
        watch = cls(Progress(cfg.output_dir, enabled=accelerator.is_main_process), StopSignal())
        watch._cuda = accelerator.device.type == "cuda"
        return watch

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.stopping

    def __enter__(self) -> Watch:
        if self.stop is not None:
            self.stop.install()
        self.progress.state("starting")
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.stop is not None:
            self.stop.uninstall()
        if kind is KeyboardInterrupt:
            self.progress.state("stopped", message="interrupted; nothing more was saved")
        elif kind is not None:
            self.progress.state("failed", message=mask_secret_text(f"{kind.__name__}: {exc}"))

    def state(self, state: str, **fields) -> None:
        self.progress.state(state, **fields)

    def loop_started(self, run: RunState) -> None:
        """The loop begins: signals now stop cleanly."""
        if self.stop is not None:
            self.stop.armed = True
        self.progress.state("running", step=run.start_step, max_train_steps=run.max_train_steps)

    def should_stop(self, run: RunState) -> bool:
        return self.stop is not None and self.stop.agreed(run.accelerator)

    def after_step(self, run: RunState, step: int, loss: float) -> None:
        """A step was trained: its numbers, and state `saving` when weights or a checkpoint are due."""
        self.progress.step(step, run.max_train_steps, loss, run.lr_scheduler.get_last_lr()[0], self._gpu_gib())
        cfg = run.cfg
        checkpoint_due = cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0
        if weights_due(step, cfg.save_interval, cfg.save_min_steps) or checkpoint_due:
            self.progress.state("saving", step=step)

    def after_saves(self, run: RunState, step: int) -> None:
        """After the saves due at `step`: what they wrote (or a new validation loss alone)."""
        if self.progress.fields["state"] == "saving":
            self.progress.saved(run.cfg.output_dir, step)
            self.progress.state("running")
        elif self.progress.enabled and self.progress.read_metrics(run.cfg.output_dir):
            self.progress.write()

    def finished(self, run: RunState, weights_dir: Path | None, step: int) -> None:
        if weights_dir is not None:
            self.progress.saved(run.cfg.output_dir, step, weights_dir)
        self.progress.state("finished", step=step)

    def _gpu_gib(self) -> float | None:
        if not self._cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def stop_message(step: int, weights: Path | None, checkpoint: Path | None) -> str:
    """The one line a stopped run ends with."""
    if weights is None:
        return f"Stopped at step {step} before any new step was trained: nothing new was saved."
    return f"Stopped at step {step}: weights in {weights}; {resume_hint(checkpoint)}."

