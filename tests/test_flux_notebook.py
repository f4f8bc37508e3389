"""The notebook with a Flux.1 model: the memory estimate and profiles know Flux.1, and the
training cell's `auto` fields follow it."""

from __future__ import annotations

import pytest

from dbtools.families.profiles import (
    FLUX_LORA_BF16,
    FLUX_LORA_INT8,
    FLUX_LORA_NF4,
    GIB,
    MEMORY_PROFILES,
    estimate_training_memory,
    fit_warning,
    recommended_profile,
)

TRANSFORMER, CLIP_L, T5_XXL = 11_901_408_320, 123_060_480, 4_762_310_656  # Flux.1 [dev]'s parameters
LORA_PER_RANK = 1_167_360  # q/k/v/out of the 19 double blocks' image stream, q/k/v of the 38 single blocks


def flux(profile, **flags):
    return estimate_training_memory("flux1", {**MEMORY_PROFILES[profile], "resolution": 1024, "lora_rank": 16,
                                              **flags})


def test_flux_estimate_counts_the_transformer_as_quantized_and_the_encoders_as_gone():
    nf4, int8, bf16 = flux(FLUX_LORA_NF4), flux(FLUX_LORA_INT8), flux(FLUX_LORA_BF16)
    adapters = 16 * LORA_PER_RANK * 4
    assert nf4.parts["weights"] == pytest.approx((TRANSFORMER * 0.53 + adapters) / GIB)
    assert int8.parts["weights"] == pytest.approx((TRANSFORMER * 1.0 + adapters) / GIB)
    assert bf16.parts["weights"] == pytest.approx((TRANSFORMER * 2 + adapters) / GIB)
    # rank 16, 1024 px, NF4, 8-bit Adam, checkpointing: within the 12 GiB a 16 GB card leaves room for
    assert 9 <= nf4.total_gib <= 12 < int8.total_gib + 3 <= bf16.total_gib
    # T5-XXL and CLIP-L stay on the GPU only when their embeddings cannot be cached
    resident = flux(FLUX_LORA_NF4, shuffle_captions=True)
    assert resident.parts["weights"] - nf4.parts["weights"] == pytest.approx((CLIP_L + T5_XXL) * 2 / GIB)
    assert not resident.fits(15.0)
    # without gradient checkpointing the activations of 57 blocks at 1024 px fit no 24 GB card
    assert not flux(FLUX_LORA_NF4, gradient_checkpointing=False).fits(24.0)


def test_auto_picks_the_least_quantized_flux_base_that_fits():
    assert recommended_profile("flux1", None) == recommended_profile("flux1", 15.0) == FLUX_LORA_NF4
    assert recommended_profile("flux1", 22.0) == FLUX_LORA_INT8  # an L4 / RTX 4090
    assert recommended_profile("flux1", 39.4) == recommended_profile("flux1", 79.0) == FLUX_LORA_BF16
    warning = fit_warning("flux1", {**MEMORY_PROFILES[FLUX_LORA_BF16], "resolution": 1024}, 15.0, FLUX_LORA_BF16)
    assert FLUX_LORA_BF16 in warning and repr(FLUX_LORA_NF4) in warning
    assert fit_warning("flux1", {**MEMORY_PROFILES[FLUX_LORA_NF4], "resolution": 1024}, 15.0) is None


def test_a_flux_model_switches_the_training_cells_auto_fields(tiny_flux, tmp_path):
    """The training cell's `auto` fields with a Flux.1 model: 1024 px, LoRA's learning rate, no
    VAE swap, the Flux profile for the GPU found; the command they make is one training accepts."""
    from dbtools.ui import notebook as nb

    cell = dict(memory_profile="auto", resolution=0, pretrained_vae_name_or_path="auto", learning_rate="auto",
                num_class_images=0, sample_batch_size=0)
    chosen = nb.training_flags(str(tiny_flux), gpu_gib=15.0, **cell)
    flags = chosen.flags
    assert chosen.family.family.key == "flux1"
    assert (flags["resolution"], flags["learning_rate"], flags["pretrained_vae_name_or_path"]) == (1024, 1e-4, None)
    assert (flags["use_lora"], flags["quantize_base"], flags["mixed_precision"], flags["train_text_encoder"]) == \
        (True, "nf4", "bf16", False)
    assert (flags["num_class_images"], flags["sample_batch_size"]) == (50, 1)
    assert chosen.warning is None and f"Flux.1: memory profile {FLUX_LORA_NF4!r}." in chosen.notes
    # the command (checked against the training parser as it is built) keeps Flux's own VAE
    argv = nb.training_command(str(tiny_flux), tmp_path / "out", tmp_path / "concepts_list.json", gpu_gib=15.0,
                               **cell)
    assert {"--quantize_base=nf4", "--use_lora", "--mixed_precision=bf16", "--resolution=1024"} <= set(argv)
    assert not any(a.startswith("--pretrained_vae_name_or_path") for a in argv)
    # a bigger GPU gets a less quantized base; a typed rate wins
    assert nb.training_flags(str(tiny_flux), gpu_gib=22.0, **cell).flags["quantize_base"] == "int8"
    big = nb.training_flags(str(tiny_flux), gpu_gib=79.0, **{**cell, "learning_rate": 5e-5}).flags
    assert (big["quantize_base"], big["learning_rate"]) == ("none", 5e-5)


def test_export_cell_writes_the_flux_lora_file_or_the_fused_transformer(tiny_flux, tmp_path, caplog):
    import json
    import logging

    import torch
    from safetensors.torch import load_file
    from test_flux_files import ALL_TARGETS, make_flux_lora

    from dbtools.after.kohya import read_metadata
    from dbtools.ui import notebook as nb

    run = tmp_path / "run"
    make_flux_lora(tiny_flux, run / "4", ALL_TARGETS)
    (run / "4" / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_flux)}))
    session = nb.Session(model=str(tiny_flux), output_dir=run, weights_dir=run / "4")
    with caplog.at_level(logging.INFO, logger="dbtools"):
        lora_file = nb.export_step(session)  # auto: a LoRA run exports its LoRA file
        fused = nb.export_step(session, name="fused", export_as="single-file checkpoint")  # fp16 field: bf16
    assert read_metadata(lora_file)["modelspec.architecture"] == "flux-1-dev/lora"
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in load_file(str(lora_file))
    tensors = load_file(str(fused))
    assert "double_blocks.0.img_attn.qkv.weight" in tensors and {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert "models/loras (ComfyUI)" in caplog.text and "models/diffusion_models (ComfyUI" in caplog.text
