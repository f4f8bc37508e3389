"""The Python side of the notebook's cells (`dbtools.notebook`)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbtools import notebook as nb

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
    caplog.set_level("INFO", logger="dbtools.notebook")
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
    assert nb.hf_login() == "prompt" and len(prompts) == 1


# --------------------------------------------------------------------------- weights


def make_weights(root: Path, name: str, complete: bool = True) -> Path:
    folder = root / name
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    if complete:
        (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture
def out_dir(tmp_path) -> Path:
    root = tmp_path / "out"
    for step in ("500", "1000", "1500"):
        make_weights(root, step)
    make_weights(root, ".tmp-2500-x")  # a save in progress
    make_weights(root, "2000", complete=False)  # interrupted save
    make_weights(root, "checkpoint-1500")
    (root / "checkpoint-1500" / "optimizer.bin").write_bytes(b"o")
    (root / "0" / "logs").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"exported")
    return root


def test_latest_weights_skips_half_written_folders(out_dir, tmp_path):
    assert nb.latest_weights(out_dir) == out_dir / "1500"
    assert nb.latest_weights(f"{out_dir}/") == out_dir / "1500"
    assert nb.latest_weights(tmp_path / "empty") is None
    assert nb.weights_for_step(out_dir, 1000) == out_dir / "1000"
    assert nb.weights_for_step(out_dir, "500") == out_dir / "500"
    for step in (2000, 2500):  # incomplete and .tmp- folders are not weights
        with pytest.raises(FileNotFoundError, match="Saved steps: 500, 1000, 1500"):
            nb.weights_for_step(out_dir, step)


# --------------------------------------------------------------------------- training launch


def test_build_train_command_flags():
    argv = nb.build_train_command(
        pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
        output_dir=Path("/content/out"), with_prior_preservation=True, train_text_encoder=False,
        max_train_steps=800, learning_rate=1e-6, save_sample_prompt="a photo, -dark", revision=None,
        resume_from_checkpoint="latest")
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert argv[3] == "train_dreambooth.py"
    assert argv[4:] == [
        "--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5",
        "--output_dir=/content/out", "--with_prior_preservation", "--max_train_steps=800",
        "--learning_rate=1e-06", "--save_sample_prompt=a photo, -dark", "--resume_from_checkpoint=latest"]
    argv = nb.build_train_command(script="t.py", launch_args=["--num_processes=2"], validation_prompts=["a", "b"])
    assert argv[3:] == ["--num_processes=2", "t.py", "--validation_prompts", "a", "b"]
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


# --------------------------------------------------------------------------- caption editor


@pytest.fixture
def photos(tmp_path, image_factory) -> Path:
    folder = tmp_path / "photos"
    for i in range(10):
        image_factory(folder / f"img{i}.png", size=(40, 30), color=(20 * i, 0, 0))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_editor_pages(photos):
    ed = nb.CaptionEditor(photos, page_size=4)
    assert ed.n_pages == 3
    assert [p.name for p, _ in ed.page(0)] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert [p.name for p, _ in ed.page(2)] == ["img8.png", "img9.png"]
    assert ed.items == [(photos / "img8.png", ""), (photos / "img9.png", "")]
    with pytest.raises(IndexError):
        ed.page(3)


@pytest.mark.parametrize("fmt, caption_file", [
    ("sidecar", "img1.png.txt"), ("txt", "img1.txt"), ("caption", "img1.caption")])
def test_editor_edits_and_saves_caption_files(photos, fmt, caption_file):
    (photos / caption_file.replace("img1", "img2")).write_text("old caption\n")
    ed = nb.CaptionEditor(photos, fmt=fmt, page_size=4)
    items = dict(ed.page(0))
    assert items[photos / "img2.png"] == "old caption"
    ed.set_caption(photos / "img1.png", "  a red  square\non grey ")
    ed.set_caption(photos / "img2.png", "old caption")  # unchanged: not rewritten
    ed.set_caption(photos / "img9.png", "on another page")
    assert dict(ed.items)[photos / "img1.png"] == "  a red  square\non grey "
    written = ed.save()
    other = caption_file.replace("img1", "img9")
    assert sorted(written) == sorted([photos / caption_file, photos / other])
    assert (photos / caption_file).read_text() == "a red square on grey\n"
    assert (photos / other).read_text() == "on another page\n"
    assert not [p for p in photos.iterdir() if p.name.startswith(".tmp-")]
    assert ed.save() == []  # nothing pending any more
    assert dict(nb.CaptionEditor(photos, fmt=fmt).page(0))[photos / "img1.png"] == "a red square on grey"
    with pytest.raises(KeyError):
        ed.set_caption(photos / "notes.txt", "x")


def test_editor_filename_format_renames_without_overwriting(photos, image_factory):
    from dbtools.autocaption import undo_renames

    image_factory(photos / "a red car_0.png", size=(40, 30))
    before = (photos / "img3.png").read_bytes()
    ed = nb.CaptionEditor(photos, fmt="filename", page_size=4)
    assert dict(ed.page(0))[photos / "a red car_0.png"] == "a red car"
    ed.set_caption(photos / "img3.png", "a red car")
    ed.set_caption(photos / "img4.png", "a/red: car?")
    ed.set_caption(photos / "img5.png", "img5")  # same as its name: no rename
    written = ed.save()
    assert [p.name for p in written] == ["a red car_1.png", "a red car_2.png"]
    assert (photos / "a red car_1.png").read_bytes() == before
    assert (photos / "a red car_0.png").exists() and not (photos / "img3.png").exists()
    assert (photos / "img5.png").exists()
    assert photos / "a red car_1.png" in ed.images and photos / "img3.png" not in ed.images
    logs = list((photos / ".dbtools").glob("renames-*.jsonl"))
    assert len(logs) == 1
    records = [json.loads(line) for line in logs[0].read_text().splitlines()]
    assert records == [{"from": "img3.png", "to": "a red car_1.png"},
                       {"from": "img4.png", "to": "a red car_2.png"}]
    undo_renames(logs[0])  # the captioner's undo reverses the editor's renames
    assert (photos / "img3.png").read_bytes() == before and (photos / "img4.png").exists()


def test_editor_makes_thumbnails_lazily_and_caches_them(photos, monkeypatch):
    loads = []
    import dbtools.images

    real = dbtools.images.load_rgb
    monkeypatch.setattr(dbtools.images, "load_rgb", lambda p, *a, **k: loads.append(Path(p).name) or real(p, *a, **k))
    ed = nb.CaptionEditor(photos, page_size=4, thumb=32)
    assert not (photos / ".dbtools").exists()  # the constructor writes nothing
    ed.page(1)
    assert sorted(loads) == ["img4.png", "img5.png", "img6.png", "img7.png"]
    thumbs = sorted(ed.thumbs_dir.glob("*.jpg"))
    assert len(thumbs) == 4
    with Image.open(thumbs[0]) as t:
        assert max(t.size) == 32
    loads.clear()
    ed.page(1)
    nb.CaptionEditor(photos, page_size=4, thumb=32).page(1)  # a new editor reuses the cache
    assert loads == []
    Image.new("RGB", (50, 50), "blue").save(photos / "img5.png")  # changed image -> new thumbnail
    ed.page(1)
    assert loads == ["img5.png"]


def test_editor_widget_on_a_large_folder(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1200):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / f"{i}.png")
    Image.new("RGB", (8, 8)).save(folder / "zz_broken.png")
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ed = nb.CaptionEditor(folder, page_size=24, thumb=32)
    box = ed.widget
    grid = ed._ui["grid"]
    assert len(grid.children) == 24 and ed.n_pages == 51
    assert len(list(ed.thumbs_dir.iterdir())) == 24  # only the page shown
    ed._ui["next"].click()
    assert ed.current_page == 1 and len(list(ed.thumbs_dir.iterdir())) == 48
    area = ed._ui["areas"][folder / "24.png"]
    area.value = "typed in the browser"
    assert ed.pending == {folder / "24.png": "typed in the browser"}
    ed.set_caption(folder / "25.png", "set from python")
    assert ed._ui["areas"][folder / "25.png"].value == "set from python"
    ed._ui["save"].click()
    assert (folder / "24.png.txt").read_text() == "typed in the browser\n"
    assert (folder / "25.png.txt").read_text() == "set from python\n"
    assert "Saved 2" in ed._ui["status"].value
    ed.page(ed.n_pages - 1)  # the unreadable image gets a placeholder, not an exception
    assert [p.name for p, _ in ed.items][-1] == "zz_broken.png"
    assert box is ed.widget


# --------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd):
    from dbtools.models import load_pipeline

    return load_pipeline(str(tiny_sd), device="cpu")


def test_generate_images_saves_settings_in_png_metadata(tiny_pipe, tmp_path):
    out = tmp_path / "gen"
    paths = nb.generate_images(tiny_pipe, "a photo of zwx", negative_prompt="blurry", num_images=2,
                               guidance_scale=5.0, steps=2, seed=11, scheduler="euler", out_dir=out)
    assert [p.name for p in paths] == ["00000-11.png", "00001-12.png"]
    settings = nb.read_png_settings(paths[1])
    assert settings == {"prompt": "a photo of zwx", "negative_prompt": "blurry", "seed": 12, "steps": 2,
                        "guidance_scale": 5.0, "scheduler": "euler", "width": 64, "height": 64,
                        "model": str(tiny_pipe.name_or_path)}
    with Image.open(paths[1]) as img:
        params = img.info["parameters"]
        second = np.asarray(img.convert("RGB"))
    assert params.startswith("a photo of zwx\nNegative prompt: blurry\nSteps: 2, Sampler: euler")
    assert "Seed: 12, Size: 64x64" in params
    # image i is reproduced by its own seed alone
    again = nb.generate_images(tiny_pipe, "a photo of zwx", negative_prompt="blurry", num_images=1,
                               guidance_scale=5.0, steps=2, seed=12, scheduler="euler", out_dir=out)
    assert again[0].name == "00002-12.png"  # never replaces an earlier image
    with Image.open(again[0]) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), second)
    images = nb.generate_images(tiny_pipe, "x", steps=1, seed=1)
    assert isinstance(images[0], Image.Image) and len(list(out.iterdir())) == 3


def test_generate_images_rejects_bad_settings_before_loading(tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        nb.generate_images(tmp_path / "no-model", "x", height=100)
    with pytest.raises(ValueError, match="at least 1 image"):
        nb.generate_images(tmp_path / "no-model", "x", num_images=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradio_app_answers_one_request(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    app = nb.build_gradio_app(tiny_pipe, out_dir=tmp_path / "gradio")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               share=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, saved = client.predict("a photo of zwx", "", 1, 7.5, 2, 64, 64, 3, "ddim",
                                        api_name="/generate")
    finally:
        app.close()
    assert len(gallery) == 1 and gallery[0]["caption"] == "seed 3"
    with Image.open(gallery[0]["image"]) as img:
        assert img.size == (64, 64)
    saved_path = Path(saved.strip())
    assert saved_path.parent == tmp_path / "gradio"
    assert nb.read_png_settings(saved_path)["scheduler"] == "ddim"
    assert nb.read_png_settings(saved_path)["seed"] == 3


# --------------------------------------------------------------------------- cleanup


def test_cleanup_keeps_chosen_and_unexported_weights(out_dir):
    plan = nb.cleanup_plan(out_dir, keep=[out_dir / "1500"], exported=[out_dir / "1000", out_dir / "1500"])
    assert plan.delete == [out_dir.resolve() / "1000"]
    assert plan.kept == {out_dir.resolve() / "500": "not exported yet",
                         out_dir.resolve() / "1500": "chosen to keep"}
    assert plan.checkpoints == [out_dir.resolve() / "checkpoint-1500"] and plan.targets == plan.delete
    text = nb.describe(plan)
    assert "- 1000" in text and "500 (not exported yet)" in text and "checkpoint-1500" in text
    # nothing is deleted without the confirm word
    assert nb.run_cleanup(plan, "") == [] and nb.run_cleanup(plan, "yes") == []
    assert (out_dir / "1000" / "model_index.json").exists()
    assert nb.run_cleanup(plan, " DELETE ") == [out_dir.resolve() / "1000"]
    assert sorted(p.name for p in out_dir.iterdir()) == [
        ".tmp-2500-x", "0", "1500", "2000", "500", "checkpoint-1500", "model.safetensors"]


def test_cleanup_handles_trailing_slashes_and_never_touches_the_output_dir(out_dir):
    s = str(out_dir)
    plan = nb.cleanup_plan(s + "/", keep=[s + "/1500/"], exported=[s + "/", s + "/500/", s + "/1000//"],
                           delete_unexported=True, delete_checkpoints=True)
    root = out_dir.resolve()
    assert plan.output_dir == root and root not in plan.targets
    assert plan.delete == [root / "500", root / "1000"]
    assert nb.run_cleanup(plan, "DELETE") == [root / "500", root / "1000", root / "checkpoint-1500"]
    assert out_dir.is_dir() and (out_dir / "1500" / "model_index.json").exists()
    assert (out_dir / "model.safetensors").read_bytes() == b"exported"
    assert (out_dir / "2000").exists() and (out_dir / ".tmp-2500-x").exists()


def test_cleanup_keeping_the_output_dir_keeps_everything(out_dir):
    plan = nb.cleanup_plan(out_dir, keep=[f"{out_dir}/"], delete_unexported=True)
    assert plan.delete == [] and len(plan.kept) == 3


def test_cleanup_never_deletes_outside_or_through_links(out_dir, tmp_path):
    outside = make_weights(tmp_path, "999")
    os.symlink(outside, out_dir / "3000")
    exported = [outside, out_dir / "3000", out_dir / "500" / "model.safetensors", out_dir / "500"]
    plan = nb.cleanup_plan(out_dir, keep=[], exported=exported, delete_unexported=False)
    root = out_dir.resolve()
    assert plan.delete == []
    assert plan.kept[root / "3000"] == "a link (never followed)"
    assert plan.kept[root / "500"] == "contains an exported file"
    # a plan edited by hand still cannot reach outside the output folder
    plan.delete = [outside, root, root / "3000", root / "0" / "logs"]
    assert nb.run_cleanup(plan, "DELETE") == []
    assert outside.exists() and (out_dir / "3000").is_symlink() and (out_dir / "0" / "logs").exists()
    with pytest.raises(FileNotFoundError, match="OUTPUT_DIR"):
        nb.cleanup_plan(tmp_path / "missing", keep=[], exported=[])


def test_cleanup_keeps_folders_holding_a_single_file_export(out_dir):
    (out_dir / "500" / "model.ckpt").write_bytes(b"exported into the weights folder")
    (out_dir / "1000" / "pytorch_lora_weights.safetensors").write_bytes(b"lora weights, not an export")
    plan = nb.cleanup_plan(out_dir, keep=[], exported=[out_dir / "500", out_dir / "1000"])
    root = out_dir.resolve()
    assert plan.delete == [root / "1000"]
    assert plan.kept[root / "500"] == "contains the single file model.ckpt"
