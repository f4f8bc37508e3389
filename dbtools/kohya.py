"""LoRA files for AUTOMATIC1111 and ComfyUI: diffusers/peft LoRA -> kohya-style names.

A diffusers LoRA (`pytorch_lora_weights.safetensors`, as `save_lora_weights` writes it)
names its tensors after diffusers modules (`unet.down_blocks.1...to_q.lora.down.weight`).
AUTOMATIC1111, ComfyUI and kohya's scripts read one flat namespace instead:

- `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` for the UNet,
- `lora_te1_...` for the (first) text encoder and `lora_te2_...` for SDXL's second,
  with transformers' `text_model.` module path (`lora_te1_text_model_encoder_layers_0_...`),
- one `<module>.alpha` per module: the LoRA's alpha (scale = alpha / rank).

diffusers' `convert_all_state_dict_to_peft` / `convert_state_dict_to_kohya` do the renaming;
this module adds what they leave out: the real alphas (they write alpha = rank) and the
`text_model.` path that transformers 5 no longer puts in `CLIPTextModel` state dicts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from dbtools.atomic import atomic_write
from dbtools.errors import UserError

logger = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_")


class LoraConvertError(UserError):
    """A LoRA file cannot be converted because of something the user can fix."""


def to_peft_names(state_dict: Mapping) -> dict:
    """A diffusers LoRA state dict with peft names (`lora_A`/`lora_B`), the text encoders'
    modules under `text_model.` as in the kohya layout.

    Each component is converted on its own: diffusers writes the UNet's tensors as
    `lora.down`/`lora.up` but a text encoder's as `lora_linear_layer.down`/`.up`.
    """
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    groups: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        groups.setdefault(key.split(".", 1)[0], {})[key] = tensor
    peft = {}
    for component, part in groups.items():
        if any(".lora_A." in k or ".lora_B." in k for k in part):
            peft.update(part)
            continue
        try:
            peft.update(convert_all_state_dict_to_peft(part))
        except ValueError as exc:
            raise LoraConvertError(f"{component}: not a diffusers LoRA state dict ({exc}).") from exc
    return {_with_text_model(k): v for k, v in peft.items()}


def _with_text_model(key: str) -> str:
    return re.sub(r"^(text_encoder(?:_2)?\.)(?!text_model\.)", r"\1text_model.", key)


def to_kohya(state_dict: Mapping, alpha: float | Mapping[str, float] | None = None) -> dict:
    """Kohya-style LoRA tensors (`lora_unet_*`, `lora_te1_*`, `lora_te2_*` + `.alpha`).

    `state_dict` is a diffusers LoRA (diffusers or peft key names, with `unet.`,
    `text_encoder.`, `text_encoder_2.` prefixes). `alpha` is the LoRA's `lora_alpha`: one
    number for all modules, a dict from component ("unet", "text_encoder",
    "text_encoder_2") to number, or None for alpha = rank (scale 1, what diffusers assumes
    for a file without alphas). Weights are kept as they are (same dtype, same values).
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    peft = to_peft_names(state_dict)
    unknown = sorted(k for k in peft if not k.startswith(("unet.", "text_encoder.", "text_encoder_2.")))
    if unknown:
        raise LoraConvertError(f"LoRA tensor {unknown[0]} belongs to no UNet or text encoder; only UNet and "
                               "text-encoder LoRAs of Stable Diffusion can be converted.")
    out = convert_state_dict_to_kohya(peft)
    for key in [k for k in out if k.endswith(".alpha")]:
        module = key[: -len(".alpha")]
        rank = out[module + ".lora_down.weight"].shape[0]
        value = _alpha_for(module, alpha, rank)
        out[key] = torch.tensor(float(value), dtype=torch.float32)
    return out


def _alpha_for(module: str, alpha: float | Mapping[str, float] | None, rank: int) -> float:
    if alpha is None:
        return rank
    if isinstance(alpha, Mapping):
        component = next(c for p, c in _COMPONENTS.items() if module.startswith(p))
        return alpha.get(component, rank)
    return alpha


_COMPONENTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def read_lora(path: str | os.PathLike) -> dict:
    """The tensors of a diffusers LoRA file, or of a LoRA folder's `pytorch_lora_weights.safetensors`."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise LoraConvertError(f"{path}: not found. Give a LoRA folder (with pytorch_lora_weights.safetensors) "
                               "or the .safetensors file itself.")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise LoraConvertError(f"{path}: not a valid .safetensors file ({exc}). Save the LoRA again.") from exc


def write_kohya_lora(lora: str | os.PathLike | Mapping, out: str | os.PathLike,
                     alpha: float | Mapping[str, float] | None = None, half: bool = False) -> Path:
    """Write a kohya-style LoRA `.safetensors` that AUTOMATIC1111 and ComfyUI load; return its path.

    `lora` is a diffusers LoRA folder or file, or its state dict; `alpha` as in `to_kohya`.
    With `half`, floating-point tensors are stored as fp16. The file appears only when complete.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LoraConvertError(f"{out}: name the LoRA file .safetensors (AUTOMATIC1111 and ComfyUI pick their "
                               "reader by the extension).")
    tensors = to_kohya(read_lora(lora) if isinstance(lora, (str, os.PathLike)) else lora, alpha)
    if half:
        tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    logger.info("wrote %s: %d LoRA modules", out, sum(k.endswith(".alpha") for k in tensors))
    return out
