"""Memory profiles: named sets of training flags per model family, and how much GPU memory
a run needs.

Pure rules with no I/O and no torch: the notebook's training cell offers the profiles, and
training's pre-flight (and the notebook) use `estimate_training_memory` to warn before a
run that cannot fit the GPU. The estimate counts what dominates a diffusion fine-tune:
weights (frozen ones in the mixed-precision dtype, trained ones in float32), their
gradients, the optimizer's state, activations (scaled by pixels and batch size, much
smaller with gradient checkpointing) and a fixed allowance for the CUDA context and the
allocator. It is calibrated on Shivam Shrirao's published figure for SD 1.5 (fp16, 8-bit
Adam, gradient checkpointing, text encoder trained: 9.92 GB on a T4) and is meant to be
within about 1 GB: good enough to say "this will not fit a 16 GB card", not a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dbtools.families import registry

GIB = 1024 ** 3

SD_DEFAULT = "fp16 + 8-bit Adam + gradient checkpointing"
SDXL_LORA_16GB = "SDXL LoRA, 16 GB (Colab T4)"
SDXL_FULL_24GB = "SDXL full fine-tune, 24 GB"
FLUX_LORA_NF4 = "Flux.1 LoRA, NF4 base, 16 GB"
FLUX_LORA_INT8 = "Flux.1 LoRA, int8 base, 24 GB"
FLUX_LORA_BF16 = "Flux.1 LoRA, bf16 base, 32 GB"
ZIMAGE_LORA_16GB = "Z-Image LoRA, 16 GB (int8 base)"
FLUX2_LORA_16GB = "Flux.2 [klein] LoRA, 16 GB"
AUTO = "auto"

# Learning rates: a full fine-tune moves every weight, so it needs a small rate (the notebook's
# SD 1.x value); LoRA's `lora_B` starts at zero and at that rate would stay a near no-op, so
# adapters train at about a hundred times more.
FULL_FINE_TUNE_LR = 1e-6
LORA_LR = 1e-4

# The training cell's memory/speed choices: the flags each one sets. The SD 1.x/2.x ones come
# first and the first is the default for those families (the original notebook's settings).
# Each carries the learning rate that suits it; unlike its other flags, a rate the user gives wins.
MEMORY_PROFILES: dict[str, dict[str, Any]] = {
    SD_DEFAULT: {"mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True,
                 "learning_rate": FULL_FINE_TUNE_LR},
    "fp16 + 8-bit Adam": {"mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": False,
                          "learning_rate": FULL_FINE_TUNE_LR},
    "fp32, no memory savings": {"mixed_precision": "no", "use_8bit_adam": False, "gradient_checkpointing": False,
                                "learning_rate": FULL_FINE_TUNE_LR},
    # LoRA adapters on a frozen fp16 UNet; latents and text embeddings cached so both text
    # encoders and the VAE can leave the GPU; the UNet alone is trained.
    SDXL_LORA_16GB: {"mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True,
                     "use_lora": True, "train_text_encoder": False, "learning_rate": LORA_LR},
    # All UNet weights trained, text encoders frozen; bf16 where the GPU has it (Ampere or newer);
    # Adafactor, whose state is about 0.1 floats per weight, where 8-bit Adam's 2 bytes would not fit.
    SDXL_FULL_24GB: {"mixed_precision": "bf16", "use_8bit_adam": False, "use_adafactor": True,
                     "gradient_checkpointing": True, "use_lora": False, "train_text_encoder": False,
                     "learning_rate": FULL_FINE_TUNE_LR},
    # Flux.1 needs bf16. LoRA adapters (float32) on a frozen transformer that bitsandbytes holds
    # in 4 bits (NF4) or 8 bits, or in bf16 where the GPU has room; text embeddings cached, so
    # T5-XXL and CLIP leave the GPU; 8-bit Adam for the adapters.
    FLUX_LORA_NF4: {"mixed_precision": "bf16", "use_8bit_adam": True, "gradient_checkpointing": True,
                    "use_lora": True, "train_text_encoder": False, "quantize_base": "nf4", "learning_rate": LORA_LR},
    FLUX_LORA_INT8: {"mixed_precision": "bf16", "use_8bit_adam": True, "gradient_checkpointing": True,
                     "use_lora": True, "train_text_encoder": False, "quantize_base": "int8", "learning_rate": LORA_LR},
    FLUX_LORA_BF16: {"mixed_precision": "bf16", "use_8bit_adam": True, "gradient_checkpointing": True,
                     "use_lora": True, "train_text_encoder": False, "quantize_base": "none", "learning_rate": LORA_LR},
    # LoRA on the transformer alone, its prompts cached (the Qwen3 encoder leaves the GPU), bf16:
    # Z-Image's 6.15B transformer frozen in int8 (6 GB rather than 12), klein 4B's in bf16 (8 GB).
    ZIMAGE_LORA_16GB: {"mixed_precision": "bf16", "use_8bit_adam": True, "gradient_checkpointing": True,
                       "use_lora": True, "train_text_encoder": False, "quantize_base": "int8",
                       "learning_rate": LORA_LR},
    FLUX2_LORA_16GB: {"mixed_precision": "bf16", "use_8bit_adam": True, "gradient_checkpointing": True,
                      "use_lora": True, "train_text_encoder": False, "learning_rate": LORA_LR},
}
FLUX_PROFILES = (FLUX_LORA_BF16, FLUX_LORA_INT8, FLUX_LORA_NF4)
"""Flux.1's profiles, best first."""

USER_WINS = ("learning_rate",)
"""Profile flags that are only defaults: a value the user gives is kept."""

# Which families a profile is meant for (a profile of another family still runs, with a note).
PROFILE_FAMILIES: dict[str, tuple[str, ...]] = {
    SD_DEFAULT: ("sd1", "sd2"),
    "fp16 + 8-bit Adam": ("sd1", "sd2"),
    "fp32, no memory savings": ("sd1", "sd2", "sdxl"),
    SDXL_LORA_16GB: ("sdxl",),
    SDXL_FULL_24GB: ("sdxl",),
    **dict.fromkeys(FLUX_PROFILES, ("flux1",)),
    ZIMAGE_LORA_16GB: ("zimage",),
    FLUX2_LORA_16GB: ("flux2",),
}
# What `auto` picks per family, most capable first: the first estimated to fit the GPU (with
# `HEADROOM_GIB` to spare), else (and when the GPU is unknown) the last, the leanest. The original
# notebook's for SD 1.x/2.x.
PREFERRED: dict[str, tuple[str, ...]] = {
    "sd1": (SD_DEFAULT,),
    "sd2": (SD_DEFAULT,),
    "sdxl": (SDXL_FULL_24GB, SDXL_LORA_16GB),
    "flux1": FLUX_PROFILES,
    "zimage": (ZIMAGE_LORA_16GB,),
    "flux2": (FLUX2_LORA_16GB,),
}
HEADROOM_GIB = {"flux1": 2.0}
"""What `auto` leaves spare on the GPU: Flux.1's estimate is good to about 1 GiB and bitsandbytes
adds dequantization buffers, so a 16 GB card gets NF4 rather than int8."""
# The parameter counts, LoRA sizes and activation memory of the real models are the families'
# own (`ModelFamily.memory`), as is the native size.
# Bytes per weight of a frozen denoiser that bitsandbytes quantized (`quantize_base`): NF4 packs
# two weights a byte plus a float32 scale per 64 (less with nested quantization); int8 one byte.
_QUANTIZED_BYTES = {"nf4": 0.53, "int8": 1.0}
_OVERHEAD_GIB = 0.5
# Adafactor keeps row and column second moments: 0.095 floats per weight for SDXL's UNet (its
# 3x3 convolutions factor over the last two axes only).
_ADAFACTOR_BYTES = 0.38


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB needed by a training run, in parts (weights, gradients, optimizer, activations, overhead)."""

    parts: dict[str, float]

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values())

    def fits(self, gpu_gib: float) -> bool:
        return self.total_gib <= gpu_gib

    def describe(self) -> str:
        detail = ", ".join(f"{name} {gib:.1f}" for name, gib in self.parts.items() if gib >= 0.05)
        return f"about {self.total_gib:.1f} GiB ({detail})"


def _flag(flags: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = flags.get(name)
    return default if value is None else value


def estimate_training_memory(family: str, flags: Mapping[str, Any]) -> MemoryEstimate:
    """Peak GPU memory of a real-size `family` model ("sd1", "sd2", "sdxl") trained with the
    training command's `flags` (names as `train_dreambooth.py`'s: `mixed_precision`,
    `use_8bit_adam`, `use_adafactor`, `gradient_checkpointing`, `use_lora`, `lora_rank`, `train_text_encoder`,
    `resolution`, `train_batch_size`, `with_prior_preservation`, `not_cache_latents`, `shuffle_captions`,
    `quantize_base`).

    Frozen weights count in the mixed-precision dtype, trained ones (full weights or LoRA
    adapters) in float32 with float32 gradients; AdamW keeps 8 bytes per trained weight,
    8-bit Adam 2, Adafactor about 0.4. A text encoder that is not trained leaves the GPU when its embeddings are
    cached (not with `shuffle_captions`), the VAE when latents are. A LoRA run's frozen denoiser
    quantized with `quantize_base` ("nf4", "int8") takes about 0.53 or 1 byte a weight.
    """
    numbers = registry.get(family).memory
    half = str(_flag(flags, "mixed_precision", "no")) in ("fp16", "bf16")
    frozen_bytes = 2 if half else 4
    train_te = bool(_flag(flags, "train_text_encoder", False))
    rank = int(_flag(flags, "lora_rank", 4))
    use_lora = bool(_flag(flags, "use_lora", False))
    text_resident = train_te or bool(_flag(flags, "shuffle_captions", False))
    vae_resident = bool(_flag(flags, "not_cache_latents", False))

    trained = frozen = quantized = 0
    text = sum(numbers.text_params)
    quantized_bytes = _QUANTIZED_BYTES.get(str(_flag(flags, "quantize_base", "none")))
    if use_lora:
        if quantized_bytes:
            quantized += numbers.denoiser_params
        else:
            frozen += numbers.denoiser_params
        frozen += text if train_te else 0
        trained += rank * (numbers.lora_per_rank + (sum(numbers.text_lora_per_rank) if train_te else 0))
    else:
        trained += numbers.denoiser_params + (text if train_te else 0)
    if text_resident and not train_te:
        frozen += text
    if vae_resident:
        frozen += numbers.vae_params
    optimizer_bytes = _ADAFACTOR_BYTES if _flag(flags, "use_adafactor", False) else \
        2 if _flag(flags, "use_8bit_adam", False) else 8
    return MemoryEstimate({
        "weights": (frozen * frozen_bytes + quantized * (quantized_bytes or 0) + trained * 4) / GIB,
        "gradients": trained * 4 / GIB,
        "optimizer": trained * optimizer_bytes / GIB,
        "activations": _activations_gib(family, flags, half),
        "overhead": _OVERHEAD_GIB,
    })


def _activations_gib(family: str, flags: Mapping[str, Any], half: bool) -> float:
    checkpointed, full = registry.get(family).memory.activations_gib
    native = registry.get(family).resolution
    base = checkpointed if _flag(flags, "gradient_checkpointing", False) else full
    pixels = (int(_flag(flags, "resolution", native)) / native) ** 2
    # Prior preservation puts a class image beside each instance image in the UNet's batch.
    batch = int(_flag(flags, "train_batch_size", 1)) * (2 if _flag(flags, "with_prior_preservation", False) else 1)
    return base * pixels * batch * (1 if half else 2)


def learning_rate_for(profile: str, flags: Mapping[str, Any]) -> float:
    """The learning rate that suits a run of `profile` with `flags`: the profile's, or LoRA's
    when the flags train LoRA on a full fine-tune profile (e.g. `--use_lora` added by hand)."""
    if _flag(flags, "use_lora", False) and not MEMORY_PROFILES[profile].get("use_lora"):
        return LORA_LR
    return MEMORY_PROFILES[profile]["learning_rate"]


def fit_warning(family: str, flags: Mapping[str, Any], gpu_gib: float | None, profile: str = "") -> str | None:
    """A warning when a run with `flags` is estimated not to fit a GPU of `gpu_gib` GiB
    (None: no GPU known, no warning); what to change, with the profile that would fit."""
    if gpu_gib is None:
        return None
    estimate = estimate_training_memory(family, flags)
    if estimate.fits(gpu_gib):
        return None
    what = f"The memory profile {profile!r}" if profile else "These training settings"
    leanest = PREFERRED[family][-1]
    lean = MEMORY_PROFILES[leanest]
    lighter = (lean.get("use_lora") and not flags.get("use_lora")) or \
        lean.get("quantize_base", "none") not in ("none", flags.get("quantize_base"))
    advice = ("choose the memory profile " + repr(leanest)
              if lighter
              else "turn on gradient checkpointing and 8-bit Adam, lower the resolution or batch size, "
                   "or train LoRA (--use_lora)")
    return (f"{what} needs {estimate.describe()} but this GPU has {gpu_gib:.1f} GiB: training will "
            f"probably run out of memory. To fit, {advice}.")


def recommended_profile(family: str, gpu_gib: float | None = None) -> str:
    """The profile the notebook's `auto` picks (`PREFERRED`): the original notebook's for SD
    1.x/2.x; for SDXL the full fine-tune when it is estimated to fit the GPU at the native
    size, else LoRA (always LoRA when the GPU is unknown: it fits a 16 GB Colab T4); for Flux.1
    the least quantized base that fits with 2 GiB to spare (NF4 when the GPU is unknown)."""
    *better, leanest = PREFERRED[family]
    native = registry.get(family).resolution
    room = (gpu_gib or 0.0) - HEADROOM_GIB.get(family, 0.0)
    for profile in better if gpu_gib is not None else ():
        if estimate_training_memory(family, {**MEMORY_PROFILES[profile], "resolution": native}).fits(room):
            return profile
    return leanest


def profile_note(profile: str, family: str) -> str | None:
    """A note when `profile` is meant for other model families than `family`."""
    meant = PROFILE_FAMILIES.get(profile, ())
    if family in meant:
        return None
    return (f"The memory profile {profile!r} is meant for {' / '.join(meant)} models, not {family}; "
            f"'{AUTO}' picks {recommended_profile(family)!r} for this model.")
