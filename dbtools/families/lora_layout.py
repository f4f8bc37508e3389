"""LoRA tensors between layouts, as pure functions: a diffusers/peft LoRA state dict read as
one (down, up) pair per module, several pairs fused into one for a layer that a web UI's
model holds fused (q, k and v in one `qkv` matrix), and the kohya-style entries
(`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`) that ComfyUI reads.

A LoRA changes a module's weight by `alpha / rank * up @ down`; every function here keeps
that product exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from dbtools.core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up)(?:\.default)?\.weight")
_DOWN = ("lora_A", "lora.down")


class LoraLayoutError(UserError):
    """A LoRA holds a module the target layout cannot name; the message says which."""


def lora_pairs(state_dict: Mapping[str, torch.Tensor], component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (down [rank, in], up [out, rank]) for the `component.` part of a diffusers
    LoRA state dict (`transformer.<module>.lora_A.weight` / `.lora_B.weight` in peft's names,
    `.lora.down.weight` / `.lora.up.weight` in diffusers' older ones; a file may mix them).
    Tensors of other components are ignored."""
    prefix = component + "."
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        match = _LORA_KEY.fullmatch(key[len(prefix):])
        if match is None:
            raise LoraLayoutError(f"LoRA tensor {key} is not a LoRA weight (lora_A / lora_B); "
                                  "save the LoRA with this toolkit or diffusers' save_lora_weights.")
        found.setdefault(match["module"], {})["lora_A" if match["part"] in _DOWN else "lora_B"] = tensor
    missing = sorted(m for m, parts in found.items() if len(parts) != 2)
    if missing:
        raise LoraLayoutError(f"LoRA module {prefix}{missing[0]} has only one of lora_A / lora_B; the file is "
                              "incomplete: save the LoRA again.")
    return {m: (parts["lora_A"], parts["lora_B"]) for m, parts in found.items()}


def peft_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with diffusers' older LoRA names (`.lora.down.weight`, `.lora.up.weight`)
    in peft's (`.lora_A.weight`, `.lora_B.weight`): the Flux.2 pipeline's LoRA reader skips
    the older names, and only peft's are read by every pipeline."""
    renames = ((".lora.down.weight", ".lora_A.weight"), (".lora.up.weight", ".lora_B.weight"))
    out = {}
    for key, tensor in state_dict.items():
        old = next((pair for pair in renames if key.endswith(pair[0])), None)
        out[key[: -len(old[0])] + old[1] if old else key] = tensor
    return out


def fuse_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
               out_features: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA for a layer whose output is the outputs of several layers stacked (q, k, v ->
    qkv): the downs stacked ([n x rank, in]) and the ups block-diagonal ([sum(out), n x rank]).
    A part without a LoRA (None) gets zeros with `out_features` rows. The fused rank is n times
    the parts' rank, so the fused alpha must be n times theirs to keep the scale (`fused_alpha`)."""
    import torch

    present = [p for p in pairs if p is not None]
    if not present:
        raise ValueError("fuse_pairs needs at least one LoRA pair")
    rank = present[0][0].shape[0]
    if any(p[0].shape[0] != rank for p in present):
        raise LoraLayoutError("the LoRA's q, k and v adapters have different ranks; they cannot be joined for "
                              "the UI file (train them with one rank).")
    down_like, up_like = present[0]
    downs, ups = [], []
    for pair, rows in zip(pairs, out_features, strict=True):
        down, up = pair if pair is not None else (torch.zeros_like(down_like),
                                                  up_like.new_zeros(rows, rank))
        downs.append(down)
        ups.append(up)
    return torch.cat(downs), torch.block_diag(*ups)


def fused_alpha(alpha: float, parts: int) -> float:
    """The alpha of `parts` LoRAs of one alpha fused by `fuse_pairs` (same scale alpha / rank)."""
    return alpha * parts


def kohya_entries(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> dict[str, torch.Tensor]:
    """`name.lora_down.weight`, `name.lora_up.weight` and `name.alpha` (alpha None: the rank,
    scale 1, what a file without alphas means)."""
    import torch

    rank = down.shape[0]
    value = float(rank if alpha is None else alpha)
    return {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
            f"{name}.alpha": torch.tensor(value, dtype=torch.float32)}
