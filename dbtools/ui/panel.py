"""The training cell's live panel: watch a run and stop it cleanly.

While `train_dreambooth.py` runs, the panel shows what `<output_dir>/0/progress.json` says
(state, step, steps/s, time left, GPU memory, smoothed loss and learning rate), the loss
curve with the learning rate, the newest samples next to the previous save's, and the
validation loss and scores (from `progress.json` and `metrics.jsonl`). Its **Stop and
save** button sends SIGINT to the training process, which finishes the step, saves the
weights and a resume checkpoint and exits. The text log is kept in a folded section.

Plain ipywidgets with PNG bytes (the curve is drawn with Pillow), so it works in Colab and
JupyterLab. `run_live` is a coroutine: the cell awaits it, which lets the kernel handle the
button's clicks while training runs; interrupting the cell (the notebook's stop button)
stops training the same clean way. Outside a notebook, the output is streamed as text.

Pure parts (`History`, `panel_state`, `status_text`, `curve_xy`, `draw_curve`) are apart
from the widgets and the process handling. Importing this module has no side effects.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, ImageDraw

from dbtools.core.error_lines import ErrorLines
from dbtools.dataset.images import default_font, sample_files
from dbtools.train.checkpoints import RUN_FILES_DIR, list_weights
from dbtools.train.metrics import METRICS_FILE, read_metrics
from dbtools.train.watch import PROGRESS_FILE

logger = logging.getLogger(__name__)

DONE_STATES = ("finished", "stopped", "failed")

LOSS_COLOR = (31, 119, 180)
LR_COLOR = (255, 127, 14)
BACKGROUND = (255, 255, 255)


# =========================================================================== pure state


@dataclass
class History:
    """What the panel remembers between reads of progress.json: the loss curve and the saves."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float | None] = field(default_factory=list)
    saves: dict[int, list[str]] = field(default_factory=dict)
    """Saved step -> its sample paths, in the order the saves were seen."""

    def update(self, progress: dict) -> None:
        """Add the step of `progress` to the curve (a step at or before the last one, as in a
        resumed run, replaces what came after it) and remember a new save."""
        step, loss = _number(progress.get("step")), _number(progress.get("loss"))
        if step is not None and loss is not None:
            while self.steps and self.steps[-1] >= step:
                self.steps.pop(), self.losses.pop(), self.lrs.pop()
            self.steps.append(int(step))
            self.losses.append(loss)
            self.lrs.append(_number(progress.get("lr")))
        saved, samples = saved_step_of(progress)
        if saved is not None and (saved not in self.saves or samples):
            self.saves.pop(saved, None)
            self.saves[saved] = samples


@dataclass
class PanelState:
    """What the panel shows, read from progress.json, the history and metrics.jsonl."""

    state: str = "starting"
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    gpu_memory_gib: float | None = None
    saved_step: int | None = None
    samples: list[str] = field(default_factory=list)
    previous_step: int | None = None
    previous_samples: list[str] = field(default_factory=list)
    validation_loss: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    scores_step: int | None = None

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, null, text, NaN)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def saved_step_of(progress: dict) -> tuple[int | None, list[str]]:
    """The last saved step and its sample paths (`last_saved_step`, `last_saved_samples`)."""
    step, samples = _number(progress.get("last_saved_step")), progress.get("last_saved_samples")
    paths = [str(p) for p in samples] if isinstance(samples, (list, tuple)) else []
    return (None if step is None else int(step)), paths


def _scores_of(progress: dict) -> tuple[dict[str, float], float | None, int | None]:
    """Scores (`scores`, with the `step` they belong to) and the validation loss (`validation_loss`:
    `{"step", "loss"}`) of progress.json."""
    raw = progress.get("scores")
    raw = raw if isinstance(raw, dict) else {}
    scores = {k: v for k, v in ((k, _number(v)) for k, v in raw.items()) if v is not None and k != "step"}
    step = _number(raw.get("step"))
    validation = progress.get("validation_loss")
    validation = validation.get("loss") if isinstance(validation, dict) else validation
    return scores, _number(validation), None if step is None else int(step)


def panel_state(progress: dict, history: History, metrics: Sequence[dict] = ()) -> PanelState:
    """What the panel shows: `progress` (progress.json; any key may be missing or null), the
    previous save from `history`, and the latest scores of `metrics` (metrics.jsonl records,
    sorted by step), which values in progress.json win over."""
    saved, samples = saved_step_of(progress)
    if saved is not None and not samples:
        samples = history.saves.get(saved, [])
    earlier = [s for s in history.saves if saved is None or s < saved]
    previous = max(earlier) if earlier else None
    latest = dict(metrics[-1]) if metrics else {}
    scores, validation, scores_step = _scores_of(progress)
    from_file = {k: v for k, v in ((k, _number(latest.get(k))) for k in latest)
                 if v is not None and k not in ("step", "validation_loss")}
    step, max_steps = _number(progress.get("step")), _number(progress.get("max_train_steps"))
    state = progress.get("state")
    return PanelState(
        state=state if isinstance(state, str) and state else "starting",
        step=None if step is None else int(step), max_steps=None if max_steps is None else int(max_steps),
        loss=_number(progress.get("loss")), lr=_number(progress.get("lr")),
        steps_per_second=_number(progress.get("steps_per_second")),
        eta_seconds=_number(progress.get("eta_seconds")), gpu_memory_gib=_number(progress.get("gpu_memory_gib")),
        saved_step=saved, samples=samples, previous_step=previous,
        previous_samples=history.saves.get(previous, []) if previous is not None else [],
        validation_loss=validation if validation is not None else _number(latest.get("validation_loss")),
        scores={**from_file, **scores},
        scores_step=scores_step if scores else (int(latest["step"]) if from_file and "step" in latest else None),
    )


def format_duration(seconds: float | None) -> str:
    """`3725` -> `"1 h 02 min"`, `95` -> `"1 min 35 s"`; None -> `"?"`."""
    if seconds is None or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def status_text(ps: PanelState) -> str:
    """One line: state, step of total, steps/s, time left, GPU memory, loss and learning rate."""
    parts = [ps.state]
    if ps.step is not None:
        total = f" / {ps.max_steps}" if ps.max_steps else ""
        share = f" ({100 * ps.step / ps.max_steps:.0f}%)" if ps.max_steps else ""
        parts.append(f"step {ps.step}{total}{share}")
    if ps.steps_per_second is not None:
        parts.append(f"{ps.steps_per_second:.2f} steps/s")
    if ps.eta_seconds is not None and not ps.done:
        parts.append(f"{format_duration(ps.eta_seconds)} left")
    if ps.gpu_memory_gib is not None:
        parts.append(f"GPU {ps.gpu_memory_gib:.1f} GiB")
    if ps.loss is not None:
        parts.append(f"loss {ps.loss:.4f}")
    if ps.lr is not None:
        parts.append(f"lr {ps.lr:.3g}")
    return " · ".join(parts)


def scores_text(ps: PanelState) -> str:
    """The validation loss and scores, or what to expect when there are none yet."""
    parts = [f"validation loss {ps.validation_loss:.5f}"] if ps.validation_loss is not None else []
    parts += [f"{name.replace('_', ' ')} {value:.4f}" for name, value in sorted(ps.scores.items())]
    if not parts:
        return "Scores: none yet (they come with the saves when scoring is on)."
    where = f" (step {ps.scores_step})" if ps.scores_step is not None else ""
    return f"Scores{where}: " + ", ".join(parts)


# =========================================================================== the curve


def plot_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The plotting area (left, top, right, bottom) inside an image of `size`, leaving room
    for the labels."""
    w, h = size
    return 58, 22, w - 58, h - 24


def curve_xy(steps: Sequence[float], values: Sequence[float], box: tuple[int, int, int, int],
             log: bool = False) -> list[tuple[int, int]]:
    """Pixel positions of `values` against `steps` in `box` (each axis scaled to its own
    range; equal values sit in the middle). `log`: a logarithmic value axis (positive values)."""
    left, top, right, bottom = box
    ys = [math.log10(v) if log else v for v in values]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(ys), max(ys)
    def px(x):
        return left + (right - left) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)
    def py(y):
        return bottom - (bottom - top) * ((y - y0) / (y1 - y0) if y1 > y0 else 0.5)
    return [(round(px(x)), round(py(y))) for x, y in zip(steps, ys)]


def thinned(history: History, limit: int) -> History:
    """At most about `limit` points of `history` (evenly spaced, the last one kept): a curve
    of 80,000 steps needs no more points than the image has pixels."""
    n = len(history.steps)
    if n <= limit:
        return history
    keep = sorted(set(range(0, n, math.ceil(n / limit))) | {n - 1})
    return History([history.steps[i] for i in keep], [history.losses[i] for i in keep],
                   [history.lrs[i] for i in keep])


def _lr_points(history: History, box) -> list[tuple[int, int]]:
    pairs = [(s, lr) for s, lr in zip(history.steps, history.lrs) if lr is not None]
    if not pairs:
        return []
    steps, lrs = zip(*pairs)
    log = min(lrs) > 0 and max(lrs) / min(lrs) > 100  # warmup from ~0 reads better on a log scale
    return curve_xy(history.steps[:1] + list(steps) + history.steps[-1:], [lrs[0], *lrs, lrs[-1]], box, log)[1:-1]


def draw_curve(history: History, size: tuple[int, int] = (560, 220)) -> bytes:
    """The loss curve (blue, left scale) with the learning rate (orange, right scale) as PNG bytes."""
    img = Image.new("RGB", size, BACKGROUND)
    draw, font = ImageDraw.Draw(img), default_font(11)
    box = plot_box(size)
    left, top, right, bottom = box
    draw.rectangle(box, outline=(170, 170, 170))
    if not history.steps:
        draw.text((left + 8, top + 8), "loss curve: waiting for the first steps", fill=(90, 90, 90), font=font)
        return _png(img)
    history = thinned(history, 2 * (right - left))
    lr_points = _lr_points(history, box)
    if len(lr_points) > 1:
        draw.line(lr_points, fill=LR_COLOR, width=1)
    lrs = [lr for lr in history.lrs if lr is not None]
    if lrs:
        draw.text((right + 4, top - 4), f"{max(lrs):.2g}", fill=LR_COLOR, font=font)
        draw.text((right + 4, bottom - 8), f"{min(lrs):.2g}", fill=LR_COLOR, font=font)
        draw.text((right - 90, 4), "learning rate", fill=LR_COLOR, font=font)
    points = curve_xy(history.steps, history.losses, box)
    if len(points) > 1:
        draw.line(points, fill=LOSS_COLOR, width=2, joint="curve")
    for x, y in {points[0], points[-1]}:  # round ends, and a dot for a single step
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=LOSS_COLOR)
    draw.text((4, top - 4), f"{max(history.losses):.4g}", fill=LOSS_COLOR, font=font)
    draw.text((4, bottom - 8), f"{min(history.losses):.4g}", fill=LOSS_COLOR, font=font)
    draw.text((left, 4), "loss (smoothed)", fill=LOSS_COLOR, font=font)
    draw.text((left, bottom + 6), f"step {history.steps[0]}", fill=(90, 90, 90), font=font)
    last = f"step {history.steps[-1]}"
    draw.text((right - draw.textlength(last, font=font), bottom + 6), last, fill=(90, 90, 90), font=font)
    return _png(img)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def thumbnail_png(path: str | os.PathLike, size: int = 160) -> bytes | None:
    """A PNG thumbnail of the image at `path`, or None when it cannot be read (yet)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            return _png(im)
    except (OSError, ValueError):
        return None


# =========================================================================== files


def read_progress(output_dir: str | os.PathLike, since: float | None = None) -> dict | None:
    """`<output_dir>/0/progress.json`, or None while there is none (or it cannot be read). With
    `since` (a `time.time()`), a file last written before it is an earlier run's: None too."""
    try:
        data = json.loads((Path(output_dir) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    written = _number(data.get("updated_at"))
    return None if since is not None and written is not None and written < since else data


LOG_CHARS = 200_000
"""How much of the training output the panel's folded log keeps (the end of it)."""


def screen_text(text: str) -> str:
    """`text` as a terminal shows it: of each line only what its last carriage return left
    (a progress bar's latest state), so redrawn bars take no room."""
    return "\n".join(map(_screen_line, text.split("\n")))


def _screen_line(line: str) -> str:
    body = line.rstrip("\r")  # a bar waiting for its next redraw keeps one "\r"
    return body.rsplit("\r", 1)[-1] + ("\r" if len(body) < len(line) else "")


class _MetricsReader:
    """metrics.jsonl's records, read again only when the file changed."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.stamp, self.records = output_dir, None, []

    def read(self) -> list[dict]:
        try:
            st = (self.output_dir / METRICS_FILE).stat()
        except OSError:
            return self.records
        if (st.st_mtime_ns, st.st_size) != self.stamp:
            self.stamp, self.records = (st.st_mtime_ns, st.st_size), read_metrics(self.output_dir)
        return self.records


def resolve_samples(output_dir: Path, step: int | None, paths: Sequence[str]) -> list[Path]:
    """Sample paths made absolute (relative ones are under `output_dir`); without paths, the
    images in `<output_dir>/<step>/samples/`."""
    if paths:
        return [p if p.is_absolute() else output_dir / p for p in map(Path, paths)]
    if step is None:
        return []

    return sample_files(output_dir / str(step))


# =========================================================================== stopping


def training_processes(proc: subprocess.Popen, script: str) -> list[int]:
    """Ids of the processes under `proc` that run `script` (the launcher's workers)."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if any(os.path.basename(arg) == script for arg in child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def send_stop(proc: subprocess.Popen, script: str = "train_dreambooth.py") -> list[int]:
    """Ask the run to stop and save: SIGINT to the training processes under `proc` (not to a
    launcher such as `accelerate launch`, which would kill them mid-save), or to `proc`'s
    process group when none runs yet. Returns the ids signalled."""
    if proc.poll() is not None:
        return []
    targets = training_processes(proc, script)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    if targets:
        return targets
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.CTRL_C_EVENT)  # type: ignore[attr-defined]
    except (ProcessLookupError, PermissionError):
        return []
    return [proc.pid]


# =========================================================================== the widget


class TrainingPanel:
    """The live panel's widgets for one output folder; `refresh()` reads the files again."""

    def __init__(self, output_dir: str | os.PathLike, on_stop: Callable[[], Any] | None = None,
                 thumb: int = 160):
        import ipywidgets as w

        self.output_dir, self.on_stop, self.thumb = Path(output_dir), on_stop, thumb
        self.started = time.time()  # progress.json written before this is an earlier run's
        self._log_text = ""
        self.history = History()
        self.state = PanelState()
        self._metrics = _MetricsReader(self.output_dir)
        self._shown: tuple | None = None
        self._curve_len: int | None = None
        self._disk_stamp: int | None = None
        self._disk_steps: list[int] = []
        self.status = w.HTML("starting")
        self.button = w.Button(description="Stop and save", button_style="danger", icon="stop",
                               tooltip="Finish this step, save the weights and a resume checkpoint, then stop",
                               layout=w.Layout(width="auto"))
        self.button.on_click(lambda _: self.stop())
        self.curve = w.Image(value=draw_curve(self.history), format="png")
        self.newest, self.previous = w.VBox(), w.VBox(layout=w.Layout(margin="0 32px 0 0"))
        self.scores = w.HTML(scores_text(self.state))
        self.log = w.Output(layout=w.Layout(max_height="360px", overflow="auto"))
        self.log_box = w.Accordion(children=[self.log], titles=("Training log",), selected_index=None)
        self.widget = w.VBox([w.HBox([self.button, self.status]), self.curve,
                              w.HBox([self.previous, self.newest]), self.scores, self.log_box])

    def refresh(self) -> PanelState:
        """Read progress.json and metrics.jsonl again and update what changed."""
        progress = read_progress(self.output_dir, since=self.started) or {}
        if saved_step_of(progress)[0] is None:
            progress = self._saves_on_disk(progress)
        self.history.update(progress)
        self.state = ps = panel_state(progress, self.history, self._metrics.read())
        self.status.value = f"<b>{_html(status_text(ps))}</b>"
        if len(self.history.steps) != self._curve_len:
            self._curve_len = len(self.history.steps)
            self.curve.value = draw_curve(self.history)
        shown = (ps.saved_step, tuple(ps.samples), ps.previous_step, tuple(ps.previous_samples))
        if shown != self._shown and self._show_samples(ps):
            self._shown = shown
        self.scores.value = _html(scores_text(ps))
        if ps.done:
            self.ended(ps.state)
        return ps

    def ended(self, state: str) -> None:
        """The run is over: the button says how (`finished`, `stopped`, `failed`, an exit code)."""
        self.button.disabled = True
        self.button.description = {"finished": "Finished", "stopped": "Stopped and saved"}.get(state, state)
        if not self.state.done:  # progress.json did not say (yet): the exit code does
            self.status.value = f"<b>{_html(status_text(replace(self.state, state=state)))}</b>"

    def _saves_on_disk(self, progress: dict) -> dict:
        """`progress` with the newest complete weights folder as the saved step (and the one
        before it in the history), for a progress.json that names no save: the samples are
        then read from the folders. The folder is listed again only when it changed."""
        try:
            stamp = self.output_dir.stat().st_mtime_ns
        except OSError:
            return progress
        if stamp != self._disk_stamp:
            self._disk_stamp, self._disk_steps = stamp, [s for s, _ in list_weights(self.output_dir)][-2:]
        for step in self._disk_steps[:-1]:
            self.history.saves.setdefault(step, [])
        return {**progress, "last_saved_step": self._disk_steps[-1]} if self._disk_steps else progress

    def _show_samples(self, ps: PanelState) -> bool:
        """Put the newest and the previous save's samples in; False when an image is not readable yet."""
        ok = True
        for box, step, paths in ((self.newest, ps.saved_step, ps.samples),
                                 (self.previous, ps.previous_step, ps.previous_samples)):
            files = resolve_samples(self.output_dir, step, paths) if step is not None else []
            pngs = [thumbnail_png(p, self.thumb) for p in files]
            ok = ok and None not in pngs
            box.children = self._sample_column(step, [p for p in pngs if p], newest=box is self.newest)
        return ok

    def _sample_column(self, step: int | None, pngs: list[bytes], newest: bool) -> tuple:
        import ipywidgets as w

        if step is None:
            return ()
        label = f"{'newest' if newest else 'previous'} save: step {step}"
        images = [w.Image(value=png, format="png") for png in pngs]
        return (w.HTML(f"<b>{label}</b>"), w.HBox(images) if images else w.HTML("(no samples)"))

    def stop(self) -> None:
        """The button: ask the run to stop and save (once; it then says so)."""
        if self.on_stop is None or self.button.disabled:
            return
        self.button.disabled = True
        self.button.description = "Stopping: saving…"
        self.on_stop()

    def write_log(self, text: str) -> None:
        """Add training output to the folded log. The widget's own output list is set (not
        captured with `with self.log:`, which only the open page sees), so the whole log is in
        the notebook's saved widget state and comes back when it is reopened."""
        self._log_text = screen_text(self._log_text + text)[-LOG_CHARS:]
        self.log.outputs = ({"output_type": "stream", "name": "stdout", "text": self._log_text},)


def _html(text: str) -> str:
    import html

    return html.escape(text)


def make_panel(output_dir: str | os.PathLike) -> TrainingPanel | None:
    """A panel when this runs in a notebook kernel with ipywidgets; None elsewhere."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return None
    if shell is None or not hasattr(shell, "kernel"):
        return None
    try:
        return TrainingPanel(output_dir)
    except ImportError:
        return None


# =========================================================================== running


def _reader(pipe, out: queue.Queue) -> None:
    """Decode `pipe` into `out` as it arrives; None at the end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        chunk = pipe.read1(65536)
        text = decoder.decode(chunk, final=not chunk)
        if text:
            out.put(text)
        if not chunk:
            out.put(None)
            return


@dataclass
class LiveRun:
    """A training process with its output queue, what the panel and the loop share."""

    proc: subprocess.Popen
    output: queue.Queue
    script: str = "train_dreambooth.py"
    stops: int = 0
    tail: str = ""

    def stop(self) -> None:
        self.stops += 1
        pids = send_stop(self.proc, self.script)
        logger.info("Stop requested (SIGINT to %s): the run finishes this step, saves and exits.",
                    ", ".join(map(str, pids)) or "nothing, it has ended")

    def drain(self) -> tuple[str, bool]:
        """The output that arrived since the last call, and whether the output has ended."""
        parts, ended = [], False
        while True:
            try:
                item = self.output.get_nowait()
            except queue.Empty:
                break
            if item is None:
                ended = True
                break
            parts.append(item)
        text = "".join(parts).replace("\r\n", "\n")
        self.tail = (self.tail + text)[-4000:]
        return text, ended


def start_live(argv: Sequence[str | os.PathLike], cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None, script: str = "train_dreambooth.py") -> LiveRun:
    """Start `argv` in a session of its own, its output (stdout and stderr) read by a thread."""
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([os.fspath(a) for a in argv], cwd=cwd, env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=os.name == "posix")
    output: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, output), daemon=True).start()
    return LiveRun(proc, output, script)


async def run_live(argv: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                   panel: TrainingPanel | None = None, show: bool = True, cwd: str | os.PathLike | None = None,
                   env: dict[str, str] | None = None, poll_seconds: float = 1.0,
                   stream: TextIO | None = None, script: str = "train_dreambooth.py",
                   user_errors: list[str] | None = None) -> tuple[int, str]:
    """Run the training command `argv` while the panel (`make_panel`, shown unless `show` is
    False) follows `output_dir`; without a panel the output goes to `stream` (default stdout).
    With a `user_errors` list, the run's `error: ...` message goes there instead of the log,
    and what a launcher prints after it is held back (`ErrorLines`).

    An interrupt of the awaiting cell (KeyboardInterrupt or the kernel's cancellation) asks
    the run to stop and save, like the button, and the wait goes on until it has exited; each
    further interrupt is passed on (the run ignores the second, aborts at the third).
    Returns the exit code and the output's last lines.
    """
    panel = panel if panel is not None else make_panel(output_dir)
    run = start_live(argv, cwd, env, script)
    if panel is not None:
        panel.on_stop = run.stop
        if show:
            _display(panel.widget)
    out = _LogSink(panel, stream)
    if user_errors is not None:
        out = ErrorLines(out, user_errors, show_all=os.environ.get("DBTOOLS_VERBOSE") == "1")
    try:
        await _follow(run, panel, out, poll_seconds)
    except BaseException:  # not an interrupt (handled there): never leave the run going unwatched
        if run.proc.poll() is None:
            run.stop()
        raise
    if isinstance(out, ErrorLines):
        out.close()
    code = run.proc.wait()
    run.proc.stdout.close()
    if panel is not None:
        ps = _refresh(panel)
        done = ps.state if ps is not None and ps.done else "finished"
        panel.ended(done if code == 0 else f"ended (exit code {code})")
    return code, run.tail


async def _follow(run: LiveRun, panel: TrainingPanel | None, out: TextIO, poll_seconds: float) -> None:
    """Pass the output on and refresh the panel until the output ends; an interrupt stops the run."""
    ended = False
    while not ended:
        try:
            text, ended = run.drain()
            if text:
                out.write(text)
            if panel is not None:
                _refresh(panel)
            if not ended:
                await asyncio.sleep(poll_seconds)
        except (KeyboardInterrupt, asyncio.CancelledError):
            run.stop()
            if panel is not None:
                panel.button.disabled, panel.button.description = True, "Stopping: saving…"


def _refresh(panel: TrainingPanel) -> PanelState | None:
    """`panel.refresh()`; a display problem is logged and never ends the wait for the run."""
    try:
        return panel.refresh()
    except Exception:
        logger.debug("the panel could not be updated", exc_info=True)
        return None


class _LogSink:
    """Where the run's output goes: the panel's folded log, else `stream` (default stdout)."""

    def __init__(self, panel: TrainingPanel | None, stream: TextIO | None):
        self.panel, self.stream = panel, stream

    def write(self, text: str) -> None:
        if self.panel is not None:
            self.panel.write_log(text)
        else:
            out = self.stream or sys.stdout
            out.write(text)
            out.flush()

    def flush(self) -> None:
        pass


def _display(widget) -> None:
    try:
        from IPython.display import display
    except ImportError:
        return
    display(widget)


# =========================================================================== TensorBoard


def tensorboard_logdir(output_dir: str | os.PathLike) -> Path:
    """Where training's TensorBoard logs go: `<output_dir>/0/` (`--logging_dir`, default `logs`,
    is a folder in it; TensorBoard reads the folders below the one it is given)."""
    return Path(output_dir) / RUN_FILES_DIR


def show_tensorboard(output_dir: str | os.PathLike) -> bool:
    """Show TensorBoard for the run in `output_dir` in the running cell (Colab and Jupyter,
    through tensorboard's notebook extension: `%load_ext tensorboard`, `%tensorboard`).
    Where that cannot be shown (not in IPython, tensorboard missing, the extension failed),
    say how to start it by hand and return False."""
    import shlex

    logdir = tensorboard_logdir(output_dir)
    by_hand = f"run `tensorboard --logdir {shlex.quote(str(logdir))}` in a terminal and open the address it prints"
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is None:
        logger.info("Not in a notebook: %s.", by_hand)
        return False
    _tensorboard_binary()
    try:
        shell.run_line_magic("load_ext", "tensorboard")
        shell.run_line_magic("tensorboard", f"--logdir {shlex.quote(str(logdir))}")
    except Exception as exc:  # an extension that cannot display must not stop the notebook
        logger.warning("TensorBoard could not be shown here (%s): %s.", exc, by_hand)
        return False
    return True


def _tensorboard_binary() -> None:
    """The extension starts `tensorboard` from PATH; a kernel of a virtual environment that is
    not activated has it only next to its Python: point `$TENSORBOARD_BINARY` there."""
    import shutil

    if os.environ.get("TENSORBOARD_BINARY") or shutil.which("tensorboard"):
        return
    script = Path(sys.executable).with_name("tensorboard")
    if script.is_file():
        os.environ["TENSORBOARD_BINARY"] = str(script)
