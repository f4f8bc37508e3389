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
    if metadata.get("modelspec.implementation") == "https://github.com/black-forest-labs/flux" \
            or arch == "flux-1-dev/lora":
        return "Flux"
    if arch == "stable-diffusion-xl-v1-base/lora" or str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if arch == "stable-diffusion-v1/lora" else "Unknown"


UI_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


# ----------------------------------------------------------------------------------- Flux.1
# ComfyUI and Forge load Flux.1 in Black Forest Labs' original layout (`double_blocks.N.img_attn.qkv`,
# `single_blocks.N.linear1`, ...) and build their LoRA key names from that model's own weights:
# `lora_unet_` + a weight's name without `.weight`, dots as underscores (`model_lora_keys_unet`),
# and for the CLIP-L text encoder `lora_te1_` / `lora_te_` + `text_model_encoder_layers_<i>_<module>`
# (`model_lora_keys_clip`, with CLIP-L present). The patch is alpha / rank * up @ down with rank =
# lora_down's rows. Forge lists a LoRA under Flux when `modelspec.implementation` is
# https://github.com/black-forest-labs/flux or `modelspec.architecture` is `flux-1-dev/lora`
# (checked before the SD rules).
# ComfyUI's `flux_to_diffusers` names where each diffusers weight lives in the original:
FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
               "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
FLUX_DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                   "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
FLUX_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                     "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
FLUX_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
FLUX_TOP = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
            "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
FLUX_SWAPPED = ("norm_out.linear", "final_layer.adaLN_modulation.1")
"""Stored with its shift and scale halves in the other order than diffusers'."""


def flux_original_map(hidden: int, double: int, single: int) -> dict:
    """diffusers `FluxTransformer2DModel` weight -> (original weight, first row, rows or None for all,
    swapped halves), for `hidden`-wide attention and `double`/`single` blocks (RMS norms store
    `scale`, as in the original checkpoints; proj_mlp is 4x `hidden`)."""
    out = {}
    for end in ("weight", "bias"):
        for i in range(double):
            d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out.update({f"{d}{k}.{end}": (f"{o}{v}.{end}", 0, None, False) for k, v in FLUX_DOUBLE.items()})
            for fused, parts in FLUX_DOUBLE_QKV.items():
                out.update({f"{d}{p}.{end}": (f"{o}{fused}.{end}", n * hidden, hidden, False)
                            for n, p in enumerate(parts)})
        for i in range(single):
            d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out.update({f"{d}{k}.{end}": (f"{o}{v}.{end}", 0, None, False) for k, v in FLUX_SINGLE.items()})
            out.update({f"{d}attn.to_{p}.{end}": (f"{o}linear1.{end}", n * hidden, hidden, False)
                        for n, p in enumerate("qkv")})
            out[f"{d}proj_mlp.{end}"] = (f"{o}linear1.{end}", 3 * hidden, 4 * hidden, False)
        out.update({f"{k}.{end}": (f"{v}.{end}", 0, None, False) for k, v in FLUX_TOP.items()})
        out[f"{FLUX_SWAPPED[0]}.{end}"] = (f"{FLUX_SWAPPED[1]}.{end}", 0, None, True)
    for i in range(double):
        out.update({f"transformer_blocks.{i}.{k}.weight": (f"double_blocks.{i}.{v}.scale", 0, None, False)
                    for k, v in FLUX_DOUBLE_NORMS.items()})
    for i in range(single):
        out.update({f"single_transformer_blocks.{i}.{k}.weight": (f"single_blocks.{i}.{v}.scale", 0, None, False)
                    for k, v in FLUX_SINGLE_NORMS.items()})
    return out


def flux_module_map(original: dict, text_encoder=None) -> dict:
    """LoRA module name -> weight shape of what it patches in a Flux model, as ComfyUI and Forge
    name them: the original-layout transformer `original` and the CLIP-L `text_encoder`."""
    found = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): tuple(v.shape)
             for k, v in original.items() if k.endswith(".weight")}
    if text_encoder is not None:
        for key, value in text_encoder.state_dict().items():
            m = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)\.weight", key)
            if m and m.group(2) in CLIP_LINEAR:
                for prefix in ("lora_te_", "lora_te1_"):
                    found[f"{prefix}text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"] = \
                        tuple(value.shape)
    return found


def comfy_apply(original: dict, lora: dict) -> dict:
    """The original-layout weights after ComfyUI/Forge patch them with a kohya-layout `lora`
    (transformer keys only; strength 1)."""
    names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    out = dict(original)
    for key, down in lora.items():
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            up, alpha = lora[module + ".lora_up.weight"], lora[module + ".alpha"].item()
            target = names[module]
            out[target] = out[target] + (alpha / down.shape[0]) * (up.float() @ down.float()).to(out[target].dtype)
    return out
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
