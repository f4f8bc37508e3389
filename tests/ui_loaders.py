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


# Flow-matching transformers (ComfyUI's `model_lora_keys_unet`):
# - Z-Image (ComfyUI's Lumina2 model): a LoRA key `diffusion_model.<diffusers module>` for the
#   modules `z_image_to_diffusers` lists (per block of `layers`, `noise_refiner`,
#   `context_refiner`: attention q/k/v (slices of the native fused qkv) and out, the three
#   feed-forward layers, the modulation; the embedders and the final layer);
# - Flux.2: the native (Black Forest Labs) weights, each read as `lora_unet_<name with _>`.
ZIMAGE_BLOCK_MODULES = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
ZIMAGE_OTHER_MODULES = ("all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "all_x_embedder.2-1",
                        "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")


def zimage_module_map(transformer) -> dict:
    """ComfyUI's LoRA module names for a Z-Image transformer -> the weight shape each patches."""
    blocks = [f"{group}.{i}." for group, n in (("layers", "n_layers"), ("noise_refiner", "n_refiner_layers"),
                                                ("context_refiner", "n_refiner_layers"))
              for i in range(transformer.config[n])]
    names = [b + m for b in blocks for m in ZIMAGE_BLOCK_MODULES] + list(ZIMAGE_OTHER_MODULES)
    weights = dict(transformer.named_parameters())
    return {"diffusion_model." + n: tuple(weights[n + ".weight"].shape) for n in names if n + ".weight" in weights}


def flux2_native_shapes(config) -> dict:
    """The Black Forest Labs Flux.2 transformer's linear weights (name without `.weight`) and
    shapes, from a diffusers `Flux2Transformer2DModel` config."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    m = int(d * config["mlp_ratio"])
    shapes = {"img_in": (d, config["in_channels"]), "txt_in": (d, config["joint_attention_dim"]),
              "time_in.in_layer": (d, config["timestep_guidance_channels"]), "time_in.out_layer": (d, d),
              "final_layer.linear": (config["patch_size"] ** 2 * (config["out_channels"] or config["in_channels"]), d),
              "final_layer.adaLN_modulation.1": (2 * d, d), "double_stream_modulation_img.lin": (6 * d, d),
              "double_stream_modulation_txt.lin": (6 * d, d), "single_stream_modulation.lin": (3 * d, d)}
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            shapes.update({f"{block}_attn.qkv": (3 * d, d), f"{block}_attn.proj": (d, d),
                           f"{block}_mlp.0": (2 * m, d), f"{block}_mlp.2": (d, m)})
    for i in range(config["num_single_layers"]):
        shapes.update({f"single_blocks.{i}.linear1": (3 * d + 2 * m, d), f"single_blocks.{i}.linear2": (d, d + m)})
    return shapes


def flux2_module_map(transformer) -> dict:
    """ComfyUI's LoRA module names for a Flux.2 transformer -> the weight shape each patches."""
    return {"lora_unet_" + k.replace(".", "_"): v for k, v in flux2_native_shapes(transformer.config).items()}
