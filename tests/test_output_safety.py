"""Nothing trained is lost behind the user's back: exports tied to their weights, keep
values checked, one run per output folder, the demo's folder, earlier runs inside the
instance folder, and the temporaries that interrupted commands leave."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_dreambooth
from dbtools import cli
from dbtools.after import cleanup as C
from dbtools.core.errors import UserError
from dbtools.train import folders as F
from dbtools.train import loop as T
from dbtools.train import setup as S
from dbtools.ui import notebook as nb
from tests.conftest import train_config as config
from tests.test_train_preflight import captioned, no_model_loads  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600


def age(path: Path, seconds: float = HOUR) -> Path:
    """Make `path` (and what is inside) look untouched for `seconds`."""
    then = time.time() - seconds
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(dirpath, name), (then, then))
    os.utime(path, (then, then))
    return path


# --------------------------------------------------------------------------- exports and keep values


def test_cleanup_cell_never_deletes_a_newer_runs_weights_at_an_exported_step(tmp_path, tiny_sd):
    """Pick step 1, export it, retrain into the same folder (overwrite): the new run's step 1
    was never exported, so DELETE keeps it; once exported, it may go."""
    captioned(tmp_path / "inst")
    out = tmp_path / "out"
    quick = dict(max_train_steps=2, save_interval=1, n_save_sample=1, save_infer_steps=1)
    T.train(config(tiny_sd, tmp_path / "inst", out, **quick))
    session = nb.Session(model=str(tiny_sd), output_dir=out)
    nb.pick_weights(session, "1")
    nb.export_step(session, fp16=False)
    nb.pick_weights(session, "2")  # looked at another step afterwards

    T.train(config(tiny_sd, tmp_path / "inst", out, **quick, seed=4, overwrite_output_dir=True))
    new_step = (out / "1" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert nb.cleanup_step(session, confirm="DELETE") == []
    assert (out / "1" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == new_step

    nb.pick_weights(session, "1")
    nb.export_step(session, fp16=False)  # the new run's step 1, exported
    nb.pick_weights(session, "2")
    assert nb.cleanup_step(session, confirm="DELETE") == [out.resolve() / "1"]
    assert (out / "2" / "model_index.json").is_file()


@pytest.mark.parametrize("spelling", ["0500", "500/", " 500", "500,"])
def test_keep_steps_in_another_spelling_keep_the_step(training_output, spelling, capsys):
    out = training_output
    flags = ["--output_dir", str(out), "--delete_unexported", "--confirm", "DELETE"]
    assert C.main([*flags, "--keep_steps", spelling]) == 0
    assert (out / "500" / "model_index.json").is_file()
    assert not (out / "1000").exists() and not (out / "1500").exists()


def test_keep_values_that_name_no_step_are_refused_before_anything_is_deleted(training_output, capsys,
                                                                               tmp_path):
    out = training_output
    flags = ["--output_dir", str(out), "--delete_unexported", "--delete_checkpoints", "--confirm", "DELETE"]
    assert cli.main(["cleanup", *flags, "--keep_steps", "1500", "15OO", "999", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "'15OO'" in err and "'999'" in err and "Saved steps there: 500, 1000, 1500." in err
    assert "'1500'" not in err
    for name in ("500", "1000", "1500", "checkpoint-1500"):
        assert (out / name).is_dir()
    # A kept step keeps its checkpoint too; a path inside the output folder is a value as well.
    assert cli.main(["cleanup", *flags, "--keep_steps", "1500", str(out / "1000")]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "0", "1000", "1500", "2000", "checkpoint-1500", "model.safetensors"]
    # The notebook's cleanup cell checks its field the same way.
    session = nb.Session(model="m", output_dir=out)
    with pytest.raises(UserError, match="also_keep_steps '9'.*Saved steps there: 1000, 1500[.]"):
        nb.cleanup_step(session, "9", delete_unexported=True, confirm="DELETE")
    assert (out / "1000").is_dir() and (out / "1500").is_dir()


# --------------------------------------------------------------------------- one run per output folder


def hold_lock_in_another_process(out: Path) -> subprocess.Popen:
    code = ("import sys, time\nfrom dbtools.train.folders import hold_output_dir\n"
            "with hold_output_dir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_held_output_folder_is_refused_and_a_crashed_runs_lock_is_taken_over(
        tmp_path, tiny_sd, monkeypatch, capsys, caplog):
    captioned(tmp_path / "inst")
    out = tmp_path / "out"
    argv = [f"--pretrained_model_name_or_path={tiny_sd}", f"--instance_data_dir={tmp_path / 'inst'}",
            "--read_prompts_from_txts", f"--output_dir={out}", "--resolution=32", "--train_batch_size=1",
            "--max_train_steps=1", "--seed=1", "--report_to=none", "--save_infer_steps=1", "--n_save_sample=1"]
    holder = hold_lock_in_another_process(out)
    try:
        import dbtools.families.models

        real_load = dbtools.families.models.load_sd_components
        monkeypatch.setattr(dbtools.families.models, "load_sd_components",
                            lambda *a, **k: pytest.fail("a model was loaded by the refused run"))
        assert train_dreambooth.main(train_dreambooth.parse_args(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err
        assert f"--output_dir {out} is in use by another training run (pid {holder.pid} on" in err
        assert not any(out.glob("[0-9]*"))
        monkeypatch.setattr(dbtools.families.models, "load_sd_components", real_load)
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the lock stays behind
        holder.wait()
    assert (out / F.LOCK_FILE).is_file()
    caplog.set_level(logging.WARNING, logger="dbtools.train.folders")
    assert train_dreambooth.main(train_dreambooth.parse_args(argv)) == 0
    assert "taking over the lock of a run that is gone" in caplog.text and str(holder.pid) in caplog.text
    assert (out / "1" / "model_index.json").is_file() and not (out / F.LOCK_FILE).exists()


def test_a_lock_from_another_machine_counts_while_its_heartbeat_is_fresh(tmp_path, caplog):
    lock = tmp_path / F.LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-elsewhere", "started": "then"}))
    with pytest.raises(F.OutputDirInUse, match="in use by another training run"):
        with F.hold_output_dir(tmp_path):
            pass
    age(lock, F.STALE_LOCK_S + 60)
    with F.hold_output_dir(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over" in caplog.text and not lock.exists()


def test_a_two_process_run_into_a_held_folder_stops_with_one_message(tmp_path, tiny_sd):
    """Only the main process takes the lock (the other process would find it taken); when it
    is refused, both processes stop before any model loads."""
    captioned(tmp_path / "inst")
    out = tmp_path / "out"
    holder = hold_lock_in_another_process(out)
    try:
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2",
             str(ROOT / "train_dreambooth.py"), f"--pretrained_model_name_or_path={tiny_sd}",
             f"--instance_data_dir={tmp_path / 'inst'}", "--read_prompts_from_txts", f"--output_dir={out}",
             "--resolution=32", "--max_train_steps=1", "--report_to=none"],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                 "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count("is in use by another training run") == 1, proc.stderr[-3000:]
    assert not any(out.glob("[0-9]*"))


# --------------------------------------------------------------------------- the demo's folder


def test_demo_into_a_project_folder_is_refused_and_its_files_are_untouched(tmp_path, capsys):
    project = tmp_path / "project"
    concepts = project / "concepts_list.json"
    captioned(project / "photos")
    concepts.write_text('[{"instance_data_dir": "photos"}]', encoding="utf-8")
    assert cli.main(["demo", "--out", str(project), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {project} is not empty" in err and "concepts_list.json" in err and "Traceback" not in err
    assert concepts.read_text(encoding="utf-8") == '[{"instance_data_dir": "photos"}]'
    assert sorted(p.name for p in project.iterdir()) == ["concepts_list.json", "photos"]
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_may_write_again_into_its_own_folder(tmp_path):
    from dbtools import demo

    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / demo.DEMO_MARKER).write_text("demo")
    (marked / "concepts_list.json").write_text("[]")
    demo._check_out(marked)
    older = tmp_path / "older"  # written before the marker existed: its own layout only
    (older / "dataset" / "raw").mkdir(parents=True)
    (older / "dataset" / "raw" / demo.SAMPLE_IMAGES[0][0]).write_bytes(b"")
    (older / "models" / "sd").mkdir(parents=True)
    (older / "output-previous-20250101-000000").mkdir()
    demo._check_out(older)
    (older / "my notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        demo._check_out(older)


# --------------------------------------------------------------------------- earlier runs in the data


@pytest.mark.usefixtures("no_model_loads")
def test_earlier_runs_anywhere_under_the_instance_folder_are_not_training_images(tmp_path, image_factory,
                                                                                 tiny_sd, caplog):
    inst = tmp_path / "inst"
    image_factory(inst / "a.png")
    image_factory(inst / "sub" / "b.png")
    old_run = inst / "old project" / "out"  # Shivam's layout: <step>/args.json, samples/
    image_factory(old_run / "500" / "samples" / "0.png")
    (old_run / "500" / "args.json").write_text("{}")
    image_factory(old_run / "0" / "notes.png")
    lora_run = inst / "sub" / "deep" / "lora-out"  # only a checkpoint so far
    image_factory(lora_run / "checkpoint-10" / "x.png")
    image_factory(lora_run / "3" / "samples" / "0.png")
    numbered = inst / "2024" / "7"  # photos in numbered folders are not a run
    image_factory(numbered / "c.png")
    caplog.set_level(logging.INFO, logger="dbtools.train.data")
    cfg = config(tiny_sd, inst, tmp_path / "out", read_prompts_from_txts=False, instance_prompt="sks toy")
    _, plan = S.preflight(cfg)
    assert sorted(e.path.relative_to(inst).as_posix() for e in plan.instance) == [
        "2024/7/c.png", "a.png", "sub/b.png"]
    skipped = [r.getMessage() for r in caplog.records if "skipped sub-folder" in r.getMessage()]
    assert len(skipped) == 2
    assert any(os.path.join("old project", "out") in m for m in skipped)
    assert any(os.path.join("sub", "deep", "lora-out") in m for m in skipped)


# --------------------------------------------------------------------------- leftovers of interrupted commands


def test_export_removes_the_temporaries_of_an_export_that_was_killed(tiny_sd, tmp_path, capsys):
    dest = tmp_path / "exports"
    dest.mkdir()
    stale = dest / ".tmp-4242-0.safetensors"
    stale.write_bytes(b"half a model")
    age(stale)
    fresh = dest / ".tmp-4243-0.safetensors"  # maybe another export still writing
    fresh.write_bytes(b"being written")
    users = [dest / ".tmp-notes.safetensors", dest / ".tmp-4242-1"]  # not an export's names
    for path in users:
        path.write_bytes(b"mine")
        age(path)
    assert cli.main(["export", "--model_path", str(tiny_sd), "--checkpoint_path", str(dest / "m.safetensors")]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(["m.safetensors", fresh.name] + [p.name for p in users])


def test_extract_removes_the_temporaries_of_an_extract_that_was_killed(tmp_path, image_factory):
    inst = tmp_path / "inst"
    image_factory(inst / "a red car_1.png")
    image_factory(inst / "sub" / "a blue car_2.png")
    stale = [inst / ".tmp-77-3", inst / "sub" / ".tmp-77-9"]
    mine = [inst / ".tmp-77-4", inst / ".tmp-draft", inst / "sub" / ".tmp-77-3.txt"]
    for path in stale + mine:
        path.write_text("half a caption")
        age(path)
    (inst / ".tmp-77-4").touch()  # fresh: maybe being written
    assert cli.main(["extract", "--instance_data_dir", str(inst), "--no_progress"]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in mine)
    assert (inst / "a red car_1.png.txt").read_text(encoding="utf-8") == "a red car"


def test_cleanup_lists_temporaries_and_removes_only_stale_ones_of_ours(training_output, capsys):
    out = training_output  # holds `.tmp-2500-x`: not a name we give
    cut_short = out / ".tmp-deleting-700"  # a confirmed deletion, interrupted
    (cut_short / "unet").mkdir(parents=True)
    (cut_short / "unet" / "w.safetensors").write_bytes(b"w" * 2048)
    export = out / ".tmp-31-0.safetensors"
    export.write_bytes(b"e" * 4096)
    age(export)
    saving = out / ".tmp-2600-0a1b2c3d"  # a save in progress
    saving.mkdir()
    only_copy = out / ".tmp-old-7"  # an interrupted swap's only copy: never deleted
    only_copy.mkdir()
    age(only_copy)
    flags = ["--output_dir", str(out)]
    assert C.main(flags) == 0
    text = capsys.readouterr().out
    listed = text[text.index("Left by interrupted runs"):]
    for path in (cut_short, export, saving, only_copy):
        assert path.name in listed
    assert ".tmp-2500-x" not in listed
    assert C.main([*flags, "--confirm", "DELETE"]) == 0
    gone = {p.name for p in (cut_short, export)}
    assert not any((out / n).exists() for n in gone)
    assert saving.is_dir() and only_copy.is_dir() and (out / ".tmp-2500-x").is_dir()
    assert all((out / s / "model_index.json").is_file() for s in ("500", "1000", "1500"))
