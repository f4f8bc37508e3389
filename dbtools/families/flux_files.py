"""Flux.1 files for other programs: the LoRA file ComfyUI and Forge load, and the transformer as
one file in Black Forest Labs' original layout.

Both rename diffusers' `FluxTransformer2DModel` weights to the original (BFL) names, which
ComfyUI, Forge and BFL's reference code use. The original fuses some diffusers modules:

- `double_blocks.N.img_attn.qkv` holds `transformer_blocks.N.attn.to_q`, `to_k`, `to_v` stacked
  along the output rows; `txt_attn.qkv` the same for `add_q_proj`, `add_k_proj`, `add_v_proj`;
- `single_blocks.N.linear1` holds `to_q`, `to_k`, `to_v` and `proj_mlp` (4x as wide) stacked;
- `final_layer.adaLN_modulation.1` is `norm_out.linear` with its two halves swapped (the
  original computes shift then scale, diffusers scale then shift);
- RMS-norm weights are called `scale` (`img_attn.norm.query_norm.scale`).

The UI LoRA file uses kohya's layout for Flux (what kohya's sd-scripts write):
`lora_unet_<original module, dots as underscores>` with `.lora_down.weight`, `.lora_up.weight`
and `.alpha` (the weight change is alpha / rank * up @ down), and `lora_te1_text_model_...` for
the CLIP-L text encoder. ComfyUI and Forge both name `lora_unet_` + every weight of the loaded
Flux model (their `model_lora_keys_unet` reads the model's own original-layout state dict), so
every key reaches a module whatever way the model was loaded. diffusers' `load_lora_weights`
reads the layout too, for Flux.1's full width and for modules inside the blocks. A fused
module's LoRA is its parts' LoRAs side by side: the downs stacked (rank = the sum of the ranks),
the ups block-diagonal (each part's up in its own rows and rank columns, zeros elsewhere, zero
rows for a part that was not trained), alpha = the sum of the alphas, so alpha / rank stays each
part's scale and the weight change is exactly the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from dbtools.core.errors import UserError

# diffusers module inside transformer_blocks.N -> (original module inside double_blocks.N, part)
_DOUBLE = {
    "norm1.linear": ("img_mod.lin", 0), "norm1_context.linear": ("txt_mod.lin", 0),
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0), "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0),
    "attn.norm_q": ("img_attn.norm.query_norm", 0), "attn.norm_k": ("img_attn.norm.key_norm", 0),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", 0), "attn.norm_added_k": ("txt_attn.norm.key_norm", 0),
}
# diffusers module inside single_transformer_blocks.N -> (original module inside single_blocks.N, part)
_SINGLE = {
    "norm.linear": ("modulation.lin", 0), "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0),
    "attn.norm_q": ("norm.query_norm", 0), "attn.norm_k": ("norm.key_norm", 0),
}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear",
}
FUSED_PARTS = {"qkv": 3, "linear1": 4}
"""Original modules that stack several diffusers modules (by last name), and how many."""
SWAPPED = "final_layer.adaLN_modulation.1"
"""The original module whose two output halves are in the other order than diffusers'."""
MLP_RATIO = 4
"""`proj_mlp` is this many times as wide as the attention (Flux.1's single blocks)."""
CLIP_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "mlp.fc1", "mlp.fc2")
"""The CLIP layers' linear modules the UIs patch from `lora_te1_` keys."""
UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te1_"
BASE_MODEL_VERSION = "flux1"
"""kohya's `ss_base_model_version` for Flux.1 LoRAs."""
ARCHITECTURE = "flux-1-dev"
"""`modelspec.architecture` of Flux.1 [dev] (a LoRA's gets `/lora`); Forge lists a LoRA with
`flux-1-dev/lora`, or with BFL's implementation URL, under Flux."""
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
TRANSFORMER_METADATA = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURE,
                        "modelspec.implementation": IMPLEMENTATION, "modelspec.resolution": "1024x1024"}
"""modelspec metadata of a single-file Flux.1 transformer."""
NETWORK_MODULE = "networks.lora_flux"
"""`ss_network_module` of kohya's Flux LoRAs."""


class FluxFileError(UserError):
    """A Flux file cannot be written because of something the user can fix."""


# --------------------------------------------------------------------------- names


def original_module(module: str) -> tuple[str, int, int]:
    """(original module, part, parts) of a diffusers `FluxTransformer2DModel` module name.

    `part` is the module's place among the `parts` diffusers modules the original stacks into
    one (`attn.to_k` of a double block: part 1 of 3 of `img_attn.qkv`); 0 of 1 when not fused.
    Raises `FluxFileError` for a name the original layout does not have.
    """
    match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if match:
        table, block = (_DOUBLE, "double_blocks") if match[1] == "transformer_blocks" else (_SINGLE, "single_blocks")
        if match[3] in table:
            name, part = table[match[3]]
            return f"{block}.{match[2]}.{name}", part, FUSED_PARTS.get(name.rsplit(".", 1)[-1], 1)
    elif module in _TOP:
        return _TOP[module], 0, 1
    raise FluxFileError(f"{module}: not a module of a Flux.1 transformer (no original Black Forest Labs name). "
                        "Export a LoRA or transformer trained on Flux.1 [dev] or [schnell].")


def _leaf(module: str, leaf: str) -> str:
    """The original name of a parameter: RMS-norm weights are `scale`."""
    return "scale" if module.endswith("_norm") and leaf == "weight" else leaf


def part_rows(parts: int, known: Mapping[int, int]) -> list[int]:
    """Rows of each part of a fused module, from the rows of the parts `known` ({part: rows}):
    q, k and v are as wide as the attention, `proj_mlp` (part 3 of `linear1`) `MLP_RATIO` times."""
    def width(part: int) -> int:
        return MLP_RATIO if part == 3 else 1

    unit = {rows // width(part) for part, rows in known.items()}
    if len(unit) != 1 or any(rows % width(part) for part, rows in known.items()):
        raise FluxFileError(f"fused module parts of {dict(known)} rows do not fit Flux.1's q, k, v (and 4x MLP) "
                            "widths. Is this a Flux.1 model?")
    (size,) = unit
    return [size * width(part) for part in range(parts)]


def _swap_halves(tensor):
    """The two halves of the output rows in the other order (self-inverse)."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# --------------------------------------------------------------------------- the transformer


def transformer_to_original(state_dict: Mapping) -> dict:
    """A diffusers `FluxTransformer2DModel` state dict in Black Forest Labs' original layout
    (`double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, ...), the layout of
    `flux1-dev.safetensors` that ComfyUI, Forge and `FluxTransformer2DModel.from_single_file` read.

    Values are kept (same dtype); fused modules are their parts concatenated in order. A
    fused module missing a part, or a name the original does not have, raises `FluxFileError`.
    """
    import torch

    out: dict = {}
    stacks: dict[str, dict[int, object]] = {}
    for key, tensor in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        name, part, parts = original_module(module)
        if name == SWAPPED:
            tensor = _swap_halves(tensor)
        target = f"{name}.{_leaf(name, leaf)}"
        if parts == 1:
            out[target] = tensor
        else:
            stacks.setdefault(target, {})[part] = tensor
    for target, pieces in stacks.items():
        parts = FUSED_PARTS[target.rsplit(".", 2)[-2]]
        if len(pieces) != parts:
            raise FluxFileError(f"{target}: {parts - len(pieces)} of its {parts} parts missing from the transformer. "
                                "Save the model again.")
        out[target] = torch.cat([pieces[i] for i in range(parts)], dim=0)
    return out


# --------------------------------------------------------------------------- the LoRA file


def split_lora(state_dict: Mapping) -> dict[str, dict[str, dict[str, object]]]:
    """A diffusers Flux LoRA (`transformer.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`)
    as {component: {module: {"A": down, "B": up}}}; `FluxFileError` for a tensor of another kind."""
    out: dict[str, dict[str, dict[str, object]]] = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"(transformer|text_encoder)\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise FluxFileError(f"LoRA tensor {key} is not a plain LoRA weight of the Flux transformer or its CLIP "
                                "text encoder (DoRA, LoRA biases and T5 LoRAs cannot go into the web-UI file).")
        out.setdefault(match[1], {}).setdefault(match[2], {})[match[3]] = tensor
    for component, modules in out.items():
        for module, pair in modules.items():
            if len(pair) != 2:
                have = next(iter(pair))
                raise FluxFileError(f"{component}.{module}: has lora_{have} but no lora_{'B' if have == 'A' else 'A'}. "
                                    "The LoRA file is damaged: save it again.")
    return out


def lora_to_ui(state_dict: Mapping, alpha: float | Mapping[str, float] | None = None) -> dict:
    """The kohya-layout Flux LoRA (see the module notes) of a diffusers Flux LoRA state dict.

    `alpha` is the LoRA's `lora_alpha`: one number, a dict from component ("transformer",
    "text_encoder") to number, or None for alpha = rank (scale 1, what diffusers assumes for a
    file without alphas). Weights keep their dtype; each module gets a float32 `.alpha`.
    """
    import torch

    out = {}
    fused: dict[str, dict[int, tuple]] = {}
    for component, modules in split_lora(state_dict).items():
        for module, pair in modules.items():
            down, up = pair["A"], pair["B"]
            scale = _alpha(component, alpha, down.shape[0]) / down.shape[0]
            if component == "text_encoder":
                out.update(_kohya(_text_name(module), down, up, scale * down.shape[0]))
                continue
            name, part, _ = original_module(module)
            fused.setdefault(name, {})[part] = (down, _swap_halves(up) if name == SWAPPED else up, scale)
    for name, pieces in fused.items():
        parts = FUSED_PARTS.get(name.rsplit(".", 1)[-1], 1)
        down, up, scale = pieces[0] if parts == 1 else stack_parts(pieces, parts)
        out.update(_kohya(UNET_PREFIX + name.replace(".", "_"), down, up, scale * down.shape[0]))
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def stack_parts(pieces: Mapping[int, tuple], parts: int) -> tuple:
    """One LoRA (down, up, scale) for a fused module from its parts' {part: (down, up, scale)}.

    Downs are stacked; each up fills its part's rows and its own rank's columns. When the parts'
    scales differ, each up is multiplied by its scale and the result has scale 1.
    """
    import torch

    order = sorted(pieces)
    scales = [pieces[p][2] for p in order]
    same = all(math.isclose(s, scales[0], rel_tol=1e-6) for s in scales)
    rows = part_rows(parts, {p: pieces[p][1].shape[0] for p in order})
    ranks = [pieces[p][0].shape[0] for p in order]
    first_up = pieces[order[0]][1]
    up = torch.zeros(sum(rows), sum(ranks), dtype=first_up.dtype, device=first_up.device)
    column = 0
    for p, rank in zip(order, ranks):
        top = sum(rows[:p])
        block = pieces[p][1] if same else pieces[p][1] * pieces[p][2]
        up[top:top + rows[p], column:column + rank] = block
        column += rank
    down = torch.cat([pieces[p][0] for p in order], dim=0)
    return down, up, scales[0] if same else 1.0


def _kohya(name: str, down, up, alpha: float) -> dict:
    import torch

    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def _text_name(module: str) -> str:
    path = module[len("text_model."):] if module.startswith("text_model.") else module
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", path)
    if match is None or match[2] not in CLIP_LINEAR:
        raise FluxFileError(f"text_encoder.{module}: the web UIs patch only the CLIP layers' "
                            f"{', '.join(CLIP_LINEAR)} from a LoRA file.")
    return f"{TEXT_PREFIX}text_model_encoder_layers_{match[1]}_{match[2].replace('.', '_')}"


def _alpha(component: str, alpha: float | Mapping[str, float] | None, rank: int) -> float:
    if alpha is None:
        return rank
    if isinstance(alpha, Mapping):
        return alpha.get(component) or rank
    return alpha
