"""`python -m dbtools demo`: the whole journey on tiny models, offline."""

from __future__ import annotations

import json

from diffusers import StableDiffusionPipeline
from PIL import Image

from dbtools.dataset.images import list_images
from dbtools.demo import DemoConfig, run_demo


def test_demo_runs_every_stage_and_reports_its_outputs(tmp_path, capsys):
    out = run_demo(DemoConfig(out=str(tmp_path / "demo"), steps=2))

    raw = list_images(out["images"])
    captioned = list_images(out["captioned"])
    assert len(raw) == len(captioned) == 6
    assert all(p.name.startswith("IMG_") for p in raw)  # originals untouched
    for image in captioned:
        prompt = (image.parent / f"{image.name}.txt").read_text(encoding="utf-8")
        assert prompt.startswith("sks style, ") and prompt.endswith(", a painting")

    concepts = json.loads(out["concepts_list"].read_text())
    assert concepts[0]["instance_data_dir"] == str(out["captioned"])
    assert len(list_images(out["class_images"])) == 4

    assert out["weights"].name == "2" and (out["weights"] / "model_index.json").is_file()
    assert len(list((out["weights"] / "samples").glob("*.png"))) == 2
    pipe = StableDiffusionPipeline.from_single_file(
        str(out["single_file"]), config=str(out["weights"]), local_files_only=True)
    assert pipe.unet.config.sample_size == 8
    assert Image.open(out["preview"]).size[0] > 0

    printed = capsys.readouterr().out
    assert "tiny and random" in printed
    [preview_line] = [line for line in printed.splitlines() if "preview grid" in line]
    assert "samples are noise" in preview_line and "tiny random models" in preview_line


def test_zero_steps_is_a_clear_message_before_anything_is_written(tmp_path, capsys):
    from dbtools.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps 0" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()
