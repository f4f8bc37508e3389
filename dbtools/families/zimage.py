"""Z-Image (Tongyi-MAI's single-stream transformer with a Qwen3 text encoder).

The web UIs' LoRA file: ComfyUI holds Z-Image in its native layout (q, k and v fused into one
`attention.qkv`, `attention.out`), and maps a LoRA written with diffusers' module names under
`diffusion_model.` onto it (q, k and v as slices of `qkv`). Every module named in `UI_MODULES`
is mapped that way; diffusers' Z-Image LoRA reader reads the same file (the prefix dropped,
`alpha / rank` applied).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dbtools.families.lora_layout import LoraLayoutError, kohya_entries, lora_pairs

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
