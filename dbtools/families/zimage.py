"""Z-Image (Tongyi-MAI's single-stream transformer with a Qwen3 text encoder).

The web UIs' LoRA file: ComfyUI holds Z-Image in its native layout (q, k and v fused into one
`attention.qkv`, `attention.out`), and maps a LoRA written with diffusers' module names under
`diffusion_model.` onto it (q, k and v as slices of `qkv`). Every module named in `UI_MODULES`
is mapped that way; diffusers' Z-Image LoRA reader reads the same file (the prefix dropped,
`alpha / rank` applied).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbtools.core.errors import UserError
from dbtools.families.base import Components, Conditioning, MemoryNumbers, PartLoader
from dbtools.families.lora_layout import LoraLayoutError, kohya_entries, lora_pairs
from dbtools.families.qwen import QwenFlowFamily

if TYPE_CHECKING:  # pragma: no cover
    import torch

UI_PREFIX = "diffusion_model."
_BLOCK = r"(?:layers|noise_refiner|context_refiner)\.\d+\."
UI_MODULES = re.compile(
    rf"{_BLOCK}(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)"
    r"|all_final_layer\.2-1\.(?:linear|adaLN_modulation\.1)|all_x_embedder\.2-1|cap_embedder\.1"
    r"|t_embedder\.mlp\.[02]")
"""The transformer's modules (diffusers names) ComfyUI maps a Z-Image LoRA onto."""


def ui_lora_tensors(state_dict: Mapping[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The UI LoRA file's tensors for a diffusers Z-Image LoRA (`transformer.<module>.lora_A/B`):
    `diffusion_model.<module>.lora_down.weight`, `.lora_up.weight` and `.alpha` (`alpha` is the
    LoRA's lora_alpha; None for alpha = rank). Weights keep their values and dtype."""
    out: dict[str, torch.Tensor] = {}
    for module, (down, up) in sorted(lora_pairs(state_dict, "transformer").items()):
        if not UI_MODULES.fullmatch(module):
            raise LoraLayoutError(f"LoRA module transformer.{module}: ComfyUI applies Z-Image LoRAs only to the "
                                  "attention, feed-forward, modulation and embedding layers; train those.")
        out.update(kohya_entries(UI_PREFIX + module, down, up, alpha))
    return out


# --------------------------------------------------------------------------- the model's facts
#
# Z-Image reads its Qwen3 encoder's second-to-last hidden states of the prompt in Qwen's chat
# layout (padding dropped: one tensor per prompt, of its own length); the transformer takes
# the 16-channel latents ((x - shift_factor) x scaling_factor, Flux.1's VAE) as a list of
# [C, 1, H, W] frames, the time as 1 - sigma, and predicts latents - noise (the negative of
# the flow-matching target noise - latents).

MAX_SEQUENCE_LENGTH = 512
"""Prompt tokens the pipeline reads (its default)."""


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding, batch-first: `embeds` [B, L, D] (the longest prompt's
    length, zero after each prompt's end) and `lengths` [B] (tokens of each prompt)."""
    import torch
    from diffusers import ZImagePipeline

    text_only = ZImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                               transformer=None)
    with torch.no_grad():
        embeds, _ = text_only.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length)
    lengths = torch.tensor([len(e) for e in embeds])
    return {"embeds": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True), "lengths": lengths}


def cached_encode_prompt(pipe, lookup):
    """ZImagePipeline's `encode_prompt` answered by `lookup(prompts, max_sequence_length, device)`
    (each prompt's embeddings, its own length); the negative prompt is the empty one by default."""
    def encode_prompt(prompt, device=None, do_classifier_free_guidance: bool = True, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = prompt_embeds if prompt_embeds is not None else lookup(prompts, max_sequence_length, device)
        if not do_classifier_free_guidance:
            return embeds, []
        negatives = [""] * len(prompts) if negative_prompt is None else negative_prompt
        return embeds, (negative_prompt_embeds if negative_prompt_embeds is not None
                        else lookup(negatives, max_sequence_length, device))

    return encode_prompt


def latents(sample: torch.Tensor, vae) -> torch.Tensor:
    """A VAE sample -> the transformer's latents: (sample - shift_factor) x scaling_factor."""
    return (sample - vae.config.shift_factor) * vae.config.scaling_factor


def predict(transformer, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
            lengths: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity (noise - latents) the transformer predicts for `noisy`
    [B, C, H, W] at `sigmas` [B] under prompts `embeds` [B, L, D] of `lengths` [B]."""
    import torch

    dtype = getattr(transformer, "module", transformer).dtype  # a data-parallel wrapper has no dtype
    frames = list(noisy.to(dtype).unsqueeze(2).unbind(0))
    prompts = [e[: int(n)].to(dtype) for e, n in zip(embeds, lengths, strict=True)]
    time = (1 - sigmas.float()).to(noisy.device)
    out = transformer(frames, time, prompts, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


# --------------------------------------------------------------------------- the family

TURBO_ADVICE = (
    "Z-Image-Turbo is step-distilled (8 steps, no guidance): LoRA training on it wears the distillation away, so "
    "its few-step images blur as training goes on. Train on the Base model (Tongyi-MAI/Z-Image) and use the "
    "LoRA with Turbo at its own 8 steps and guidance 0, as diffusers' Z-Image DreamBooth script and DiffSynth "
    "do; or train on a de-distilled Turbo (ostris/Z-Image-De-Turbo).")


def is_turbo(name: str) -> bool:
    """Whether a model's Hub id or folder name says it is Z-Image-Turbo (not a de-distilled one):
    Turbo and Base ship the same pipeline and configs, only the name tells them apart."""
    lowered = Path(str(name).rstrip("/\\")).name.lower().replace("_", "-")
    return "turbo" in lowered and not any(m in lowered for m in ("de-turbo", "deturbo", "dedistill"))


@dataclass(frozen=True, eq=False, repr=False)
class ZImageFamily(QwenFlowFamily):
    """Z-Image (Base); Z-Image-Turbo is refused with what to train instead (`TURBO_ADVICE`)."""

    def name_refusal(self, name: str) -> str | None:
        return TURBO_ADVICE if is_turbo(name) else None

    def load_components(self, load: PartLoader, needed=None, quantize: str | None = None,
                        options: Any = None) -> Components:
        name = getattr(load, "name", "")
        if self.name_refusal(name):
            raise UserError(f"{name}: {self.name_refusal(name)}")
        return super().load_components(load, needed, quantize, options)

    def predict(self, denoiser, noisy, timesteps, cond: Conditioning, guidance_scale: float | None = None):
        return predict(denoiser, noisy, timesteps, cond["embeds"], cond["lengths"])


ZIMAGE = ZImageFamily(
    "zimage", "Z-Image", 1024, "ZImagePipeline", (("text_encoder", "Qwen3Model"),),
    denoiser="transformer", denoiser_class="ZImageTransformer2DModel", tokenizer_classes=("Qwen2Tokenizer",),
    pipeline_names=("ZImagePipeline",), single_file_markers=(),
    # the pipeline's own defaults (Base: 50 steps, classifier-free guidance 5)
    sample_steps=50, guidance_scale=5.0, samples_at_own_defaults=True, recommended_vae=None, lora_learning_rate=1e-4,
    prior_defaults={"num_class_images": 50, "sample_batch_size": 1},
    model=sys.modules[__name__], ui_names=("zimage", "z-image"),
    # Transformer 6.15B, Qwen3-4B 4.02B, VAE 84M (counted from the real configs on the meta
    # device); LoRA on the attention projections of all 34 blocks; activations at 1024 px,
    # batch 1, bf16 (estimates: 4.6k tokens x 3840 wide x 34 blocks).
    memory_numbers=MemoryNumbers(6_154_908_736, (4_022_468_096,), 83_819_683, 1_044_480, (0,), (2.0, 24.0)),
)
