"""Single-file export: a diffusers Stable Diffusion (1.x, 2.x, XL) folder -> one `.safetensors`/`.ckpt`.

The file uses the original Stable Diffusion (CompVis/LDM) layout that AUTOMATIC1111,
ComfyUI and diffusers' `from_single_file` read:

- UNet under `model.diffusion_model.` (`input_blocks.N`, `middle_block.N`,
  `output_blocks.N`, resnets as `in_layers/out_layers/emb_layers/skip_connection`);
- VAE under `first_stage_model.` (`encoder.down.N.block.M`, `decoder.up.N` counted from
  the lowest resolution up, mid attention as `q/k/v/proj_out` 1x1 convolutions);
- text encoder, depending on the model family (see `text_encoder_layout`):
  SD 1.x (OpenAI CLIP) under `cond_stage_model.transformer.text_model.`, and
  SD 2.x (OpenCLIP) under `cond_stage_model.model.` (`transformer.resblocks.N.attn.
  in_proj_weight` holding q, k and v stacked, `positional_embedding`, `ln_final`,
  `text_projection` stored as [width, projection], `logit_scale`), and SDXL's two encoders
  under `conditioner.embedders.0.transformer.text_model.` (CLIP) and
  `conditioner.embedders.1.model.` (OpenCLIP, with its trained `text_projection`);
- SDXL's added conditioning (`add_embedding`) as `model.diffusion_model.label_emb.0.*`.

The key mapping is derived from the component configs (number of blocks, layers per
block, which blocks have attention), never from SD 1.5's fixed block counts, so SD 1.x,
SD 2.x and the tiny test models all export. Tensor shapes are kept as the original layout
expects: UNet `proj_in/proj_out` stay 1x1 convolutions for SD 1.x and linear layers for
SD 2.x (`use_linear_projection`), exactly as stored in the diffusers folder; the VAE's
linear attention weights `[C, C]` become `[C, C, 1, 1]`.

The OpenCLIP parts a diffusers folder does not hold are filled in so that the file has
every tensor of the original layout: `logit_scale` (ln 100, OpenCLIP's trained value) and,
for SD 2.x, `text_projection` (identity) and the last transformer block, which diffusers
drops because SD 2.x reads the penultimate layer; it is written as an identity block (zero
output projections), so a reader that runs it gets the penultimate layer's result too.
Not written, because no reader needs them: the DDPM schedule buffers (`betas`,
`alphas_cumprod`, ...) and EMA weights.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dbtools.after import kohya
from dbtools.after.kohya import lora_folder_metadata, write_kohya_lora
from dbtools.core.atomic import atomic_write, remove_leftovers
from dbtools.core.errors import UserError
from dbtools.families import flux_files
from dbtools.families.base import ModelFamily, SingleFileLayout, UnsupportedFamily
from dbtools.families.models import (
    folder_family,
    is_checkpoint_folder,
    load_checkpoint_pipeline,
    model_folder_problems,
    safe_torch_load,
    weight_stems,
)
from dbtools.families.sd import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

logger = logging.getLogger(__name__)

KOHYA_LAYOUT = "kohya-style LoRA for AUTOMATIC1111/ComfyUI"
WHERE_IT_GOES = {
    "lora": "A LoRA file: put it in models/Lora (AUTOMATIC1111, Forge) or models/loras (ComfyUI) and use it with "
            "its base model. diffusers' load_lora_weights reads the step folder's pytorch_lora_weights.safetensors "
            "instead (the web UIs ignore that one).",
    "checkpoint": "A full checkpoint: put it in models/Stable-diffusion (AUTOMATIC1111, Forge) or models/checkpoints "
                  "(ComfyUI).",
    "denoiser": "The diffusion model alone (no text encoders, no VAE; e.g. a Flux.1 transformer): put it in "
                "models/diffusion_models (ComfyUI's Load Diffusion Model node, with the model's text encoders and "
                "VAE: for Flux.1 clip_l, t5xxl and ae) or models/Stable-diffusion (Forge, choosing the same files "
                "under VAE / Text Encoder).",
}
"""The line `export` prints after a file: which folder of which program it goes into."""
LORA_FILE = "pytorch_lora_weights.safetensors"
"""What a LoRA training step folder holds instead of a full pipeline."""
OPENCLIP_LOGIT_SCALE = math.log(100.0)
"""OpenCLIP's `logit_scale` after training (clamped at ln 100); unused by image generation."""
CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")
EXPORT_SUFFIXES = (".safetensors", *CKPT_SUFFIXES)
"""The endings of the files an export writes (and of its temporary files)."""
"""Output names written as a torch pickle (`{"state_dict": ...}`) rather than safetensors."""

_UNET_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UNET_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Names older diffusers versions saved for the VAE attention (same [C, C] linear weights).
_VAE_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                   "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


class ExportError(UserError):
    """The export cannot run because of something the user can fix; the message says what."""


@dataclass
class ExportConfig:
    """What `run_export` converts and where it writes (the converter's command-line flags)."""

    model_path: Path
    """A diffusers Stable Diffusion folder (with unet/, vae/, text_encoder/)."""
    checkpoint_path: Path
    """The single file to write: `.safetensors` (default format) or `.ckpt`."""
    half: bool = False
    """Write floating-point weights as fp16 (half the size)."""
    use_safetensors: bool | None = None
    """Force safetensors (True) or a torch pickle (False); None decides by extension."""
    fuse_lora: bool = False
    """A LoRA step folder becomes one full checkpoint (base model with the adapters fused in)
    instead of the LoRA file for the web UIs."""


@dataclass
class ExportResult:
    """What `run_export` wrote."""

    path: Path
    num_tensors: int
    num_bytes: int
    dtype: str
    layout: str
    """The model family's key, or "kohya" for a LoRA file."""
    file_format: str
    description: str = KOHYA_LAYOUT
    """What the layout is, in words (`SingleFileLayout.description`)."""
    kind: str = "lora"
    """What the file is for the UIs (a key of `WHERE_IT_GOES`)."""

    def summary(self) -> str:
        size = f"{self.num_bytes / 2**20:.1f} MiB" if self.num_bytes >= 2**20 else f"{self.num_bytes} bytes"
        return (f"wrote {self.path}: {self.num_tensors} tensors, {size}, {self.dtype}, "
                f"{self.file_format}, layout {self.layout} ({self.description})\n{WHERE_IT_GOES[self.kind]}")


# --------------------------------------------------------------------------- pure rules


def output_format(checkpoint_path: str | Path, use_safetensors: bool | None = None) -> str:
    """The file format for `checkpoint_path`: "safetensors" or "ckpt"; `ExportError` if contradictory.

    With `use_safetensors=None` the extension decides: `.ckpt`/`.pt`/`.pth` -> a torch
    pickle, anything else -> safetensors. An explicit choice must agree with the
    extension, because AUTOMATIC1111 and ComfyUI pick their reader by extension.
    """
    suffix = Path(checkpoint_path).suffix.lower()
    pickle_name = suffix in CKPT_SUFFIXES
    if use_safetensors is None:
        return "ckpt" if pickle_name else "safetensors"
    if use_safetensors and pickle_name:
        raise ExportError(f"{checkpoint_path}: --use_safetensors writes a safetensors file, but the name "
                          f"ends with {suffix}, so AUTOMATIC1111/ComfyUI would try to unpickle it. "
                          f"Name it {Path(checkpoint_path).with_suffix('.safetensors').name} "
                          "(or drop --use_safetensors to write a .ckpt).")
    if not use_safetensors and suffix == ".safetensors":
        raise ExportError(f"{checkpoint_path}: a torch pickle was asked for (use_safetensors=False), but "
                          "the name ends with .safetensors. Name it .ckpt, or allow safetensors.")
    return "safetensors" if use_safetensors else "ckpt"


def text_encoder_layout(text_config: dict) -> str:
    """Which original text encoder layout a config belongs to: "clip" (OpenAI CLIP, SD 1.x) or
    "openclip" (SD 2.x).

    SD 2.x's OpenCLIP text encoder uses plain GELU (`hidden_act="gelu"`); OpenAI's CLIP in
    SD 1.x uses `quick_gelu`. When the activation is neither, a 1024-wide encoder is taken
    as OpenCLIP (SD 2.x) and anything else as CLIP (SD 1.x).
    """
    act = text_config.get("hidden_act", "quick_gelu")
    if act == "gelu":
        return "openclip"
    if act == "quick_gelu":
        return "clip"
    guess = "openclip" if text_config.get("hidden_size") == 1024 else "clip"
    logger.warning("text encoder activation %r is neither CLIP's nor OpenCLIP's; writing the %s layout",
                   act, guess)
    return guess


def unet_key_map(unet_config: dict, keys: Iterable[str] | None = None) -> dict[str, str]:
    """Map every diffusers UNet weight name to its original name (with `model.diffusion_model.`).

    The block numbering follows from the config: each down block has `layers_per_block`
    resnets (`input_blocks.N.0`), plus an attention (`input_blocks.N.1`) in `CrossAttn`
    blocks and a downsampler (`input_blocks.N.0.op`) after all but the last; each up block
    has `layers_per_block + 1` (`output_blocks.N`), its upsampler after the attention when
    there is one. `keys` defaults to the weights of a UNet built from the config.
    Raises `ExportError` for a UNet that is not SD 1.x/2.x-shaped.
    """
    rules = _unet_rules(unet_config)
    if keys is None:
        keys = _model_keys(_UNET_CLASS, unet_config)
    return _apply_rules(keys, rules, UNET_PREFIX, "unet")


def vae_key_map(vae_config: dict, keys: Iterable[str] | None = None) -> dict[str, str]:
    """Map every diffusers VAE weight name to its original name (with `first_stage_model.`).

    Encoder blocks keep their order (`encoder.down.N.block.M`); decoder blocks are counted
    from the lowest resolution in the original (`decoder.up_blocks.i` -> `decoder.up.{n-1-i}`).
    `keys` defaults to the weights of a VAE built from the config.
    """
    rules = _vae_rules(vae_config)
    if keys is None:
        keys = _model_keys(_VAE_CLASS, vae_config)
    return _apply_rules(keys, rules, VAE_PREFIX, "vae")


def text_encoder_key_map(text_config: dict, keys: Iterable[str] | None = None,
                         layout: str | None = None, prefix: str | None = None) -> dict[str, str]:
    """Map every diffusers text-encoder weight name to its original name.

    `keys` are `CLIPTextModel`/`CLIPTextModelWithProjection` weight names (with or without
    the `text_model.` prefix; default: those of a `CLIPTextModel` built from the config). For
    "openclip" the q, k and v projections of a layer all map to that layer's
    `attn.in_proj_weight`/`in_proj_bias`, which holds them stacked in q, k, v order (see
    `text_encoder_to_original`). `prefix` replaces the layout's usual prefix (SDXL's
    encoders live under `conditioner.embedders.N.`).
    """
    layout = layout or text_encoder_layout(text_config)
    prefix = prefix or (CLIP_PREFIX if layout == "clip" else OPENCLIP_PREFIX)
    if keys is None:
        keys = _model_keys(_CLIP_CLASS, text_config)
    out, unknown = {}, []
    for key in keys:
        name = _strip_text_prefix(key)
        target = prefix + name if layout == "clip" else _openclip_name(name, prefix)
        if target is None:
            unknown.append(key)
        else:
            out[key] = target
    _raise_unknown(unknown, "text_encoder")
    return out


def unet_to_original(state_dict: dict, unet_config: dict) -> dict:
    """Rename a diffusers UNet state dict to original names (`model.diffusion_model.*`, same shapes)."""
    key_map = unet_key_map(unet_config, state_dict)
    return {key_map[k]: v for k, v in state_dict.items()}


def vae_to_original(state_dict: dict, vae_config: dict) -> dict:
    """Rename a diffusers VAE state dict to original names (`first_stage_model.*`).

    The mid-block attention's linear `[C, C]` weights become `[C, C, 1, 1]` convolutions.
    """
    state_dict = normalize_vae_keys(state_dict)
    key_map = vae_key_map(vae_config, state_dict)
    out = {}
    for key, tensor in state_dict.items():
        name = key_map[key]
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", name) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[name] = tensor
    return out


def text_encoder_to_original(state_dict: dict, text_config: dict, layout: str | None = None,
                             prefix: str | None = None, add_last_block: bool | None = None) -> dict:
    """Convert a text encoder state dict to the original layout of `layout` ("clip"/"openclip").

    CLIP also gets `embeddings.position_ids` (int64, as in the original checkpoints).
    OpenCLIP stacks each layer's q, k, v projections into `in_proj_*`, stores
    `text_projection` transposed ([width, projection]) and gains `logit_scale`; a
    `CLIPTextModel` without projection gets an identity `text_projection`. `add_last_block`
    (default: for SD 2.x's own prefix) appends an identity block for the layer diffusers
    drops. `prefix` as in `text_encoder_key_map`.
    """
    import torch

    layout = layout or text_encoder_layout(text_config)
    prefix = prefix or (CLIP_PREFIX if layout == "clip" else OPENCLIP_PREFIX)
    state_dict = normalize_text_encoder_keys(state_dict)
    key_map = text_encoder_key_map(text_config, state_dict, layout, prefix)
    grouped: dict[str, list[str]] = {}
    for key in state_dict:
        grouped.setdefault(key_map[key], []).append(key)
    out = {}
    for name, sources in grouped.items():
        if len(sources) == 1:
            out[name] = state_dict[sources[0]]
        else:
            sources.sort(key=_qkv_rank)
            out[name] = torch.cat([state_dict[k] for k in sources], dim=0)
    if layout == "clip":
        positions = int(text_config.get("max_position_embeddings", 77))
        out[prefix + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
        return out
    if add_last_block is None:
        add_last_block = prefix == OPENCLIP_PREFIX
    return _complete_openclip(out, text_config, prefix, add_last_block)


def _complete_openclip(out: dict, text_config: dict, prefix: str, add_last_block: bool) -> dict:
    """Give an OpenCLIP state dict the tensors diffusers does not keep (see the module notes)."""
    import torch

    like = out[prefix + "ln_final.weight"]
    width = like.shape[0]
    projection = prefix + "text_projection"
    if projection in out:
        out[projection] = out[projection].T  # nn.Linear stores [projection, width]
    else:
        out[projection] = torch.eye(width, dtype=like.dtype, device=like.device)
    out[prefix + "logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=like.dtype, device=like.device)
    if add_last_block:
        out.update(_identity_openclip_block(out, prefix, int(text_config["num_hidden_layers"])))
    return out


def _identity_openclip_block(out: dict, prefix: str, index: int) -> dict:
    """Block `index` shaped like block 0, with zero output projections: it returns its input."""
    import torch

    first, block = f"{prefix}transformer.resblocks.0.", f"{prefix}transformer.resblocks.{index}."
    made = {}
    for name, tensor in out.items():
        if name.startswith(first):
            leaf = name[len(first):]
            fill = torch.ones_like if leaf in ("ln_1.weight", "ln_2.weight") else torch.zeros_like
            made[block + leaf] = fill(tensor)
    return made


def normalize_text_encoder_keys(state_dict: dict) -> dict:
    """Current `CLIPTextModel` names: no `text_model.` prefix, no `position_ids` buffer.

    Folders saved by older transformers versions carry both.
    """
    return {_strip_text_prefix(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def normalize_vae_keys(state_dict: dict) -> dict:
    """Current VAE attention names (`to_q/to_k/to_v/to_out.0`) for folders saved by old diffusers."""
    out = {}
    for key, tensor in state_dict.items():
        match = re.match(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)(\..*)$", key)
        out[f"{match[1]}{_VAE_LEGACY[match[2]]}{match[3]}" if match else key] = tensor
    return out


_UNET_CLASS, _VAE_CLASS, _CLIP_CLASS = ("diffusers.UNet2DConditionModel", "diffusers.AutoencoderKL",
                                       "transformers.CLIPTextModel")
"""What the converters below read (the default model built to list a config's weight names)."""

CONVERTERS = {
    "flux_transformer": lambda sd, config, prefix: {prefix + k: v for k, v in
                                                    flux_files.transformer_to_original(sd).items()},
    "sd_unet": lambda sd, config, prefix: unet_to_original(sd, config),
    "sd_vae": lambda sd, config, prefix: vae_to_original(sd, config),
    "clip": lambda sd, config, prefix: text_encoder_to_original(sd, config, "clip", prefix),
    "openclip": lambda sd, config, prefix: text_encoder_to_original(sd, config, "openclip", prefix),
}
"""The converters a family's `SingleFileLayout` names, by name: (state dict, config, key prefix)
-> original-layout tensors."""


def to_original_state_dict(weights: dict[str, dict], configs: dict, family: ModelFamily,
                           half: bool = False) -> dict:
    """One original-layout state dict from the diffusers state dicts of `family`'s components.

    `weights` and `configs` hold each component's state dict and config dict, by component
    name (SD: `unet`, `vae`, `text_encoder`; SDXL also `text_encoder_2`); the family's
    `single_file_layout` says which converter writes each and under which prefix (SDXL: the
    first encoder as CLIP under `conditioner.embedders.0.`, the second as OpenCLIP under
    `conditioner.embedders.1.`). With `half`, floating-point tensors become fp16 (integer
    buffers such as `position_ids` stay int64). Every tensor is contiguous (safetensors
    requires it).
    """
    import torch

    layout = family.single_file_layout()
    half_dtype = getattr(torch, layout.half_dtype)
    out = {}
    for component, (converter, prefix) in layout.parts.items():
        out.update(CONVERTERS[converter](weights[component], configs[component], prefix))
    for key, tensor in out.items():
        if half and tensor.is_floating_point():
            tensor = tensor.to(half_dtype)
        out[key] = tensor.contiguous()
    return out


def _unet_rules(config: dict) -> dict[str, tuple[str, dict]]:
    lpb = _single_layers_per_block(config)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for kinds, known in ((down, _UNET_DOWN), (up, _UNET_UP)):
        bad = [k for k in kinds if k not in known]
        if bad:
            raise ExportError(f"UNet block type {bad[0]} has no original Stable Diffusion equivalent; "
                              "only SD 1.x/2.x-style UNets can be exported to a single file.")
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid != "UNetMidBlock2DCrossAttn":
        raise ExportError(f"UNet mid block {mid} has no original Stable Diffusion equivalent.")
    added = config.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise ExportError(f"UNet addition_embed_type={added!r} has no original Stable Diffusion equivalent.")
    rules: dict[str, tuple[str, dict]] = {
        "conv_in.": ("input_blocks.0.0.", {}),
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
    }
    if added == "text_time":  # SDXL: pooled text + size/crop conditioning
        rules["add_embedding.linear_1."] = ("label_emb.0.0.", {})
        rules["add_embedding.linear_2."] = ("label_emb.0.2.", {})
    for b, kind in enumerate(down):
        for layer in range(lpb):
            i = 1 + b * (lpb + 1) + layer
            rules[f"down_blocks.{b}.resnets.{layer}."] = (f"input_blocks.{i}.0.", _UNET_RESNET)
            if _UNET_DOWN[kind]:
                rules[f"down_blocks.{b}.attentions.{layer}."] = (f"input_blocks.{i}.1.", {})
        if b < len(down) - 1:
            rules[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.", {})
    for b, kind in enumerate(up):
        for layer in range(lpb + 1):
            i = b * (lpb + 1) + layer
            rules[f"up_blocks.{b}.resnets.{layer}."] = (f"output_blocks.{i}.0.", _UNET_RESNET)
            if _UNET_UP[kind]:
                rules[f"up_blocks.{b}.attentions.{layer}."] = (f"output_blocks.{i}.1.", {})
        if b < len(up) - 1:
            slot = 2 if _UNET_UP[kind] else 1
            rules[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.", {})
    return rules


def _single_layers_per_block(config: dict) -> int:
    lpb = config.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ExportError(f"UNet layers_per_block={list(lpb)} differs between blocks; the original "
                              "layout needs one number for all blocks.")
        lpb = lpb[0]
    return int(lpb)


def _vae_rules(config: dict) -> dict[str, tuple[str, dict]]:
    lpb = int(config.get("layers_per_block", 2))
    n_down, n_up = len(config["down_block_types"]), len(config["up_block_types"])
    rules: dict[str, tuple[str, dict]] = {"quant_conv.": ("quant_conv.", {}),
                                          "post_quant_conv.": ("post_quant_conv.", {})}
    for part in ("encoder", "decoder"):
        rules.update({
            f"{part}.conv_in.": (f"{part}.conv_in.", {}),
            f"{part}.conv_out.": (f"{part}.conv_out.", {}),
            f"{part}.conv_norm_out.": (f"{part}.norm_out.", {}),
            f"{part}.mid_block.resnets.0.": (f"{part}.mid.block_1.", _VAE_RESNET),
            f"{part}.mid_block.resnets.1.": (f"{part}.mid.block_2.", _VAE_RESNET),
            f"{part}.mid_block.attentions.0.": (f"{part}.mid.attn_1.", _VAE_ATTENTION),
        })
    for i in range(n_down):
        for j in range(lpb):
            rules[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
        rules[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
    for i in range(n_up):
        level = n_up - 1 - i
        for j in range(lpb + 1):
            rules[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{level}.block.{j}.", _VAE_RESNET)
        rules[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{level}.upsample.conv.", {})
    return rules


def _apply_rules(keys: Iterable[str], rules: dict[str, tuple[str, dict]], prefix: str,
                 component: str) -> dict[str, str]:
    """Rename each key by its longest matching module prefix, then its leaf (`renames`)."""
    ordered = sorted(rules, key=len, reverse=True)
    out, unknown = {}, []
    for key in keys:
        rule = next((p for p in ordered if key.startswith(p)), None)
        if rule is None:
            unknown.append(key)
            continue
        target, renames = rules[rule]
        out[key] = prefix + target + _rename_leaf(key[len(rule):], renames)
    _raise_unknown(unknown, component)
    return out


def _rename_leaf(rest: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _raise_unknown(unknown: list[str], component: str) -> None:
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ExportError(f"{component}: no original Stable Diffusion name for {', '.join(unknown[:3])}{more}. "
                          "This is not an SD 1.x/2.x/XL model this exporter understands.")


def _strip_text_prefix(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def _openclip_name(name: str, prefix: str = OPENCLIP_PREFIX) -> str | None:
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight",
             "final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}
    if name in fixed:
        return prefix + fixed[name]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not match:
        return None
    layer, module, kind = match.groups()
    block = f"{prefix}transformer.resblocks.{layer}."
    if module in (f"self_attn.{p}" for p in _QKV):
        return f"{block}attn.in_proj_{kind}"
    if module in _OPENCLIP_LAYER:
        return f"{block}{_OPENCLIP_LAYER[module]}.{kind}"
    return None


def _qkv_rank(key: str) -> int:
    return next(i for i, p in enumerate(_QKV) if f".{p}." in key)


def _model_keys(class_path: str, config: dict) -> list[str]:
    """Weight names of a `class_path` model ("diffusers.AutoencoderKL") built from `config` on
    the meta device (no memory, no I/O); a transformers model's names normalized as
    `normalize_text_encoder_keys` does."""
    import importlib

    from accelerate import init_empty_weights

    library, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(library), name)
    with init_empty_weights():
        model = cls.from_config(config) if library == "diffusers" else cls(cls.config_class.from_dict(config))
    keys = list(model.state_dict())
    if library == "transformers":
        keys = list(normalize_text_encoder_keys(dict.fromkeys(keys)))
    return keys


# --------------------------------------------------------------------------- files


def check_export_paths(model_path: str | Path, checkpoint_path: str | Path,
                       use_safetensors: bool | None = None) -> str:
    """Raise `ExportError` for a model folder or output path that cannot work; return the format."""
    model_path, checkpoint_path = Path(model_path), Path(checkpoint_path)
    if not model_path.exists():
        raise ExportError(f"{model_path}: does not exist. Give the diffusers model folder to convert "
                          "(a training step folder such as OUTPUT_DIR/800).")
    if model_path.is_file():
        raise ExportError(f"{model_path}: is a file. --model_path takes a diffusers folder (with unet/, "
                          "vae/ and text_encoder/); a single-file checkpoint needs no conversion.")
    problems = model_folder_problems(model_path, needed=()) or _component_problems(model_path)
    if problems:
        raise ExportError("\n".join(problems))
    if checkpoint_path.is_dir():
        raise ExportError(f"{checkpoint_path}: is a folder. --checkpoint_path takes a file name such as "
                          f"{checkpoint_path / 'model.safetensors'}.")
    if _overwrites_the_model(model_path, checkpoint_path):
        raise ExportError(f"--checkpoint_path {checkpoint_path} is inside --model_path {model_path}: the "
                          "export would overwrite or mix into the model it reads. Write it elsewhere, e.g. "
                          f"{model_path.resolve().parent / (model_path.resolve().name + '.safetensors')}.")
    return output_format(checkpoint_path, use_safetensors)


def export_family(model_path: Path) -> ModelFamily:
    """The family of the folder to export (`families.models.folder_family`); a family we do not
    train is an `ExportError` naming it."""
    try:
        return folder_family(model_path)
    except UnsupportedFamily as exc:
        raise ExportError(f"{model_path} is {exc}.") from None


def export_components(model_path: Path) -> tuple[str, ...]:
    """The component folders an export reads: those of its family's single-file layout."""
    return tuple(export_family(model_path).single_file_layout().parts)


def _overwrites_the_model(model_path: Path, checkpoint_path: Path) -> bool:
    """True when writing `checkpoint_path` would replace or add to what `model_path` holds:
    anything inside its sub-folders, or one of its own files. A single file beside the
    sub-folders (training's `<step>/model.safetensors`) is allowed."""
    model_dir, out = model_path.resolve(), checkpoint_path.resolve()
    if model_dir not in out.parents:
        return False
    if out.parent != model_dir:
        return True
    return out.exists() and out.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth")


def _component_problems(model_path: Path) -> list[str]:
    problems = []
    for component in export_components(model_path):
        sub = model_path / component
        if not (sub / "config.json").is_file():
            what = f"the '{component}' folder is missing" if not sub.is_dir() else f"{sub} has no config.json"
            problems.append(f"{model_path}: {what}. The model is incomplete: save or copy the whole "
                            "model folder again.")
            continue
        try:
            weight_files(sub, weight_stems(component))
        except ExportError as exc:
            problems.append(str(exc))
    return problems


def load_component(folder: str | Path, component: str) -> tuple[dict, dict]:
    """(config, state dict) of one component folder; pickles are read with `weights_only=True`."""
    sub = Path(folder) / component
    config = json.loads((sub / "config.json").read_text(encoding="utf-8"))
    state_dict: dict = {}
    for file in weight_files(sub, weight_stems(component)):
        state_dict.update(_read_weights(file))
    return config, state_dict


def weight_files(sub: Path, stems: tuple[str, ...]) -> list[Path]:
    """The weight files of a component folder: safetensors before `.bin`, full before variants.

    A sharded checkpoint (`*.index.json`) yields all its shards.
    """
    for ext in (".safetensors", ".bin"):
        for stem in stems:
            for index in [sub / f"{stem}{ext}.index.json", *sorted(sub.glob(f"{stem}{ext}.index.*.json"))]:
                if index.is_file():
                    shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
                    return [sub / name for name in dict.fromkeys(shards)]
            plain = sub / f"{stem}{ext}"
            if plain.is_file():
                return [plain]
            variants = sorted(sub.glob(f"{stem}.*{ext}"))
            if variants:
                logger.info("%s: using %s", sub, variants[0].name)
                return [variants[0]]
    raise ExportError(f"{sub}: no weights ({stems[0]}.safetensors). The save was interrupted: save or "
                      "copy the model folder again.")


def _read_weights(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types
            raise ExportError(f"{file}: not a valid .safetensors file ({exc}). The save was interrupted: "
                              "save or copy the model folder again.") from exc

    return safe_torch_load(file)


def _check_weights(component: str, class_path: str, config: dict, state_dict: dict, folder: Path) -> None:
    """The folder's weights must be exactly the `class_path` model its config describes."""
    if class_path.startswith("transformers."):
        have = set(normalize_text_encoder_keys(state_dict))
    elif class_path == _VAE_CLASS:
        have = set(normalize_vae_keys(state_dict))
    else:
        have = set(state_dict)
    want = set(_model_keys(class_path, config))
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        raise ExportError(f"{folder / component}: {len(missing)} weights missing (e.g. {missing[0]}). The "
                          "weights do not match config.json: save or copy the model folder again.")
    if extra:
        raise ExportError(f"{folder / component}: {len(extra)} weights that config.json does not describe "
                          f"(e.g. {extra[0]}). Is this a LoRA or another architecture? Export a full "
                          "Stable Diffusion 1.x/2.x folder.")


def _write(state_dict: dict, path: Path, file_format: str, metadata: dict[str, str] | None = None) -> None:
    """Write atomically (safetensors with `metadata` in its header); a full disk or a folder we
    cannot write to is one `ExportError` naming the folder (never the temp file), and no partial
    file is left."""
    def write(tmp: str) -> None:
        if file_format == "safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, tmp, metadata={**(metadata or {}), "format": "pt"})
        else:
            import torch

            torch.save({"state_dict": state_dict}, tmp)

    folder = path.parent.resolve()
    needed = sum(t.numel() * t.element_size() for t in state_dict.values())
    if _free_bytes(folder) < needed:
        raise ExportError(_disk_full_message(folder, needed))
    try:
        atomic_write(path, write)
    except PermissionError as exc:
        raise ExportError(f"{folder}: permission denied, cannot write the export there. Choose a "
                          "--checkpoint_path in a folder you can write to.") from exc
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise ExportError(f"{folder}: read-only file system, cannot write the export there. Choose "
                              "a --checkpoint_path on a writable disk.") from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError(_disk_full_message(folder, needed)) from exc
        raise
    except RuntimeError as exc:
        # torch.save reports a failed write as a RuntimeError from its zip writer.
        if "write failed" in str(exc) or "failed writing" in str(exc):
            raise ExportError(_disk_full_message(folder, needed)) from exc
        raise


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:  # a missing folder is created by the write; do not guess
        return 1 << 62


def _disk_full_message(folder: Path, needed: int) -> str:
    free = _free_bytes(folder)
    have = f"{free / 1e9:.2f} GB free" if free < 1 << 62 else "the disk filled up"
    return (f"{folder}: not enough disk space for the export: it needs about {needed / 1e9:.2f} GB, "
            f"{have}. Free some space, or choose a --checkpoint_path on another disk (--half halves "
            "the size).")


def run_export(config: ExportConfig) -> ExportResult:
    """Convert `config.model_path` to one original-layout file at `config.checkpoint_path`.

    Paths and the format are checked before any weights are read; the output appears only
    when complete (an existing file is replaced then, never left half-written).
    """
    model_path, out = Path(config.model_path), Path(config.checkpoint_path)

    if out.parent.is_dir():  # what an export that was killed left there
        remove_leftovers(out.parent, ("file",), suffixes=tuple({*EXPORT_SUFFIXES, out.suffix} - {""}))

    if is_checkpoint_folder(model_path):
        return _export_checkpoint(config)
    if is_lora_folder(model_path):
        return _export_fused_lora(config) if config.fuse_lora else _export_lora(config)
    file_format = check_export_paths(model_path, out, config.use_safetensors)
    family = export_family(model_path)
    layout = family.single_file_layout()
    configs, weights = {}, {}
    for component in layout.parts:
        configs[component], weights[component] = load_component(model_path, component)
        _check_weights(component, family.parts[component], configs[component], weights[component], model_path)
    logger.info("%s: %s model, converting to the original layout", model_path, layout.description)
    state_dict = to_original_state_dict(weights, configs, family, half=config.half)
    del weights  # with `half`, frees the full-precision originals before writing
    _write(state_dict, out, file_format, file_metadata(layout, out))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state_dict.values() if t.is_floating_point()})
    return ExportResult(path=out, num_tensors=len(state_dict), num_bytes=out.stat().st_size,
                        dtype="/".join(dtypes), layout=family.key, file_format=file_format,
                        description=layout.description, kind=_file_kind(family, layout))


def _file_kind(family: ModelFamily, layout: SingleFileLayout) -> str:
    """"denoiser" for a layout that holds the denoiser alone (Flux.1's transformer), else "checkpoint"."""
    return "denoiser" if set(layout.parts) == {family.denoiser} else "checkpoint"


def file_metadata(layout: SingleFileLayout, out: Path) -> dict[str, str]:
    """The layout's modelspec metadata for the file `out` (titled by its name, dated today); {} for none."""
    import datetime

    if not layout.metadata:
        return {}
    return {**layout.metadata, "modelspec.title": out.stem, "modelspec.date": datetime.date.today().isoformat()}


def _export_checkpoint(config: ExportConfig) -> ExportResult:
    """Export a training `checkpoint-<step>/` folder: its pipeline (base model plus trained
    weights, LoRA adapters fused in) is saved to a temporary diffusers folder first."""
    import dataclasses
    import tempfile


    pipe = load_checkpoint_pipeline(config.model_path)
    if any(getattr(m, "peft_config", None) for m in pipe.components.values()):
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    with tempfile.TemporaryDirectory(prefix="dbtools-export-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        del pipe
        logger.info("%s: a training checkpoint, exported with its run's base model", config.model_path)
        return run_export(dataclasses.replace(config, model_path=Path(tmp)))


def _export_fused_lora(config: ExportConfig) -> ExportResult:
    """A LoRA step folder fused into its run's base model. A family whose single file holds the
    denoiser alone (Flux.1) loads just that denoiser, fuses and converts it; others export the
    whole pipeline (`_export_checkpoint`)."""
    model_path, out = Path(config.model_path), Path(config.checkpoint_path)
    family = kohya.lora_family(model_path)
    layout = family.single_file_layout() if family is not None else None
    if layout is None or _file_kind(family, layout) != "denoiser":
        return _export_checkpoint(config)
    file_format = output_format(out, config.use_safetensors)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder. --checkpoint_path takes a file name such as "
                          f"{out / 'model.safetensors'}.")
    if any(not k.startswith(family.denoiser + ".") for k in kohya.read_lora(model_path)):
        logger.warning("%s: the LoRA also trained a text encoder, which a %s file does not hold; for that part "
                       "use the LoRA file (export without --fuse_lora)", model_path, layout.description)
    args = _lora_base(model_path)
    denoiser = load_denoiser(family, args["pretrained_model_name_or_path"], args.get("revision"), model_path)
    converter, prefix = layout.parts[family.denoiser]
    state = CONVERTERS[converter](denoiser.state_dict(), dict(denoiser.config), prefix)
    del denoiser
    import torch

    half = getattr(torch, layout.half_dtype)
    state = {k: (v.to(half) if config.half and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    _write(state, out, file_format, file_metadata(layout, out))
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    return ExportResult(path=out, num_tensors=len(state), num_bytes=out.stat().st_size, dtype="/".join(dtypes),
                        layout=family.key, file_format=file_format, description=layout.description, kind="denoiser")


def _lora_base(folder: Path) -> dict:
    """The run settings (`args.json`) of a LoRA step folder, which name its base model."""
    try:
        args = json.loads((folder / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        args = {}
    if not args.get("pretrained_model_name_or_path"):
        raise ExportError(f"{folder}: no args.json naming the base model the LoRA was trained on, so it cannot be "
                          "fused. Copy args.json from the run's other step folders, or export the LoRA file "
                          "instead (without --fuse_lora).")
    return args


def load_denoiser(family: ModelFamily, name: str, revision: str | None = None, lora_folder: Path | None = None):
    """`family`'s denoiser from the model `name` (a folder or Hub id) in its stored precision
    (float32 or float16 when the folder stores that, else bfloat16), never quantized, with the
    LoRA of `lora_folder` fused in. A gated or missing model is one `ExportError`."""
    import importlib

    library, _, cls_name = family.parts[family.denoiser].rpartition(".")
    cls = getattr(importlib.import_module(library), cls_name)
    local = Path(name) / family.denoiser
    try:
        model = cls.from_pretrained(name, subfolder=family.denoiser, revision=revision,
                                    torch_dtype=_stored_dtype(local))
    except OSError as exc:
        raise ExportError(f"{name}: cannot load its {family.denoiser} ({str(exc).splitlines()[0]}). A gated model "
                          f"({family.label} [dev] is) needs its licence accepted on the Hub and a login "
                          "(huggingface-cli login); or point args.json's pretrained_model_name_or_path at a local "
                          "copy.") from exc
    if lora_folder is not None:
        model.load_lora_adapter(str(lora_folder), weight_name=LORA_FILE, prefix=family.denoiser, adapter_name="export")
        model.fuse_lora(lora_scale=1.0)
        model.unload_lora()
    return model


def _stored_dtype(folder: Path):
    """The floating-point dtype a local component folder's safetensors store (bfloat16 if unknown)."""
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return torch.bfloat16
    with safe_open(str(files[0]), framework="pt") as fh:
        stored = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    return next((dtype for name, dtype in (("F32", torch.float32), ("F16", torch.float16)) if name in stored),
                torch.bfloat16)


def is_lora_folder(path: Path) -> bool:
    """True for a LoRA weights folder (`pytorch_lora_weights.safetensors`, no model folders)."""
    return (path / LORA_FILE).is_file() and not any((p / "config.json").is_file() for p in path.iterdir())


def _export_lora(config: ExportConfig) -> ExportResult:
    """A LoRA folder becomes a kohya-style LoRA file (see `dbtools.after.kohya`)."""
    out = Path(config.checkpoint_path)
    if config.use_safetensors is False or out.suffix.lower() != ".safetensors":
        raise ExportError(f"{out}: a LoRA is written as .safetensors (AUTOMATIC1111 and ComfyUI do not read "
                          f"LoRA pickles). Name it {out.with_suffix('.safetensors').name}.")
    metadata = lora_folder_metadata(config.model_path, out.stem)
    write_kohya_lora(config.model_path, out, half=config.half, metadata=metadata)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        count = len(fh.keys())
    return ExportResult(path=out, num_tensors=count, num_bytes=out.stat().st_size,
                        dtype="float16" if config.half else "as trained", layout="kohya",
                        file_format="safetensors")


def export_lora_fused(lora_folder: str | Path, checkpoint_path: str | Path, half: bool = False) -> Path:
    """Write a LoRA weights folder as one full original-layout checkpoint: the run's base
    model (named in its `args.json`) with the adapters fused in (for Flux.1: the transformer
    alone); return its path."""
    return run_export(ExportConfig(Path(lora_folder), Path(checkpoint_path), half, None, True)).path


def export_single_file(model_path: str | Path, checkpoint_path: str | Path, half: bool = False,
                       use_safetensors: bool | None = None) -> Path:
    """Write the diffusers SD folder `model_path` as one original-layout file; return its path.

    Safetensors unless `checkpoint_path` ends with `.ckpt`/`.pt`/`.pth` (then
    `torch.save({"state_dict": ...})`); `use_safetensors` forces a format and must agree
    with the extension. `half=True` writes fp16. `StableDiffusionPipeline.from_single_file
    (path, config=model_path)` reads the file back to the same weights.
    """
    return run_export(ExportConfig(Path(model_path), Path(checkpoint_path), half, use_safetensors)).path


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m dbtools export",
        description="Convert a diffusers Stable Diffusion folder (e.g. a training step folder) into one "
                    "file in the original layout that AUTOMATIC1111 and ComfyUI load. SD 1.x, 2.x and XL. "
                    "A LoRA step folder (pytorch_lora_weights.safetensors) becomes a kohya-style LoRA file "
                    "with kohya's metadata, or with --fuse_lora one full checkpoint.",
    )
    parser.add_argument("--model_path", required=True, help="the diffusers folder to convert")
    parser.add_argument("--checkpoint_path", required=True,
                        help="the file to write. Its extension picks the format: .safetensors (the "
                             "default, cannot run code when loaded) or .ckpt (a torch pickle for old tools)")
    parser.add_argument("--half", action="store_true", help="save weights in fp16 (half the size)")
    parser.add_argument("--fuse_lora", action="store_true",
                        help="for a LoRA step folder: write one full checkpoint, the run's base model with the "
                             "LoRA fused in. Without it a LoRA step folder becomes the LoRA file for "
                             "AUTOMATIC1111, Forge and ComfyUI")
    parser.add_argument("--use_safetensors", action="store_true", default=None,
                        help="write safetensors. Already the default unless --checkpoint_path ends with "
                             ".ckpt; together with a .ckpt name it is refused, because loaders choose "
                             "their reader by the extension")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools export --model_path DIR --checkpoint_path OUT.safetensors [--half]`."""
    args = parse_args(argv)
    config = ExportConfig(Path(args.model_path), Path(args.checkpoint_path), args.half, args.use_safetensors,
                          args.fuse_lora)
    result = run_export(config)
    print(result.summary())
    return 0
