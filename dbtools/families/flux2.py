"""Flux.2 [klein] (Black Forest Labs' 4B/9B transformer with a Qwen3 text encoder).

The web UIs' LoRA file is kohya's layout on Black Forest Labs' module names
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ...): ComfyUI
holds Flux.2 in that layout and reads `lora_unet_<native name with _>` for every weight of
its model; diffusers' Flux.2 LoRA reader reads the same file. q, k and v, three modules in
diffusers, are one `qkv` matrix there: their LoRAs are joined into one (`fuse_pairs`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dbtools.families.base import Conditioning, MemoryNumbers
from dbtools.families.lora_layout import LoraLayoutError, fuse_pairs, fused_alpha, kohya_entries, lora_pairs
from dbtools.families.qwen import QwenFlowFamily

if TYPE_CHECKING:  # pragma: no cover
    import torch

UI_PREFIX = "lora_unet_"
_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
           "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer", "proj_out": "final_layer.linear"}
_BLOCK = re.compile(r"(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.(?P<inner>.+)")


def native_name(module: str) -> str | None:
    """Black Forest Labs' name of a diffusers Flux.2 module (q, k, v: their fused `qkv`), or None
    for one the UI layout has no name for (the modulation layers, `norm_out`)."""
    match = _BLOCK.fullmatch(module)
    if match is None:
        return _TOP.get(module)
    inner = match["inner"]
    if match["kind"] == "single_transformer_blocks":
        native = _SINGLE.get(inner)
        return native and f"single_blocks.{match['i']}.{native}"
    fused = next((qkv for qkv, parts in _QKV.items() if inner in parts), None)
    native = fused or _DOUBLE.get(inner)
    return native and f"double_blocks.{match['i']}.{native}"


def ui_lora_tensors(state_dict: Mapping[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The UI LoRA file's tensors for a diffusers Flux.2 LoRA (`transformer.<module>.lora_A/B`):
    `lora_unet_<native name>.lora_down.weight`, `.lora_up.weight` and `.alpha` (`alpha` is the
    LoRA's lora_alpha; None for alpha = rank). q, k and v are joined into their `qkv`."""
    pairs = lora_pairs(state_dict, "transformer")
    groups: dict[str, list[str]] = {}
    for module in sorted(pairs):
        native = native_name(module)
        if native is None:
            raise LoraLayoutError(f"LoRA module transformer.{module}: the Flux.2 UI LoRA layout has no name for it "
                                  "(ComfyUI and diffusers read attention, MLP and embedding layers); train those.")
        groups.setdefault(native, []).append(module)
    out: dict[str, torch.Tensor] = {}
    for native, modules in groups.items():
        name = UI_PREFIX + native.replace(".", "_")
        if native.endswith(".qkv"):
            block = modules[0].rsplit(".attn.", 1)[0]
            parts = [pairs.get(f"{block}.{p}") for p in _QKV[native.split(".", 2)[2]]]
            down_of_one, up_of_one = next(p for p in parts if p is not None)
            down, up = fuse_pairs(parts, [up_of_one.shape[0]] * 3)  # q, k and v are equally wide
            one_alpha = down_of_one.shape[0] if alpha is None else alpha
            out.update(kohya_entries(name, down, up, fused_alpha(one_alpha, 3)))
        else:
            out.update(kohya_entries(name, *pairs[modules[0]], alpha))
    return out


# --------------------------------------------------------------------------- the model's facts
#
# Flux.2 [klein] reads the hidden states after layers 9, 18 and 27 of its Qwen3 encoder, side
# by side, for the prompt in Qwen's chat layout (thinking off), padded to 512 tokens (the
# transformer attends to the padding too, so it stays). The 32-channel latents are cut into
# 2x2 patches (128 channels) and normalised by the VAE's batch-norm statistics; the
# transformer sees them as a sequence with (t, h, w, l) position ids, the time as sigma, and
# predicts the flow-matching target noise - latents. klein has no guidance embedding.

TEXT_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding: `embeds` [B, max_sequence_length, 3 x width]."""
    import torch
    from diffusers import Flux2KleinPipeline

    with torch.no_grad():
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder, tokenizer, list(prompts), device=device, max_sequence_length=max_sequence_length,
            hidden_states_layers=TEXT_LAYERS)
    return {"embeds": embeds}


def cached_encode_prompt(pipe, lookup):
    """Flux2KleinPipeline's `encode_prompt` answered by `lookup(prompts, max_sequence_length,
    device)` (each prompt's [max_sequence_length, D] embeddings); its text ids are the pipeline's."""
    import torch

    def encode_prompt(prompt, device=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      max_sequence_length: int = MAX_SEQUENCE_LENGTH, text_encoder_out_layers=TEXT_LAYERS):
        if prompt_embeds is None:
            prompts = [""] if prompt is None else prompt
            prompt_embeds = torch.stack(lookup(prompts, max_sequence_length, device))
        embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
        return embeds, pipe._prepare_text_ids(embeds).to(embeds.device)

    return encode_prompt


def latents(sample: torch.Tensor, vae) -> torch.Tensor:
    """A VAE sample [B, 32, H, W] -> the transformer's latents [B, 128, H/2, W/2]: 2x2 patches
    normalised by the VAE's batch-norm running mean and variance."""
    import torch
    from diffusers import Flux2KleinPipeline

    patches = Flux2KleinPipeline._patchify_latents(sample)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches.device,
                                                                                          patches.dtype)
    return (patches - mean) / std


def predict(transformer, noisy: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor,
            guidance: float | None = None) -> torch.Tensor:
    """The flow-matching velocity (noise - latents) the transformer predicts for `noisy`
    [B, 128, h, w] at `sigmas` [B] under prompt `embeds`; `guidance` feeds a guidance
    embedding where the transformer has one (klein has not)."""
    import torch
    from diffusers import Flux2KleinPipeline as P

    batch, _, height, width = noisy.shape
    image_ids = P._prepare_latent_ids(noisy).to(noisy.device)
    text_ids = P._prepare_text_ids(embeds).to(noisy.device)
    inner = getattr(transformer, "module", transformer)  # a data-parallel wrapper has no dtype, no config
    dtype = inner.dtype
    guidance_in = None
    if inner.config.guidance_embeds:
        guidance_in = torch.full((batch,), 1.0 if guidance is None else guidance, device=noisy.device)
    out = transformer(hidden_states=P._pack_latents(noisy).to(dtype), timestep=sigmas.to(noisy.device, dtype),
                      guidance=guidance_in, encoder_hidden_states=embeds.to(dtype), txt_ids=text_ids,
                      img_ids=image_ids, return_dict=False)[0]
    return P._unpack_latents_with_ids(out[:, : height * width], image_ids, height, width)


# --------------------------------------------------------------------------- the family

DISTILLED_ADVICE = (" (4 steps, no guidance; LoRA training wears the distillation away: train on the matching "
                    "base model, black-forest-labs/FLUX.2-klein-base-4B or -9B, and use the LoRA with this model "
                    "at its own 4 steps)")


@dataclass(frozen=True, eq=False, repr=False)
class Flux2Family(QwenFlowFamily):
    """Flux.2 [klein] base models (`distilled` False) or the step-distilled ones (refused)."""

    distilled: bool = False

    def matches_model_index(self, model_index: Mapping, text_config: Mapping | None) -> bool:
        return super().matches_model_index(model_index, text_config) and \
            bool(model_index.get("is_distilled", False)) == self.distilled

    def pipeline_kwargs(self) -> dict:
        return {"is_distilled": self.distilled}

    def predict(self, denoiser, noisy, timesteps, cond: Conditioning, guidance_scale: float | None = None):
        return predict(denoiser, noisy, timesteps, cond["embeds"], guidance_scale)

    def lora_targets(self, component: str, module: Any) -> list[str]:
        """diffusers' Flux.2 [klein] DreamBooth default: attention of the double blocks, and the
        fused input and the output projection of every single block."""
        if component != self.denoiser:
            return []
        inner = getattr(module, "module", module)
        singles = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(inner.single_transformer_blocks))]
        return [*self.lora_modules, *singles]


_FLUX2 = dict(
    denoiser="transformer", denoiser_class="Flux2Transformer2DModel", tokenizer_classes=("Qwen2Tokenizer",),
    pipeline_names=("Flux2KleinPipeline",), vae_class="AutoencoderKLFlux2", fixed_sequence_length=True,
    lora_modules=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"), model=sys.modules[__name__],
    ui_names=("flux2_klein", "flux-2-klein"), recommended_vae=None, lora_learning_rate=1e-4,
    samples_at_own_defaults=True, prior_defaults={"num_class_images": 50, "sample_batch_size": 1},
    # klein 4B: transformer 3.88B, Qwen3-4B 4.02B, VAE 84M (counted from the real configs on the
    # meta device); LoRA as `lora_targets`; activations at 1024 px, batch 1, bf16 (estimates:
    # 4.6k tokens x 3072 wide x 25 blocks). klein 9B: transformer 9.08B, Qwen3-8B 7.57B.
    memory_numbers=MemoryNumbers(3_875_544_576, (4_022_468_096,), 84_046_115, 1_044_480, (0,), (1.5, 15.0)),
)
FLUX2 = Flux2Family("flux2", "Flux.2 [klein]", 1024, "Flux2KleinPipeline", (("text_encoder", "Qwen3ForCausalLM"),),
                    sample_steps=50, guidance_scale=4.0, **_FLUX2)
"""Flux.2 [klein] base models: the pipeline's own 50 steps and guidance 4."""
FLUX2_DISTILLED = Flux2Family("flux2-distilled", "Flux.2 [klein] step-distilled", 1024, "Flux2KleinPipeline",
                              (("text_encoder", "Qwen3ForCausalLM"),), trained=False, distilled=True,
                              refusal_detail=DISTILLED_ADVICE, sample_steps=4, guidance_scale=1.0, **_FLUX2)
