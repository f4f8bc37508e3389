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

TRANSFORMER, CLIP_L, T5_XXL = 11_901_408_320, 123_060_480, 4_893_906_944  # Flux.1 [dev]'s parameters
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
    # without gradient checkpointing the activations of 57 blocks at 1024 px fit no 24 or 40 GB card
    assert not flux(FLUX_LORA_NF4, gradient_checkpointing=False).fits(40.0)


def test_auto_picks_the_least_quantized_flux_base_that_fits():
    assert recommended_profile("flux1", None) == recommended_profile("flux1", 15.0) == FLUX_LORA_NF4
    assert recommended_profile("flux1", 22.0) == FLUX_LORA_INT8  # an L4 / RTX 4090
    assert recommended_profile("flux1", 39.4) == recommended_profile("flux1", 79.0) == FLUX_LORA_BF16
    warning = fit_warning("flux1", {**MEMORY_PROFILES[FLUX_LORA_BF16], "resolution": 1024}, 15.0, FLUX_LORA_BF16)
    assert FLUX_LORA_BF16 in warning and repr(FLUX_LORA_NF4) in warning
    assert fit_warning("flux1", {**MEMORY_PROFILES[FLUX_LORA_NF4], "resolution": 1024}, 15.0) is None
