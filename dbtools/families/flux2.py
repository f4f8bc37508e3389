"""Flux.2 [klein] (Black Forest Labs' 4B/9B transformer with a Qwen3 text encoder).

The web UIs' LoRA file is kohya's layout on Black Forest Labs' module names
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ...): ComfyUI
holds Flux.2 in that layout and reads `lora_unet_<native name with _>` for every weight of
its model; diffusers' Flux.2 LoRA reader reads the same file. q, k and v, three modules in
diffusers, are one `qkv` matrix there: their LoRAs are joined into one (`fuse_pairs`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dbtools.families.lora_layout import LoraLayoutError, fuse_pairs, fused_alpha, kohya_entries, lora_pairs

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
    dtype = transformer.dtype
    guidance_in = None
    if transformer.config.guidance_embeds:
        guidance_in = torch.full((batch,), 1.0 if guidance is None else guidance, device=noisy.device)
    out = transformer(hidden_states=P._pack_latents(noisy).to(dtype), timestep=sigmas.to(noisy.device, dtype),
                      guidance=guidance_in, encoder_hidden_states=embeds.to(dtype), txt_ids=text_ids,
                      img_ids=image_ids, return_dict=False)[0]
    return P._unpack_latents_with_ids(out[:, : height * width], image_ids, height, width)
