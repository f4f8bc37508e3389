"""SDXL training on the tiny SDXL model: micro-conditioning from what was done to each image."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dbtools.train.data import DataConfig, DataPlan, DreamBoothData, Example, item_time_ids
from tests.conftest import make_captioned, train_config


def test_time_ids_in_a_batch_follow_the_bucket_the_crop_and_the_flip(tmp_path, image_factory):
    wide = [Example(image_factory(tmp_path / "w.png", size=(100, 40)), "wide")]
    # bucketed: 100x40 goes to the 80x48 bucket, resized to cover it (120x48), centre-cropped at x=20
    bucketed = DreamBoothData(DataPlan(wide, []), DataConfig(resolution=64, bucket_step=16,
                                                             aspect_ratio_bucketing=True, seed=3))
    assert bucketed.instance[0].size == (80, 48)
    assert bucketed.micro_batch(0)["instance"]["time_ids"].tolist() == [[40, 100, 0, 20, 48, 80]]
    # square, random crop of the 160x64 resized image; a flip mirrors the crop: 160 - left - 64
    square = DreamBoothData(DataPlan(wide, []), DataConfig(resolution=64, hflip=True, seed=3))
    item = square.instance[0]
    (resized, (left, top)) = item.box
    assert resized == (160, 64) and top == 0 and 0 <= left <= 96
    assert item_time_ids(item, False) == [40, 100, 0, left, 64, 64]
    assert item_time_ids(item, True) == [40, 100, 0, 96 - left, 64, 64]
    seen = {tuple(square.micro_batch(i)["instance"]["time_ids"][0]) for i in range(8)}
    assert seen == {(40, 100, 0, left, 64, 64), (40, 100, 0, 96 - left, 64, 64)}
    assert square.micro_batch(0)["instance"]["time_ids"].dtype == np.float32


def test_a_checkpoint_with_a_trained_second_text_encoder_loads_it(tiny_sdxl, tmp_path):
    import json

    import torch
    from transformers import CLIPTextModelWithProjection

    from dbtools.families.models import load_checkpoint_pipeline

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "optimizer.bin").write_bytes(b"")  # what marks an accelerate checkpoint folder
    (ckpt / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_sdxl)}))
    trained = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2")
    with torch.no_grad():
        trained.text_projection.weight.add_(1.0)
    trained.save_pretrained(ckpt / "text_encoder_2")
    (ckpt / "unet").mkdir()  # the trained UNet: here the base one
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet").save_pretrained(ckpt / "unet")
    pipe = load_checkpoint_pipeline(ckpt)
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, trained.text_projection.weight)


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def sdxl_data(tmp_path_factory):
    """Two captioned instance images of different shapes (they land in different buckets)."""
    return make_captioned(tmp_path_factory.mktemp("sdxl_data") / "inst", sizes=[(96, 48), (64, 64)],
                          colors=[(200, 0, 0), (200, 40, 0)])


SDXL_RUN = dict(resolution=64, max_train_steps=4, save_interval=4, checkpointing_steps=2)
"""The SDXL runs' changes to the tests' training config: 64 px, weights at step 4, a checkpoint at 2."""


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(tiny_sdxl, sdxl_data, tmp_path_factory):
    """Full fine-tune of the UNet and both text encoders, prior preservation with class
    images made by the SDXL pipeline, aspect buckets, flips, min-SNR, offset noise and EMA;
    every UNet call's added conditioning is recorded."""
    from diffusers import UNet2DConditionModel

    from dbtools.train import loop as T

    root = tmp_path_factory.mktemp("sdxl_full")
    calls = []
    real_forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kw):
        if self.training:
            calls.append((tuple(sample.shape), encoder_hidden_states.shape,
                          {k: v.detach().clone() for k, v in (added_cond_kwargs or {}).items()}))
        return real_forward(self, sample, timestep, encoder_hidden_states, *args,
                            added_cond_kwargs=added_cond_kwargs, **kw)

    cfg = train_config(tiny_sdxl, sdxl_data, root / "out", **SDXL_RUN, train_text_encoder=True,
                       with_prior_preservation=True, class_data_dir=str(root / "class"),
                       class_prompt="a photo of a toy", num_class_images=2, sample_batch_size=2,
                       aspect_ratio_bucketing=True, hflip=True, snr_gamma=5.0, offset_noise=True, use_ema=True,
                       caption_dropout=0.2, save_sample_prompt="a photo of sks toy")
    UNet2DConditionModel.forward = recording
    try:
        result = T.train(cfg)
    finally:
        UNet2DConditionModel.forward = real_forward
    return cfg, result, calls


def test_full_fine_tune_trains_the_unet_and_both_text_encoders_with_prior_preservation(full_run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    cfg, result, calls = full_run
    out = Path(cfg.output_dir)
    assert result.weights_dir == out / "4" and result.global_step == 4
    assert len(list(Path(cfg.class_data_dir).glob("*.jpg"))) == 2  # made by the SDXL pipeline
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert changed(tensors(tiny_sdxl / part), tensors(out / "4" / part)), part
    assert (out / "4" / "args.json").is_file() and (out / "4" / "samples" / "0.png").is_file()
    assert (out / "checkpoint-4" / "text_encoder_2").is_dir()
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "4")
    assert pipe.text_encoder_2 is not None
    # every training call got SDXL's added conditioning: pooled embeddings from the second
    # encoder's projection (32 wide) and six time ids per sample
    assert calls and all(set(added) == {"text_embeds", "time_ids"} for _, _, added in calls)
    for shape, states, added in calls:
        assert added["text_embeds"].shape == (shape[0], 32) and added["time_ids"].shape == (shape[0], 6)
        assert states[-1] == 96  # both encoders' hidden states side by side (32 + 64)


def test_time_ids_in_training_match_each_images_bucket_and_crop(full_run, tiny_sdxl):
    """The ids the UNet got in training are each image's original size, the crop made to
    fit its bucket (mirrored when flipped) and the size trained on (`item_time_ids`)."""
    import json

    from dbtools.train.data import DataConfig, DataPlan, DreamBoothData, Example, item_time_ids

    cfg, _, calls = full_run
    vae_scale = 2 ** (len(json.loads((tiny_sdxl / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    unet_levels = len(json.loads((tiny_sdxl / "unet" / "config.json").read_text())["block_out_channels"])
    plan = DataPlan([Example(p, "") for p in sorted(Path(cfg.instance_data_dir).glob("*.png"))],
                    [Example(p, "", True) for p in sorted(Path(cfg.class_data_dir).glob("*.jpg"))])
    data = DreamBoothData(plan, DataConfig(resolution=64, bucket_step=vae_scale * 2 ** (unet_levels - 1),
                                           aspect_ratio_bucketing=True, seed=3))
    expected = {tuple(item_time_ids(it, flip)) for it in data.all_items() for flip in (False, True)}
    wide = next(it for it in data.instance if it.original == (96, 48))
    assert wide.size[0] > wide.size[1] and wide.box[1] != (0, 0)  # bucketed and cropped
    seen = set()
    for shape, _, added in calls:
        for row in added["time_ids"].tolist():
            ids = tuple(int(v) for v in row)
            assert ids[4:] == (shape[2] * vae_scale, shape[3] * vae_scale)  # the size trained on
            seen.add(ids)
    assert seen <= expected
    assert any(ids[:2] == (48, 96) and ids[2:4] != (0, 0) for ids in seen)  # the wide image, cropped


def test_resume_matches_the_uninterrupted_run(full_run, tmp_path, tiny_sdxl):
    from dbtools.train import loop as T

    cfg, result, _ = full_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(Path(cfg.output_dir) / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = T.train(dataclasses.replace(cfg, output_dir=str(resumed_dir), resume_from_checkpoint="latest"))
    assert resumed.global_step == 4 and resumed.resumed_from == resumed_dir / "checkpoint-2"
    for part in ("unet", "text_encoder", "text_encoder_2"):
        a, b = tensors(result.weights_dir / part), tensors(resumed.weights_dir / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_lora_run_saves_a_diffusers_lora_and_a_kohya_file_and_generates(tiny_sdxl, sdxl_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from dbtools.after.generate import generate_images
    from dbtools.train import loop as T

    cfg = train_config(tiny_sdxl, sdxl_data, tmp_path / "lora", resolution=64, use_lora=True, train_text_encoder=True,
                       save_single_file=True, lora_rank=2, max_train_steps=2, save_interval=2,
                       checkpointing_steps=None, validation_split=0.5)
    result = T.train(cfg)
    folder = result.weights_dir
    metrics = (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()
    assert "validation_loss" in metrics[-1]  # the held-out image's loss, with SDXL's conditioning
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and not (folder / "unet").exists()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(folder))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(str(result.single_file))
    assert result.single_file == folder / "lora-2-lora.safetensors"  # <output folder name>-<step>-lora
    from dbtools.after.kohya import read_metadata

    assert read_metadata(result.single_file)["ss_base_model_version"] == "sdxl_base_v1-0"
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    assert all(v.item() == 2 for k, v in kohya.items() if k.endswith(".alpha"))
    images = generate_images(str(folder), "a photo of sks toy", num_images=1, steps=2, height=64, width=64, seed=1)
    assert len(images) == 1 and images[0].size == (64, 64)


class _Stop(Exception):
    pass


def test_the_command_line_trains_at_the_family_native_size_unless_told(tiny_sdxl, sdxl_data, tmp_path, monkeypatch,
                                                                     caplog):
    """Without --resolution SDXL trains at 1024 px (not SD 1.x's 512); a given size wins, and
    one far below the native size gets one warning line."""
    import logging

    from dbtools.train import loop as T

    seen = []

    def stop(cfg):
        seen.append(cfg.resolution)
        raise _Stop

    monkeypatch.setattr(T, "preflight", stop)
    argv = [f"--pretrained_model_name_or_path={tiny_sdxl}", f"--instance_data_dir={sdxl_data}",
            f"--output_dir={tmp_path / 'out'}", "--report_to=none"]
    for extra in ([], ["--resolution=896"], ["--resolution=512"]):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dbtools"), pytest.raises(_Stop):
            T.main(argv + extra)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == (1 if extra == ["--resolution=512"] else 0), warnings
    assert seen == [1024, 896, 512]
    assert "--resolution 512 is far below the 1024 px" in warnings[0]


@pytest.mark.slow
def test_sdxl_text_encoder_lora_trains_on_two_processes_with_no_dead_adapters(tiny_sdxl, sdxl_data, tmp_path):
    """SDXL conditions on the penultimate hidden states: text encoder 1's last layer never
    reaches the loss. Trained, it stopped a 2-process run at step 2 (DDP waits for its
    gradient) and its adapters were saved as zeros; now it gets none."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(root / "train_dreambooth.py"),
         f"--pretrained_model_name_or_path={tiny_sdxl}", f"--instance_data_dir={sdxl_data}",
         "--read_prompts_from_txts", f"--output_dir={out}", "--resolution=64", "--train_batch_size=1",
         "--max_train_steps=3", "--seed=1", "--report_to=none", "--use_lora", "--lora_rank=2",
         "--train_text_encoder", "--learning_rate=1e-3", "--lr_warmup_steps=0", "--checkpointing_steps=2"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
             "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training on 2 process(es)" in proc.stderr
    assert proc.stderr.count("latents: 1 encoded, 0 read") == 2  # each process encoded one of the two images
    adapters = load_file(str(out / "3" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in adapters} == {"unet", "text_encoder", "text_encoder_2"}
    assert [k for k, v in adapters.items() if not v.abs().sum() > 0] == []  # no adapter left at zero
    last = f"encoder.layers.{_layers(tiny_sdxl) - 1}."
    assert not [k for k in adapters if k.startswith("text_encoder.") and last in k]
    assert [k for k in adapters if k.startswith("text_encoder.") and f"encoder.layers.{_layers(tiny_sdxl) - 2}." in k]
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()


def _layers(model: Path) -> int:
    import json

    return json.loads((model / "text_encoder" / "config.json").read_text())["num_hidden_layers"]


def test_sdxl_full_text_encoder_training_freezes_what_never_reaches_the_loss(tiny_sdxl, sdxl_data, tmp_path):
    from types import SimpleNamespace

    from dbtools.train import setup as S

    cfg = train_config(tiny_sdxl, sdxl_data, tmp_path / "out", **SDXL_RUN, train_text_encoder=True)
    models = S.load_models(cfg)
    params = S.prepare_modules(cfg, models, SimpleNamespace(device=torch.device("cpu")), torch.float32)
    text_model = getattr(models.text_encoder, "text_model", models.text_encoder)
    frozen = {id(p) for part in (text_model.encoder.layers[-1], text_model.final_layer_norm)
              for p in part.parameters()}
    assert frozen and not frozen & {id(p) for p in params}
    assert all(p.requires_grad for p in text_model.encoder.layers[0].parameters())
    assert all(p.requires_grad for p in models.text_encoder_2.parameters())  # its last layer makes the pooled embedding
