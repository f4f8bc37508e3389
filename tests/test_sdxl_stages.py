"""SDXL through the stages that need no training: class images, generate, preview, `tiny`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from dbtools.dataset.concepts import Concept
from dbtools.train.classgen import (
    ClassGenConfig,
    count_valid_class_images,
    ensure_class_images,
    pipeline_loader_for,
)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl):
    from dbtools.families.models import load_pipeline

    return load_pipeline(str(tiny_sdxl), device="cpu")


def test_class_images_from_an_sdxl_model(tiny_sdxl, tmp_path):
    folder = tmp_path / "class"
    cfg = ClassGenConfig(num_class_images=2, sample_batch_size=2, seed=3, num_inference_steps=1,
                         class_guidance_scale=5.0, negative_prompt="blurry", show_progress=False)
    loader = pipeline_loader_for(str(tiny_sdxl), cfg, device="cpu")
    made = ensure_class_images([Concept(instance_data_dir="", class_prompt="a photo of a dog",
                                        class_data_dir=str(folder))], cfg, loader)
    assert made == {str(folder): 2} and count_valid_class_images(folder) == 2
    with Image.open(sorted(folder.iterdir())[0]) as img:
        assert img.size == (64, 64)  # the model's native size: UNet sample size x VAE factor


def test_generate_with_an_sdxl_model_saves_its_settings(sdxl_pipe, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from dbtools.after import generate as G

    assert isinstance(sdxl_pipe, StableDiffusionXLPipeline)
    paths = G.generate_images(sdxl_pipe, "a red car", negative_prompt="blurry", num_images=2, steps=1,
                              seed=4, out_dir=tmp_path / "gen")
    settings = G.read_png_settings(paths[0])
    assert (settings["seed"], settings["width"], settings["height"]) == (4, 64, 64)
    # a path is loaded as an SDXL pipeline too; the same seed gives the same image (up to one
    # grey level: a batch of two and a batch of one round differently)
    again = G.generate(str(tiny_sdxl), "a red car", negative_prompt="blurry", steps=1, seed=4)[0]
    with Image.open(paths[0]) as first:
        diff = np.abs(np.asarray(again.image.convert("RGB"), np.int16) - np.asarray(first.convert("RGB"), np.int16))
    assert diff.max() <= 1


def test_preview_finds_sdxl_step_folders(tiny_sdxl, tmp_path, image_factory):
    from dbtools.after.preview import run_preview
    from dbtools.train.checkpoints import list_weights

    out = tmp_path / "out"
    step = shutil.copytree(tiny_sdxl, out / "500")
    image_factory(step / "samples" / "0.png", size=(64, 64))
    assert list_weights(out) == [(500, step)]
    assert run_preview(out).is_file()


def test_tiny_command_writes_an_sdxl_pipeline(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from dbtools import tiny

    built = {}
    others = [n for n in dir(tiny) if n.startswith("build_tiny_") and n != "build_tiny_sdxl"]
    for name in others:  # only the SDXL model is built here
        monkeypatch.setattr(tiny, name, lambda out, *a, _n=name, **k: built.setdefault(_n, out))
    assert tiny.main(["--out", str(tmp_path)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.text_encoder_2.config.projection_dim == 32
