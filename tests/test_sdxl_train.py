"""SDXL training on the tiny SDXL model: micro-conditioning from what was done to each image."""

from __future__ import annotations

import numpy as np

from dbtools.data import DataConfig, DataPlan, DreamBoothData, Example, item_time_ids


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

    from dbtools.models import load_checkpoint_pipeline

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
