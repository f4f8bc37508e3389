"""The Python side of the notebook's cells (`dbtools.ui.notebook`)."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from dbtools.core.errors import UserError
from dbtools.ui import notebook as nb

# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize("path, expected", [
    ("stable_diffusion_weights/zwx", "/content/drive/MyDrive/stable_diffusion_weights/zwx"),
    ("stable_diffusion_weights/zwx/", "/content/drive/MyDrive/stable_diffusion_weights/zwx"),
    ("/content/drive/MyDrive/weights/", "/content/drive/MyDrive/weights"),  # no double prefix
    ("/content/drive/MyDrive", "/content/drive/MyDrive"),
    ("MyDrive/weights", "/content/drive/MyDrive/weights"),
    ("drive/MyDrive/weights", "/content/drive/MyDrive/weights"),
    ("content/drive/MyDrive/weights", "/content/drive/MyDrive/weights"),
    ("/content/drive/Shareddrives/team/w", "/content/drive/Shareddrives/team/w"),
    ("/content/local_out", "/content/local_out"),  # absolute, not on Drive: kept
    (" weights//run1/./ ", "/content/drive/MyDrive/weights/run1"),
    ("drive/x", "/content/drive/MyDrive/drive/x"),  # a folder called "drive" is just a folder
])
def test_resolve_output_dir_on_colab_with_drive(path, expected):
    assert nb.resolve_output_dir(path, True, colab=True) == Path(expected)


def test_resolve_output_dir_without_drive_or_outside_colab(tmp_path):
    assert nb.resolve_output_dir("out/run1/", False, colab=True) == Path("out/run1")
    assert nb.resolve_output_dir("out/run1/", True, colab=False) == Path("out/run1")
    assert not nb.in_colab()  # the test machine is not Colab: detection says so
    assert nb.resolve_output_dir(f"{tmp_path}/w/", True) == tmp_path / "w"
    assert nb.resolve_output_dir("w", True, drive_root="/content/drive/MyDrive/", colab=True) == \
        Path("/content/drive/MyDrive/w")
    with pytest.raises(ValueError, match="OUTPUT_DIR"):
        nb.resolve_output_dir("  ", True, colab=True)


def test_mount_drive_outside_colab_does_nothing(caplog):
    caplog.set_level("INFO", logger="dbtools.ui.notebook")
    assert nb.mount_drive() is False
    assert "not running in colab" in caplog.text.lower()
    assert "google.colab" not in sys.modules


def test_gpu_and_versions_reports(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CPU" in nb.gpu_report()
    gib = 1024 ** 3
    text = nb.format_gpu_report([("NVIDIA T4", 15 * gib, 14 * gib + gib // 2)])
    assert text == "GPU 0: NVIDIA T4, 15.0 GiB total, 14.5 GiB free"
    import diffusers

    report = nb.versions_report()
    assert f"torch {torch.__version__}" in report and f"diffusers {diffusers.__version__}" in report
    assert "python 3." in report


def test_hf_login_sources_and_never_writes_the_token(monkeypatch, tmp_path):
    import huggingface_hub

    prompts = []
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda **kw: prompts.append(kw))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert nb.hf_login() == "env"
    assert prompts == []
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "hf_secret_value" in p.read_text(errors="ignore")]
    assert written == []
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "stored-token")
    assert nb.hf_login() == "stored" and prompts == []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert nb.hf_login() == "none" and prompts == []  # never stops Run All


def test_hf_login_without_any_token_goes_on_and_says_how(monkeypatch, capsys):
    """Offline, no token: no exception, no prompt; the message names the current login flow."""
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    nb.enable_logging()
    assert nb.hf_login() == "none"
    out = capsys.readouterr().out
    assert "hf auth login" in out and "need no login" in out and "HF_TOKEN" in out


# --------------------------------------------------------------------------- weights


def test_latest_weights_skips_half_written_folders(training_output, tmp_path):
    out_dir = training_output
    assert nb.latest_weights(out_dir) == out_dir / "1500"
    assert nb.latest_weights(f"{out_dir}/") == out_dir / "1500"
    assert nb.latest_weights(tmp_path / "empty") is None
    assert nb.weights_for_step(out_dir, 1000) == out_dir / "1000"
    assert nb.weights_for_step(out_dir, "500") == out_dir / "500"
    for step in (2000, 2500):  # incomplete and .tmp- folders are not weights
        with pytest.raises(UserError, match="Saved steps: 500, 1000, 1500"):
            nb.weights_for_step(out_dir, step)


# --------------------------------------------------------------------------- training launch


def test_build_train_command_flags():
    argv = nb.build_train_command(
        pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
        output_dir=Path("/content/out"), with_prior_preservation=True, train_text_encoder=False,
        max_train_steps=800, learning_rate=1e-6, save_sample_prompt="a photo, -dark", revision=None,
        resume_from_checkpoint="latest")
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    script = argv.index("train_dreambooth.py")
    # without an accelerate config file, the single-process defaults (no "defaults used" lines)
    assert set(argv[3:script]) <= {"--num_processes=1", "--num_machines=1", "--mixed_precision=no",
                                   "--dynamo_backend=no", "--quiet"}
    assert argv[script + 1:] == [
        "--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5",
        "--output_dir=/content/out", "--with_prior_preservation", "--max_train_steps=800",
        "--learning_rate=1e-06", "--save_sample_prompt=a photo, -dark", "--resume_from_checkpoint=latest"]
    argv = nb.build_train_command(script="t.py", launch_args=["--num_processes=2"], validation_prompts=["a", "b"])
    assert argv[3:] == ["--quiet", "--num_processes=2", "t.py", "--validation_prompts", "a", "b"]
    with pytest.raises(ValueError, match="HF_TOKEN"):
        nb.build_train_command(hub_token="hf_abc")


def test_build_train_command_checks_flags_against_the_training_parser():
    with pytest.raises(ValueError, match="did you mean --save_interval"):
        nb.build_train_command(save_intervall=500)
    with pytest.raises(ValueError, match="max_train_steps"):
        nb.build_train_command(max_train_steps="many")
    with pytest.raises(ValueError, match="lr_scheduler"):
        nb.build_train_command(lr_scheduler="sometimes")
    argv = nb.build_train_command(mixed_precision="fp16", use_8bit_adam=True, save_interval=500)
    assert argv[-3:] == ["--mixed_precision=fp16", "--use_8bit_adam", "--save_interval=500"]


def test_train_command_runs_through_accelerate_with_the_same_flags(tmp_path):
    """The argv really launches the script through accelerate, and its parser gets the values."""
    script = tmp_path / "train_echo.py"
    script.write_text(textwrap.dedent("""
        import argparse, json, sys
        p = argparse.ArgumentParser()
        p.add_argument("--output_dir"); p.add_argument("--max_train_steps", type=int)
        p.add_argument("--with_prior_preservation", action="store_true")
        p.add_argument("--save_sample_prompt"); p.add_argument("--center_crop", action="store_true")
        print("ARGS=" + json.dumps(vars(p.parse_args())))
    """))
    argv = nb.build_train_command(
        script=script, launch_args=["--num_processes=1", "--num_machines=1", "--mixed_precision=no",
                                    "--dynamo_backend=no", "--cpu"],
        output_dir=tmp_path / "o", max_train_steps=7, with_prior_preservation=True,
        save_sample_prompt="-x, a photo of zwx", center_crop=False)
    out = io.StringIO()
    assert nb.run_command(argv, cwd=tmp_path, stream=out) == 0
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("ARGS="))
    assert json.loads(line[5:]) == {"output_dir": str(tmp_path / "o"), "max_train_steps": 7,
                                    "with_prior_preservation": True, "center_crop": False,
                                    "save_sample_prompt": "-x, a photo of zwx"}


class HandshakeStream(io.StringIO):
    """Answers the child when it sees "ready": proves output arrives while the child runs."""

    def __init__(self, flag: Path):
        super().__init__()
        self.flag = flag

    def write(self, text):
        if "ready" in text:
            self.flag.write_text("go")
        return super().write(text)


def test_run_command_streams_output_while_the_child_runs(tmp_path):
    flag = tmp_path / "go"
    code = textwrap.dedent(f"""
        import os, sys, time
        print("ready")
        for _ in range(600):  # at most 60 s, then fail: output was not streamed
            if os.path.exists({str(flag)!r}):
                print("done"); sys.exit(0)
            time.sleep(0.1)
        sys.exit(5)
    """)
    stream = HandshakeStream(flag)
    assert nb.run_command([sys.executable, "-c", code], stream=stream) == 0
    assert stream.getvalue().splitlines() == ["ready", "done"]


def test_run_command_merges_stderr_keeps_progress_and_reports_failure(tmp_path):
    code = ("import sys; print('out'); sys.stdout.flush(); print('err', file=sys.stderr); "
            "sys.stderr.flush(); sys.stdout.write('10%\\r50%\\r100%\\r\\n'); "
            "print(open('here.txt').read()); sys.exit(3)")
    (tmp_path / "here.txt").write_text("cwd ok")
    out = io.StringIO()
    assert nb.run_command([sys.executable, "-c", code], cwd=tmp_path, stream=out) == 3
    assert out.getvalue() == "out\nerr\n10%\r50%\r100%\ncwd ok\n"
    with pytest.raises(nb.CommandError, match="exit code 3") as info:
        nb.run_command([sys.executable, "-c", code], cwd=tmp_path, check=True, stream=io.StringIO())
    assert info.value.returncode == 3 and "cwd ok" in str(info.value) and "100%" in str(info.value)


class InterruptOnReady(io.StringIO):
    """Raises KeyboardInterrupt (the notebook's stop button) once the child says "ready"."""

    def write(self, text):
        super().write(text)
        if "ready" in self.getvalue():
            raise KeyboardInterrupt


def process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status or "\nState:\tX" in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_interrupting_run_command_stops_the_whole_process_tree(tmp_path):
    """Stopping a training cell must not leave the processes accelerate started running."""
    import time

    code = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid); print("ready")
        time.sleep(120)
    """)
    stream = InterruptOnReady()
    with pytest.raises(KeyboardInterrupt):
        nb.run_command([sys.executable, "-c", code], stream=stream)
    grandchild = int(stream.getvalue().split()[0])
    for _ in range(100):  # SIGTERM is delivered asynchronously; wait up to 10 s
        if process_gone(grandchild):
            break
        time.sleep(0.1)
    assert process_gone(grandchild)


def test_enable_logging_shows_messages_in_the_cell_once(capsys):
    import logging

    log = logging.getLogger("dbtools")
    saved = (log.level, list(log.handlers), log.propagate)
    try:
        nb.enable_logging()
        nb.enable_logging()
        nb.mount_drive()
        assert capsys.readouterr().out.lower().count("not running in colab") == 1
    finally:
        log.setLevel(saved[0])
        log.handlers[:] = saved[1]
        log.propagate = saved[2]


# --------------------------------------------------------------------------- the facade


def test_every_nb_name_the_notebook_uses_exists():
    """Cells reach dbtools through `nb.<name>`: each name they use is there (no re-export rule
    beyond what the cells need)."""
    import ast

    import nbformat

    notebook = nbformat.read(Path(__file__).resolve().parents[1] / "KaliYuga_DreamBooth.ipynb", as_version=4)
    used = {node.attr for cell in notebook.cells if cell.cell_type == "code"
            for node in ast.walk(compile(cell.source, "<cell>", "exec",  # cells may `await`, as IPython allows
                                         ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nb"}
    assert used and not [name for name in sorted(used) if not hasattr(nb, name)]



# --------------------------------------------------------------------------- cell steps


@pytest.mark.parametrize("colab, skip_env, install, installs", [
    (False, None, True, "not in Colab"), (True, None, True, True), (True, "1", True, "DBTOOLS_SKIP_INSTALL=1"),
    (True, None, False, "install_requirements is off"),
])
def test_setup_installs_requirements_only_in_colab(monkeypatch, capsys, colab, skip_env, install, installs):
    """Installs the project's requirements (wherever the notebook runs from) in Colab only;
    otherwise says the one reason it does not."""
    calls = []
    monkeypatch.setattr(nb, "in_colab", lambda: colab)
    monkeypatch.setattr(nb, "run_command", lambda argv, **kw: calls.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    sys.modules["google.colab"].output = type("output", (),
                                              {"enable_custom_widget_manager": staticmethod(lambda: None)})
    if skip_env:
        monkeypatch.setenv("DBTOOLS_SKIP_INSTALL", skip_env)
    else:
        monkeypatch.delenv("DBTOOLS_SKIP_INSTALL", raising=False)
    assert nb.setup(install) is colab
    assert bool(calls) is (installs is True)
    if installs is True:
        requirements = str(nb.PROJECT_DIR / "requirements.txt")
        assert calls[0][1:] == ["-m", "pip", "install", "-q", "-r", requirements, "gradio>=5"]
        assert Path(requirements).is_file()
    else:
        assert f"Not installing anything ({installs}): using" in capsys.readouterr().out


def test_parse_extra_flags():
    assert nb.parse_extra_flags('--snr_gamma=5 --hflip --n_save_sample 2 --save_sample_prompt "a b"') == {
        "snr_gamma": "5", "hflip": True, "n_save_sample": "2", "save_sample_prompt": "a b"}
    assert nb.parse_extra_flags("") == {}
    with pytest.raises(ValueError, match="'stray'"):
        nb.parse_extra_flags("stray --hflip")


def test_training_command_layers_seed_flags_profile_fields_and_extra_flags(tmp_path):
    argv = nb.training_command("some/model", tmp_path / "out", tmp_path / "c.json",
                               memory_profile="fp32, no memory savings", learning_rate=1e-4, resume=True,
                               pretrained_vae_name_or_path="  ",  # an empty form field
                               extra_flags="--seed=42 --checkpointing_steps 7 --lr_scheduler=cosine")
    args = argv[argv.index("train_dreambooth.py") + 1:]
    assert "--revision=fp16" in args and "--read_prompts_from_txts" in args  # the original notebook's
    assert "--mixed_precision=no" in args and "--use_8bit_adam" not in args  # the profile
    assert "--learning_rate=0.0001" in args and "--resume_from_checkpoint=latest" in args  # the fields
    assert "--seed=42" in args and "--seed=1337" not in args and "--lr_scheduler=cosine" in args  # extra flags
    assert "--checkpointing_steps=7" in args and "--checkpoints_total_limit=1" in args
    assert not [a for a in args if a.startswith("--pretrained_vae_name_or_path")]
    default = nb.training_command("m", tmp_path, tmp_path / "c.json")
    assert "--checkpointing_steps=500" in default and "--gradient_checkpointing" in default
    assert "--pretrained_vae_name_or_path=stabilityai/sd-vae-ft-mse" in default
    with pytest.raises(ValueError, match="seeed"):
        nb.training_command("m", tmp_path, tmp_path / "c.json", extra_flags="--seeed=1")


def test_caption_step_without_images_folder_uses_the_captioned_folder(tmp_path):
    assert nb.caption_step("", str(tmp_path), False) == tmp_path
    with pytest.raises(ValueError, match="images_folder"):
        nb.caption_step("", "", False)


def test_notebook_steps_share_a_session_and_parse_their_fields(tmp_path, training_output):
    session = nb.Session.start("some/model", str(tmp_path / "fresh"), save_to_gdrive=False)
    assert session.output_dir == tmp_path / "fresh" and session.output_dir.is_dir()
    assert session.concepts_list == tmp_path / "fresh" / "concepts_list.json"
    assert nb.parse_steps(" 500, 1000 1500 ") == [500, 1000, 1500] and nb.parse_steps("") is None
    with pytest.raises(nb.UserError, match="not a step number"):
        nb.parse_steps("500, latest")
    with pytest.raises(nb.UserError, match="Pick the weights"):
        nb.export_step(session)
    with pytest.raises(nb.UserError, match="run the training cell first"):
        nb.pick_weights(session, "")
    session.output_dir = training_output
    assert nb.pick_weights(session, "") == training_output / "1500" == session.weights_dir
    assert nb.pick_weights(session, "1000") == training_output / "1000"
    # cleanup keeps the picked weights; without the confirm word it only shows the plan
    assert nb.cleanup_step(session, "500", delete_unexported=True) == []
    assert nb.cleanup_step(session, "", delete_unexported=True, confirm="DELETE") == [
        training_output.resolve() / "500", training_output.resolve() / "1500"]
    assert (training_output / "1000").is_dir()


def test_method_2_without_a_class_prompt_is_refused_when_images_must_be_made(tmp_path, image_factory):
    inst = tmp_path / "inst"
    image_factory(inst / "a red car_1.png")
    common = dict(instance_data_dir=str(inst), captioned_dir=inst, on_drive=False,
                  concepts_list=tmp_path / "c.json", class_data_dir=str(tmp_path / "class"))
    with pytest.raises(nb.UserError, match="Method 2 needs a class_prompt"):
        nb.omnitool_step(method="Method 2: captions with instance and class prompts", instance_prompt="sks", **common)
    assert not (tmp_path / "c.json").exists()
    nb.omnitool_step(method="Method 1: captions only", **common)  # Method 1: fine
    image_factory(tmp_path / "class" / "mine.png")  # the user's own class images: fine too
    nb.omnitool_step(method="Method 2: captions with instance and class prompts", instance_prompt="sks",
                     overwrite=True, **common)
    assert (tmp_path / "c.json").is_file()


def test_pick_weights_defaults_to_the_suggested_step_and_shows_the_curves(tmp_path, training_output,
                                                                          monkeypatch, caplog):
    from dbtools.after.evaluate import append_metrics, summarize, write_summary

    shown = []
    monkeypatch.setattr(nb, "_show", lambda *paths: shown.extend(paths))
    session = nb.Session(model="m", output_dir=training_output)
    assert nb.pick_weights(session, "") == training_output / "1500" and shown == []  # no scores: latest
    records = [{"step": 500, "likeness": 0.4, "prompt_fidelity": 0.30, "validation_loss": 0.2},
               {"step": 1000, "likeness": 0.7, "prompt_fidelity": 0.29, "validation_loss": 0.15},
               {"step": 1500, "likeness": 0.9, "prompt_fidelity": 0.10, "validation_loss": 0.15}]
    for r in records:
        append_metrics(training_output, r)
    summary = summarize(records)
    assert summary["best_step"] == 1000  # step 1500 copies the photos: its fidelity fell
    write_summary(training_output, summary)
    assert nb.pick_weights(session, "") == training_output / "1000" == session.weights_dir
    curves = training_output / "metrics.png"
    assert shown == [curves] and curves.is_file()
    with Image.open(curves) as img:
        assert img.format == "PNG"
    assert nb.pick_weights(session, "1500") == training_output / "1500"  # a typed step wins
    write_summary(training_output, dict(summary, best_step=2000))  # its save was interrupted
    assert nb.pick_weights(session, "") == training_output / "1500"
    assert "suggested step 2000" in caplog.text
