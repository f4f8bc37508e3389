"""The paths users coming from the original notebook, Shivam's script and diffusers' script
take: Method 1 (no prompts, a class folder), Shivam's output layout with the original
notebook's follow-up cells, and diffusers' flags and layout."""

from __future__ import annotations

import os
from glob import glob
from pathlib import Path

import pytest

from dbtools.dataset.concepts import Concept
from dbtools.train import loop as T
from dbtools.train.config import TrainConfig, flag_problems, parse_args
from dbtools.train.data import concept_class_examples


@pytest.fixture
def method1_data(tmp_path, captioned_factory):
    """Captioned instance images (Method 1: captions only, no prompts)."""
    return captioned_factory(tmp_path / "inst", colors=[(200, 0, 0), (0, 200, 0)], name="a red car_{i}.png",
                             caption="a red car number {i}")


def method1_flags(model, inst, klass, out, *extra) -> list[str]:
    """The original notebook's Method 1: prior preservation, no instance or class prompt."""
    return [f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={inst}",
            f"--class_data_dir={klass}", f"--output_dir={out}", "--with_prior_preservation",
            "--read_prompts_from_txts", "--num_class_images=2", "--sample_batch_size=2", "--resolution=32",
            "--train_batch_size=1", "--max_train_steps=2", "--seed=3", "--learning_rate=1e-3",
            "--lr_warmup_steps=0", "--report_to=none", "--save_infer_steps=1", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_class_images_use_their_own_caption_file_else_the_empty_class_prompt(tmp_path, image_factory):
    klass = tmp_path / "class"
    captioned = image_factory(klass / "0.jpg")
    image_factory(klass / "1.jpg")
    Path(f"{captioned}.txt").write_text("a dog on grass", encoding="utf-8")
    concept = Concept("", class_prompt="", class_data_dir=str(klass))
    prompts = {e.path.name: e.prompt for e in concept_class_examples(concept, read_prompts_from_txts=True)}
    assert prompts == {"0.jpg": "a dog on grass", "1.jpg": ""}
    without = {e.path.name: e.prompt for e in concept_class_examples(concept)}
    assert without == {"0.jpg": "", "1.jpg": ""}


def test_method1_with_the_users_class_images_leaves_them_untouched(tmp_path, method1_data, tiny_sd, image_factory):
    """The user's own regularization images are used as they are; Shivam's layout; the
    original notebook's follow-up cells (natsorted glob pick, int step, from_pretrained,
    converter flags) work on the output."""
    from diffusers import StableDiffusionPipeline
    from natsort import natsorted

    from dbtools.after.export import main as convert

    klass, out = tmp_path / "class", tmp_path / "out"
    for i in range(2):
        image_factory(klass / f"mine_{i}.png", size=(40, 40), color=(10 * i, 90, 90))
    before = snapshot(klass)
    code = T.main(method1_flags(tiny_sd, method1_data, klass, out, "--lr_scheduler=piecewise_constant",
                                "--lr_step_rules=1:1,0.5", "--validation_scheduler=DPMSolverMultistepScheduler"))
    assert code == 0
    assert snapshot(klass) == before
    # Shivam's layout by default: no checkpoint-* folder without --checkpointing_steps
    assert not list(out.glob("checkpoint-*"))

    # the original notebook's follow-up cells, as code
    weights_dir = natsorted(glob(str(out) + os.sep + "*"))[-1]
    step = int(Path(weights_dir).name)
    assert step == 2
    pipe = StableDiffusionPipeline.from_pretrained(weights_dir, safety_checker=None)
    assert pipe.unet.config.sample_size == StableDiffusionPipeline.from_pretrained(tiny_sd).unet.config.sample_size
    ckpt = tmp_path / "model.ckpt"
    assert convert(["--model_path", weights_dir, "--checkpoint_path", str(ckpt), "--half"]) == 0
    assert ckpt.stat().st_size > 0


def test_method1_with_an_empty_class_folder_generates_images_and_diffusers_layout(
        tmp_path, method1_data, tiny_sd, caplog):
    from diffusers import StableDiffusionPipeline

    klass, out = tmp_path / "class", tmp_path / "out"
    klass.mkdir()
    with caplog.at_level("WARNING"):
        code = T.main(method1_flags(tiny_sd, method1_data, klass, out, "--output_layout=diffusers",
                                    "--checkpointing_steps=1", "--lr_scheduler=cosine_with_restarts"))
    assert code == 0
    assert len(list(klass.glob("*.jpg"))) == 2
    assert [r for r in caplog.records if "class prompt is empty" in r.getMessage()]
    # diffusers' layout: the final pipeline in output_dir itself, checkpoints beside it
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.text_encoder is not None and not (out / "2").exists()
    assert (out / "checkpoint-2").is_dir() and (out / "args.json").is_file()
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(out / "checkpoint-2" / "unet").config.sample_size == \
        pipe.unet.config.sample_size  # diffusers' documented way to use a checkpoint
    # generate accepts the checkpoint folder too
    from dbtools.after.generate import main as generate
    from dbtools.after.generate import read_png_settings

    assert generate(["--model", str(out / "checkpoint-2"), "--prompt", "a red car", "--steps", "1",
                     "--seed", "4", "--out_dir", str(tmp_path / "gen")]) == 0
    assert read_png_settings(next((tmp_path / "gen").glob("*-4.png")))["seed"] == 4


def test_diffusers_flags_are_accepted_or_explained():
    args = parse_args(["--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:10,0.1",
                       "--validation_scheduler", "ddim", "--skip_save_text_encoder",
                       "--validation_images", "a.png", "b.png", "--class_labels_conditioning", "timesteps"])
    cfg = TrainConfig.from_args(args)
    assert cfg.checkpointing_steps is None and cfg.output_layout == "shivam"
    text = "\n".join(flag_problems(cfg))
    assert "--validation_images is for DeepFloyd IF" in text
    assert "--class_labels_conditioning is for DeepFloyd IF" in text
    assert "lr_" not in text
    no_rules = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d",
                           lr_scheduler="piecewise_constant")
    assert any("--lr_step_rules" in p for p in flag_problems(no_rules))


def test_skip_save_text_encoder_saves_a_pipeline_without_it(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from dbtools.train.outputs import _save_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    _save_pipeline(pipe, tmp_path / "w", skip_text_encoder=True)
    assert (tmp_path / "w" / "unet").is_dir() and not (tmp_path / "w" / "text_encoder").exists()
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "w", text_encoder=pipe.text_encoder)
    assert loaded.text_encoder is pipe.text_encoder
