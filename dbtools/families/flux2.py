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
