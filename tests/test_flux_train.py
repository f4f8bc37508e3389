"""Flux.1 LoRA DreamBooth on the tiny Flux model, through the entry points users take
(`train_dreambooth.py`'s main, `python -m dbtools generate`): it learns, with and without a
quantized (NF4) base, resumes exactly, and its samples are remade pixel for pixel."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from dbtools.after import generate as G
from dbtools.train import loop as T
from dbtools.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def overfit_set(tmp_path, image_factory):
    """Two captioned 32 px images: a tiny set to overfit."""
    inst = tmp_path / "inst"
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        image_factory(inst / f"toy_{i}.png", size=(32, 32), color=colour)
        (inst / f"toy_{i}.png.txt").write_text(f"a photo of sks toy, number {i}", encoding="utf-8")
    return inst


def flux_config(model, data, out, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(data), output_dir=str(out),
                read_prompts_from_txts=True, resolution=32, train_batch_size=2, max_train_steps=4, seed=3,
                learning_rate=1e-2, lr_warmup_steps=0, report_to="none", use_lora=True, lora_rank=8,
                max_sequence_length=16, save_interval=1000, checkpointing_steps=1000)
    return TrainConfig(**{**base, **kw})


def train_main(cfg: TrainConfig) -> int:
    """`train_dreambooth.py`'s main on the flags `cfg` stands for."""
    argv = []
    for key, value in cfg.__dict__.items():
        if value is True:
            argv.append(f"--{key}")
        elif value not in (None, False) and value != getattr(TrainConfig(), key):
            argv += [f"--{key}", str(value)]
    return T.main(argv)


@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_flux_lora_learns_a_tiny_set(tmp_path, overfit_set, tiny_flux, quantize_base):
    """The held-out loss (the training images, fixed sigmas and noise) falls as LoRA trains."""
    out = tmp_path / "out"
    cfg = flux_config(tiny_flux, overfit_set, out, max_train_steps=60, validation_data_dir=str(overfit_set),
                      validation_steps=10, quantize_base=quantize_base)
    assert train_main(cfg) == 0
    losses = [json.loads(line)["validation_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    assert losses[-1] < 0.9 * losses[0], losses
    lora = load_file(str(out / "60" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert json.loads((out / "60" / "args.json").read_text())["quantize_base"] == quantize_base


def test_flux_resume_repeats_the_unbroken_run(tmp_path, overfit_set, tiny_flux, monkeypatch):
    losses: list[float] = []
    real = T.train_step
    monkeypatch.setattr(T, "train_step", lambda run, step: losses.append(real(run, step)) or losses[-1])
    kw = dict(checkpointing_steps=2, weighting_scheme="logit_normal", quantize_base="nf4", hflip=True)
    full = T.train(flux_config(tiny_flux, overfit_set, tmp_path / "full", **kw))
    unbroken, losses[:] = list(losses), []
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = T.train(flux_config(tiny_flux, overfit_set, resumed_dir, resume_from_checkpoint="latest", **kw))
    assert resumed.resumed_from == resumed_dir / "checkpoint-2" and resumed.global_step == 4
    assert losses == unbroken[2:]
    a, b = (load_file(str(r.weights_dir / "pytorch_lora_weights.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_flux_samples_are_remade_pixel_for_pixel_by_generate(tmp_path, overfit_set, tiny_flux, quantize_base,
                                                             capsys):
    out = tmp_path / "out"
    cfg = flux_config(tiny_flux, overfit_set, out, save_interval=2, save_sample_prompt="a photo of sks toy",
                      n_save_sample=1, save_infer_steps=3, quantize_base=quantize_base)
    assert train_main(cfg) == 0
    sample = out / "4" / "samples" / "0.png"
    settings = G.settings_from_png(sample)
    # FluxPipeline's own guidance (3.5) where --save_guidance_scale is left at Shivam's 7.5.
    assert settings["scheduler"] == "flow_euler" and settings["guidance_scale"] == 3.5 and settings["steps"] == 3
    assert settings.get("quantize_base") == (None if quantize_base == "none" else quantize_base)
    capsys.readouterr()
    assert G.main(["--model", str(out / "4"), "--from_png", str(sample), "--out_dir", str(tmp_path / "gen")]) == 0
    remade = capsys.readouterr().out.strip().splitlines()[-1]
    assert np.array_equal(np.asarray(Image.open(remade)), np.asarray(Image.open(sample)))
    assert G.settings_from_png(remade) == settings


def test_flux_prior_preservation_makes_its_class_images_with_the_flux_pipeline(tmp_path, overfit_set, tiny_flux):
    """Class images come from the base Flux pipeline; caption dropout, shuffled captions,
    buckets and gradient accumulation train as for SD."""
    cls = tmp_path / "class"
    cfg = flux_config(tiny_flux, overfit_set, tmp_path / "out", max_train_steps=2, with_prior_preservation=True,
                      class_prompt="a photo of a toy", class_data_dir=str(cls), num_class_images=2,
                      sample_batch_size=1, caption_dropout=0.5, shuffle_captions=True, gradient_accumulation_steps=2,
                      aspect_ratio_bucketing=True, train_batch_size=1)
    assert train_main(cfg) == 0
    made = sorted(cls.glob("*.jpg"))
    assert len(made) == 2 and Image.open(made[0]).size == (256, 256)  # the tiny pipeline's default size
    assert (tmp_path / "out" / "2" / "pytorch_lora_weights.safetensors").is_file()
