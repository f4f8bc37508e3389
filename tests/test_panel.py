"""The training cell's live panel: what it reads from progress.json and metrics.jsonl, the
loss curve it draws, and its Stop and save button (SIGINT to the training process)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from dbtools.core.atomic import atomic_write_text
from dbtools.train.watch import PROGRESS_FILE
from dbtools.ui.panel import (
    LOSS_COLOR,
    History,
    TrainingPanel,
    curve_xy,
    draw_curve,
    panel_state,
    plot_box,
    read_progress,
    run_live,
    send_stop,
    start_live,
    status_text,
)


def write_progress(output_dir, text: str) -> None:
    """Replace the run's progress.json, as the trainer does."""
    (output_dir / PROGRESS_FILE).parent.mkdir(exist_ok=True)
    atomic_write_text(output_dir / PROGRESS_FILE, text)


BASE = {"step": 120, "max_train_steps": 400, "loss": 0.125, "lr": 2e-6, "steps_per_second": 0.93,
        "eta_seconds": 301, "gpu_memory_gib": 9.8, "state": "running"}


# --------------------------------------------------------------------------- panel_state


def test_panel_reads_what_the_trainer_writes(tmp_path):
    """The panel reads progress.json as training's writer (`train_watch.Progress`) writes it."""
    from dbtools.after.evaluate import append_metrics
    from dbtools.train.watch import Progress

    sample = tmp_path / "100" / "samples" / "0.png"
    sample.parent.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(sample)
    append_metrics(tmp_path, {"step": 100, "likeness": 0.7, "prompt_fidelity": 0.3, "class_drift": 0.4,
                              "validation_loss": 0.2})
    progress = Progress(tmp_path)
    progress.state("running")
    progress.step(120, 400, 0.125, 2e-6, gpu_memory_gib=9.8)
    progress.saved(tmp_path, 100)
    ps = panel_state(json.loads((tmp_path / PROGRESS_FILE).read_text()), History())
    assert (ps.state, ps.step, ps.max_steps, ps.loss, ps.lr, ps.gpu_memory_gib) == ("running", 120, 400, 0.125,
                                                                                     2e-6, 9.8)
    assert (ps.saved_step, ps.samples, ps.validation_loss) == (100, [str(sample)], 0.2)
    assert (ps.scores, ps.scores_step) == ({"likeness": 0.7, "prompt_fidelity": 0.3, "class_drift": 0.4}, 100)


def test_panel_state_without_gpu_or_saves_and_with_bad_values():
    ps = panel_state({"step": 3, "loss": "nan", "gpu_memory_gib": None, "state": "caching"}, History())
    assert (ps.state, ps.step, ps.loss, ps.gpu_memory_gib, ps.saved_step, ps.scores) == ("caching", 3, None, None,
                                                                                        None, {})
    assert panel_state({}, History()).state == "starting"
    assert status_text(ps) == "caching · step 3"


def test_previous_save_comes_from_the_history_and_scores_from_metrics():
    history = History()
    for step, saved, samples in [(2, 2, ["2/samples/0.png"]), (3, 2, []), (4, 4, ["4/samples/0.png"])]:
        history.update({"step": step, "loss": 1.0 / step, "lr": 1e-4, "last_saved_step": saved,
                        "last_saved_samples": samples})
    metrics = [{"step": 2, "likeness": 0.5, "prompt_fidelity": 0.25},
               {"step": 4, "likeness": 0.75, "prompt_fidelity": 0.2, "validation_loss": 0.3}]
    ps = panel_state({"step": 4, "last_saved_step": 4, "state": "saving"}, history, metrics)
    assert (ps.saved_step, ps.samples) == (4, ["4/samples/0.png"])
    assert (ps.previous_step, ps.previous_samples) == (2, ["2/samples/0.png"])
    assert (ps.validation_loss, ps.scores, ps.scores_step) == (0.3, {"likeness": 0.75, "prompt_fidelity": 0.2}, 4)
    # what progress.json says wins over the file
    ps = panel_state({"step": 4, "scores": {"likeness": 0.9, "class_drift": 0.1}}, history, metrics)
    assert ps.scores == {"likeness": 0.9, "prompt_fidelity": 0.2, "class_drift": 0.1}


def test_history_keeps_one_point_per_step_and_restarts_at_a_resumed_step():
    history = History()
    for step in (1, 2, 2, 3, 4, 2, 3):  # a step read twice; a run resumed from step 2
        history.update({"step": step, "loss": step / 10, "lr": step * 1e-6})
    history.update({"step": 5})  # no loss yet: not a point
    assert history.steps == [1, 2, 3] and history.losses == [0.1, 0.2, 0.3] and history.lrs == [1e-6, 2e-6, 3e-6]


def test_status_text_says_progress_time_left_and_memory():
    text = status_text(panel_state(BASE, History()))
    assert text == ("running · step 120 / 400 (30%) · 0.93 steps/s · 5 min 01 s left · GPU 9.8 GiB · "
                    "loss 0.1250 · lr 2e-06")


# --------------------------------------------------------------------------- the curve


def history_of(losses, lrs=None) -> History:
    history = History()
    for i, loss in enumerate(losses):
        history.update({"step": 10 * (i + 1), "loss": loss, "lr": None if lrs is None else lrs[i]})
    return history


def test_curve_is_a_png_with_the_loss_values_where_they_belong():
    losses = [0.9, 0.5, 0.6, 0.2, 0.3, 0.1]
    history = history_of(losses, lrs=[1e-6 * (i + 1) for i in range(6)])
    png = draw_curve(history, size=(400, 200))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (400, 200)
    box = plot_box(img.size)
    points = curve_xy(history.steps, losses, box)
    assert points[0][0] == box[0] and points[-1][0] == box[2]  # first and last step at the edges
    assert points[0][1] == box[1] and points[-1][1] == box[3]  # highest loss on top, lowest at the bottom
    rgb = img.convert("RGB")
    assert all(rgb.getpixel(p) == LOSS_COLOR for p in points)
    # the same steps with other losses: the old points are not on the new curve
    other = Image.open(io.BytesIO(draw_curve(history_of(losses[::-1]), size=(400, 200)))).convert("RGB")
    assert [other.getpixel(p) == LOSS_COLOR for p in points[1:-1]].count(False) >= 3


def test_curve_without_steps_or_with_one_step():
    assert Image.open(io.BytesIO(draw_curve(History()))).format == "PNG"
    one = history_of([0.4])
    img = Image.open(io.BytesIO(draw_curve(one, size=(300, 150)))).convert("RGB")
    assert img.getpixel(curve_xy(one.steps, one.losses, plot_box((300, 150)))[0]) == LOSS_COLOR


# --------------------------------------------------------------------------- the widget and the button


def write_png(path: Path, color) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return str(path)


def test_panel_follows_progress_json_written_step_by_step(tmp_path):
    panel = TrainingPanel(tmp_path)
    assert panel.refresh().state == "starting" and "none yet" in panel.scores.value
    first_curve = panel.curve.value
    for step in (1, 2, 3):
        write_progress(tmp_path, json.dumps({**BASE, "step": step, "loss": 1 / step}))
        ps = panel.refresh()
        assert ps.step == step and f"step {step} / 400" in panel.status.value
    assert panel.history.steps == [1, 2, 3] and panel.curve.value == draw_curve(panel.history) != first_curve
    assert panel.newest.children == () and panel.previous.children == ()

    write_png(tmp_path / "2" / "samples" / "0.png", "red")  # a save without sample paths: its samples/ folder
    write_progress(tmp_path, json.dumps({**BASE, "step": 3, "last_saved_step": 2}))
    panel.refresh()
    assert "step 2" in panel.newest.children[0].value and len(panel.newest.children[1].children) == 1
    samples = [write_png(tmp_path / "4" / "samples" / f"{i}.png", "blue") for i in range(2)]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 4, "likeness": 0.625}) + "\n")
    write_progress(tmp_path, json.dumps(
        {**BASE, "step": 4, "state": "finished", "last_saved_step": 4, "last_saved_samples": samples}))
    ps = panel.refresh()
    assert "step 4" in panel.newest.children[0].value and len(panel.newest.children[1].children) == 2
    assert "step 2" in panel.previous.children[0].value
    assert Image.open(io.BytesIO(panel.newest.children[1].children[0].value)).getpixel((1, 1)) == (0, 0, 255)
    assert "likeness 0.6250" in panel.scores.value and ps.done and panel.button.disabled


def test_without_saves_in_progress_json_the_panel_shows_the_weights_folders(tmp_path):
    """A progress.json that names no save (or none at all): the newest complete weights
    folders on disk are the saves shown; a folder still being written is not."""
    panel = TrainingPanel(tmp_path)
    write_progress(tmp_path, json.dumps({**BASE, "step": 2}))
    for step, color in ((2, "red"), (4, "blue")):
        write_png(tmp_path / str(step) / "samples" / "0.png", color)
        (tmp_path / str(step) / "model_index.json").write_text("{}")
    write_png(tmp_path / ".tmp-6" / "samples" / "0.png", "green")
    ps = panel.refresh()
    assert (ps.saved_step, ps.previous_step) == (4, 2)
    assert "step 4" in panel.newest.children[0].value and "step 2" in panel.previous.children[0].value
    assert Image.open(io.BytesIO(panel.newest.children[1].children[0].value)).getpixel((1, 1)) == (0, 0, 255)


# A stand-in for the trainer: writes progress.json step by step until SIGINT, then saves and exits 0.
TRAINER = textwrap.dedent('''
    import json, os, signal, sys, time
    out = sys.argv[1]
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    def progress(**kw):
        os.makedirs(os.path.join(out, "0"), exist_ok=True)
        tmp = os.path.join(out, "0", ".tmp-progress.json")
        with open(tmp, "w") as f:
            json.dump(kw, f)
        os.replace(tmp, os.path.join(out, "0", "progress.json"))
    step = 0
    while not stop and step < 3000:
        step += 1
        progress(step=step, max_train_steps=3000, loss=1.0 / step, lr=1e-4, state="running")
        print("step", step, flush=True)
        time.sleep(0.02)
    open(os.path.join(out, "stopped-at"), "w").write(str(step))
    progress(step=step, max_train_steps=3000, loss=1.0 / step, lr=1e-4, state="stopped")
    print("saved at step", step, flush=True)
''')


def test_stop_button_sends_sigint_and_the_run_saves_and_exits(tmp_path):
    trainer = tmp_path / "train_dreambooth.py"
    trainer.write_text(TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    panel = TrainingPanel(out)
    seen: list[int] = []

    async def press_when_running():
        while len(panel.history.steps) < 3:
            await asyncio.sleep(0.05)
        seen.extend(panel.history.steps)
        panel.button.click()

    async def both():
        return (await asyncio.gather(run_live([sys.executable, trainer, out], out, panel=panel, show=False,
                                              poll_seconds=0.05), press_when_running()))[0]

    code, tail = asyncio.run(both())
    stopped_at = int((out / "stopped-at").read_text())
    assert code == 0 and f"saved at step {stopped_at}" in tail
    assert seen == sorted(seen) and len(seen) >= 3 and stopped_at < 3000
    assert panel.state.state == "stopped" and panel.history.steps[-1] == stopped_at
    assert panel.button.disabled and panel.button.description == "Stopped and saved"


def test_interrupting_the_cell_stops_and_saves_like_the_button(tmp_path):
    """The kernel turns an interrupt of an awaiting cell into a cancellation: the run is asked
    to stop and save, and the wait goes on until it has exited."""
    trainer = tmp_path / "train_dreambooth.py"
    trainer.write_text(TRAINER)

    async def interrupt_when_running():
        task = asyncio.ensure_future(run_live([sys.executable, trainer, tmp_path], tmp_path, show=False,
                                              poll_seconds=0.05, stream=io.StringIO()))
        while not (tmp_path / PROGRESS_FILE).is_file():
            await asyncio.sleep(0.05)
        task.cancel()
        return await task

    code, tail = asyncio.run(interrupt_when_running())
    assert code == 0 and int((tmp_path / "stopped-at").read_text()) < 3000 and "saved at step" in tail
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["state"] == "stopped"


class BrokenStream(io.StringIO):
    def write(self, text):
        raise RuntimeError("the cell's output is gone")


def test_a_broken_display_never_leaves_the_run_going_unwatched(tmp_path):
    trainer = tmp_path / "train_dreambooth.py"
    trainer.write_text(TRAINER)
    with pytest.raises(RuntimeError, match="output is gone"):
        asyncio.run(run_live([sys.executable, trainer, tmp_path], tmp_path, show=False, poll_seconds=0.05,
                             stream=BrokenStream()))
    deadline = time.monotonic() + 120  # the run was asked to stop and save: it does, well before its 3000 steps
    while read_progress(tmp_path)["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_progress(tmp_path)["state"] == "stopped" and int((tmp_path / "stopped-at").read_text()) < 3000


def test_a_failing_run_streams_its_output_and_returns_its_exit_code(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('loading')\nprint('error: no images in data/', file=sys.stderr)\n"
                      "sys.exit(3)\n")
    stream = io.StringIO()
    code, tail = asyncio.run(run_live([sys.executable, script], tmp_path, show=False, poll_seconds=0.05,
                                      stream=stream))
    assert code == 3 and stream.getvalue() == tail == "loading\nerror: no images in data/\n"
    panel = TrainingPanel(tmp_path)  # no progress.json: the panel says how the run ended
    assert asyncio.run(run_live([sys.executable, script], tmp_path, panel=panel, show=False, poll_seconds=0.05))[0] == 3
    assert "ended (exit code 3)" in panel.status.value and panel.button.description == "ended (exit code 3)"


def test_a_long_curve_is_drawn_from_at_most_a_few_points_per_pixel():
    from dbtools.ui.panel import thinned

    history = history_of([1 / (i + 1) for i in range(20000)])
    thin = thinned(history, 1000)
    assert 1000 <= len(thin.steps) <= 1001 and thin.steps[0] == 10 and thin.steps[-1] == history.steps[-1]
    losses = dict(zip(history.steps, history.losses))
    assert all(losses[s] == loss for s, loss in zip(thin.steps, thin.losses))
    assert Image.open(io.BytesIO(draw_curve(history))).format == "PNG"


LAUNCHER = textwrap.dedent('''
    import subprocess, sys
    # like `accelerate launch`: an interrupt of the launcher would end the trainer
    sys.exit(subprocess.call([sys.executable, sys.argv[1], sys.argv[2]]))
''')


def test_stop_signals_the_trainer_not_its_launcher(tmp_path):
    trainer, launcher = tmp_path / "train_dreambooth.py", tmp_path / "launch.py"
    trainer.write_text(TRAINER)
    launcher.write_text(LAUNCHER)
    run = start_live([sys.executable, launcher, trainer, tmp_path])
    text = ""
    while "step 2" not in text:
        chunk = run.output.get(timeout=120)
        assert chunk is not None, text
        text += chunk
    signalled = send_stop(run.proc)
    assert run.proc.pid not in signalled and len(signalled) == 1
    assert run.proc.wait(timeout=120) == 0  # the launcher was not interrupted; the trainer exited 0
    assert (tmp_path / "stopped-at").is_file()


# --------------------------------------------------------------------------- TensorBoard


class FakeShell:
    """Records the line magics a cell would run; `fail` makes the display magic raise."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = [], fail

    def run_line_magic(self, name, line):
        self.calls.append((name, line))
        if self.fail and name == "tensorboard":
            raise RuntimeError("cannot display here")


def test_tensorboard_is_shown_for_the_runs_log_folder(tmp_path, monkeypatch, caplog):
    import IPython

    from dbtools.train.config import build_parser
    from dbtools.ui.panel import show_tensorboard, tensorboard_logdir

    out = tmp_path / "my run"
    shell = FakeShell()
    monkeypatch.setenv("PATH", str(tmp_path))  # a kernel of a venv that is not activated
    monkeypatch.delenv("TENSORBOARD_BINARY", raising=False)
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert show_tensorboard(out) is True
    assert shell.calls == [("load_ext", "tensorboard"), ("tensorboard", f"--logdir '{out / '0'}'")]
    assert os.environ["TENSORBOARD_BINARY"] == str(Path(sys.executable).with_name("tensorboard"))
    # training's TensorBoard folder, <output_dir>/0/<--logging_dir>, is under the folder shown
    logging_dir = build_parser().parse_args(["--output_dir", str(out)]).logging_dir
    assert tensorboard_logdir(out) in (out / "0" / logging_dir).parents

    monkeypatch.setattr(IPython, "get_ipython", lambda: FakeShell(fail=True))
    with caplog.at_level("WARNING", logger="dbtools"):
        assert show_tensorboard(out) is False
    assert "cannot display here" in caplog.text and "tensorboard --logdir" in caplog.text
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert show_tensorboard(out) is False


def test_an_earlier_runs_progress_never_ends_a_new_runs_panel(tmp_path):
    """A resumed or second run in the same folder: until the new run writes progress.json, the
    file there is the earlier run's ("finished", "stopped"); the new panel's button stays live."""
    write_progress(tmp_path, json.dumps({**BASE, "state": "finished", "step": 400, "updated_at": time.time() - 60}))
    panel = TrainingPanel(tmp_path)
    ps = panel.refresh()
    assert ps.state == "starting" and not ps.done
    assert not panel.button.disabled and panel.button.description == "Stop and save"
    write_progress(tmp_path, json.dumps({**BASE, "step": 401, "updated_at": time.time()}))
    assert panel.refresh().step == 401 and not panel.button.disabled


def test_the_whole_log_is_in_the_widgets_own_state(tmp_path):
    """The folded log is the widget's output list (what a saved notebook keeps), not output
    captured by the page: every line is there, a redrawn progress bar once."""
    panel = TrainingPanel(tmp_path)
    for text in ("setup line\n", "steps:  10%|#\r", "steps:  50%|#####\r", "\rresuming from checkpoint-2\n",
                 "steps: 100%|##########\n", "Trained 4 steps (0 skipped).\n"):
        panel.write_log(text)
    (out,) = panel.log.outputs
    assert out["text"] == ("setup line\nresuming from checkpoint-2\nsteps: 100%|##########\n"
                           "Trained 4 steps (0 skipped).\n")
