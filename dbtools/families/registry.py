"""The model families, in order, and detection: which family a model is.

Adding a family = a new module under `dbtools/families/` with its `ModelFamily` object(s),
and one line in `FAMILIES` below. Detection asks each family in turn; a family we recognise
but do not train (Flux, SD3, Z-Image, ...) is refused by name (`UnsupportedFamily`), never
taken for one of ours.

Pure rules, no file access: callers (`dbtools.families.models`) read `model_index.json`,
the text encoder's config or a single file's tensor names and hand them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dbtools.families.base import ModelFamily, UnsupportedFamily
from dbtools.families.flux import FLUX1
from dbtools.families.flux2 import FLUX2, FLUX2_DISTILLED
from dbtools.families.sd import SD1, SD2
from dbtools.families.sdxl import SDXL
from dbtools.families.zimage import ZIMAGE

FAMILIES: list[ModelFamily] = [
    SD1,
    SD2,
    SDXL,
    FLUX1,
    ZIMAGE,
    FLUX2,
    FLUX2_DISTILLED,
]
"""Every family, in the order detection asks them and messages list them."""

# Pipelines we recognise but do not train (yet), by the start of their `_class_name`; the
# first match wins, so the more specific names come first. A registered family's own
# `pipeline_names` are asked before this list.
OTHER_PIPELINES = (
    ("Flux2Klein", "Flux.2 [klein]"), ("Flux2", "Flux.2 [dev]"), ("FluxKontext", "Flux.1 Kontext"),
    ("FluxFill", "Flux.1 Fill"), ("FluxControl", "Flux.1 Control"), ("FluxPrior", "Flux.1 Redux"),
    ("Flux", "Flux.1 variant"), ("StableDiffusion3", "Stable Diffusion 3"), ("ZImage", "Z-Image"),
    ("QwenImage", "Qwen-Image"), ("Chroma", "Chroma"), ("HiDream", "HiDream"), ("Sana", "Sana"),
    ("Lumina", "Lumina"), ("PixArt", "PixArt"), ("Kandinsky", "Kandinsky"), ("IF", "DeepFloyd IF"),
    ("StableCascade", "Stable Cascade"), ("HunyuanDiT", "Hunyuan-DiT"), ("AuraFlow", "AuraFlow"),
    ("CogView", "CogView"), ("Kolors", "Kolors"), ("StableVideoDiffusion", "Stable Video Diffusion"),
    ("StableDiffusionXLInpaint", "SDXL inpainting"), ("StableDiffusionInpaint", "Stable Diffusion inpainting"),
    ("StableDiffusionUpscale", "Stable Diffusion upscaler"), ("StableDiffusionLatentUpscale",
                                                              "Stable Diffusion upscaler"),
)

# Single files of transformer families, by a tensor name prefix (with or without ComfyUI's
# `model.diffusion_model.` in front); a registered family's `single_file_markers` are exempt.
OTHER_SINGLE_FILES = (("double_blocks.", "Flux-style transformer"), ("joint_blocks.", "Stable Diffusion 3"),
                      ("noise_refiner.", "Z-Image/Lumina 2"))


def trained_families() -> list[ModelFamily]:
    return [f for f in FAMILIES if f.trained]


def trained_labels() -> str:
    """The families this toolkit trains, as messages name them: "SD 1.x, SD 2.x, SDXL"."""
    return ", ".join(_short(f.label) for f in trained_families())


def _short(label: str) -> str:
    return label.replace("Stable Diffusion XL", "SDXL").replace("Stable Diffusion ", "SD ")


def refuse(label: str, detail: str = "") -> UnsupportedFamily:
    """The error for a model of a family we do not train, naming those we do."""
    return UnsupportedFamily(label, detail, trained_labels())


def get(key: str) -> ModelFamily:
    """The family with `key` ("sd1", "sdxl", ...); `KeyError` naming the known keys."""
    for family in FAMILIES:
        if family.key == key:
            return family
    raise KeyError(f"no model family {key!r}; known: {', '.join(f.key for f in FAMILIES)}")


def families_with_parts(parts: set[str]) -> list[ModelFamily]:
    """The trained families, in order, that have every one of the component names `parts`
    (e.g. the components a LoRA file adapts)."""
    return [f for f in trained_families() if set(parts) <= set(f.components)]


def family_for_model_index(model_index: Mapping, text_config: Mapping | None = None) -> ModelFamily:
    """The family of a diffusers pipeline from its `model_index.json` (and first text encoder's config).

    A family that owns the `_class_name` (`pipeline_names`) and matches wins; then a pipeline
    class we know but do not train is refused by name; then the first family that matches the
    parts. Nothing matching raises `UnsupportedFamily` with what a family module could say
    about it (e.g. "a transformer, no UNet"). A family we recognise but do not train
    (`trained=False`) is refused by its label.
    """
    name = str(model_index.get("_class_name", ""))
    owned = [f for f in FAMILIES if name in f.pipeline_names and f.matches_model_index(model_index, text_config)]
    if owned:
        return _trained(owned[0])
    label = next((lab for prefix, lab in OTHER_PIPELINES if name.startswith(prefix)), None)
    if label:
        raise refuse(label)
    for family in FAMILIES:
        if family.matches_model_index(model_index, text_config):
            return _trained(family)
    reason = next((r for r in (f.refusal(model_index) for f in FAMILIES) if r), None)
    raise refuse(*(reason or (name.removesuffix("Pipeline") or "unknown diffusers", "")))


def family_for_keys(keys: Iterable[str]) -> ModelFamily | None:
    """The family of a single-file checkpoint from its tensor names; None when no family knows them.

    A transformer family's file that no registered family claims (Flux, SD3, Z-Image) raises
    `UnsupportedFamily`.
    """
    keys = frozenset(keys)
    claimed = {m for f in FAMILIES for m in f.single_file_markers}
    others = [(p, lab) for p, lab in OTHER_SINGLE_FILES if p not in claimed]
    for key in keys:
        bare = key.removeprefix("model.diffusion_model.")
        label = next((lab for prefix, lab in others if bare.startswith(prefix)), None)
        if label:
            raise refuse(label)
    found = next((f for f in FAMILIES if f.matches_keys(keys)), None)
    return _trained(found) if found is not None else None


def _trained(family: ModelFamily) -> ModelFamily:
    if not family.trained:
        raise refuse(family.label, family.refusal_detail)
    return family
