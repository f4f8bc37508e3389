"""How the web UIs read a LoRA file, written down as rules for the tests (from reading their
sources; no code of theirs).

Key names (ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip`, which Forge ships too):
- UNet: `lora_unet_` + a diffusers UNet weight's name without `.weight`, dots as underscores;
- text encoders: `<prefix>text_model_encoder_layers_<i>_<module>` for the six linear layers
  of each CLIP layer (`self_attn_{q,k,v,out}_proj`, `mlp_fc1`, `mlp_fc2`); SD 1.x's and
  SD 2.x's encoder take `lora_te_` (and `lora_te1_`), SDXL's `lora_te1_` (CLIP ViT-L) and
  `lora_te2_` (OpenCLIP bigG). AUTOMATIC1111 maps SD 2.x's OpenCLIP layers from `lora_te_`
  only, so `lora_te_` is the prefix every UI reads for SD 1.x/2.x;
- per module `<m>.lora_up.weight`, `<m>.lora_down.weight` and an optional `<m>.alpha`; any
  other key is reported as not loaded.

Base version (what the Lora tab shows a file for):
- AUTOMATIC1111 1.10: SDXL when `ss_base_model_version` starts with `sdxl_`, else SD2 when
  `ss_v2` is the string `True`, else SD1 when the file has any metadata, else unknown;
- Forge: `modelspec.architecture` `stable-diffusion-xl-v1-base/lora` or an `sdxl_`
  `ss_base_model_version` is SDXL, `ss_v2 == "True"` SD2, `modelspec.architecture`
  `stable-diffusion-v1/lora` SD1, anything else unknown.
"""

from __future__ import annotations

import re

CLIP_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
TEXT_PREFIXES = {"sd1": ("lora_te_",), "sd2": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}
LORA_PARTS = (".lora_up.weight", ".lora_down.weight", ".alpha")


def module_map(pipe, family: str) -> dict:
    """LoRA module name -> the weight shape of the model module it patches, as the UIs name them."""
    found = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): tuple(v.shape)
             for k, v in pipe.unet.state_dict().items() if k.endswith(".weight")}
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for prefix, encoder in zip(TEXT_PREFIXES[family], encoders):
        for key, value in encoder.state_dict().items():
            m = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)\.weight", key)
            if m and m.group(2) in CLIP_LINEAR:
                found[f"{prefix}text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"] = \
                    tuple(value.shape)
    return found


def unmatched(lora: dict, modules: dict) -> list[str]:
    """Keys of `lora` a UI would not load: unknown module, unknown part, or a shape that does
    not fit the module (down: [rank, in], up: [out, rank])."""
    bad = []
    for key, tensor in lora.items():
        part = next((p for p in LORA_PARTS if key.endswith(p)), None)
        module = key[: -len(part)] if part else None
        shape = modules.get(module)
        if shape is None:
            bad.append(key)
        elif part == ".lora_down.weight" and tuple(tensor.shape[1:]) != shape[1:]:
            bad.append(key)
        elif part == ".lora_up.weight" and tensor.shape[0] != shape[0]:
            bad.append(key)
    return bad


def a1111_version(metadata: dict) -> str:
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def forge_version(metadata: dict) -> str:
    arch = str(metadata.get("modelspec.architecture", ""))
    if arch == "stable-diffusion-xl-v1-base/lora" or str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if arch == "stable-diffusion-v1/lora" else "Unknown"


UI_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
