"""The model-family seam: everything that differs between families is asked of the family
object (`dbtools.families`), never branched on by name elsewhere; detection asks the
registry, so a new family is one module and one registry line."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import dbtools
from dbtools.families import registry
from dbtools.families.base import ModelFamily, UnsupportedFamily
from dbtools.families.models import UnsupportedModelError, detect_family
from dbtools.families.sd import SD1, SD2, SDFamily
from dbtools.families.sdxl import SDXL

PACKAGE = Path(dbtools.__file__).parent
EXEMPT = ("families/", "tiny.py")
"""The families package itself, and the tiny-model builders (one builder per family by design)."""
FAMILY_NAMES = {"sd1", "sd2", "sdxl", "sd3", "flux", "flux1", "flux2", "zimage", "z-image", "qwen-image"}
FAMILY_CLASSES = {
    "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLImg2ImgPipeline", "UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection",
    "CLIPTokenizer", "T5EncoderModel", "DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler",
    "FluxPipeline", "FluxTransformer2DModel", "Flux2Pipeline", "ZImagePipeline",
}
"""diffusers/transformers classes that belong to one family (or a few): only family modules import them."""
FAMILY_FLAG = re.compile(r"^is_(sd\d?|sdxl|flux\d?|zimage|z_image)(_models)?$", re.IGNORECASE)


def _family_words() -> set[str]:
    words = set(FAMILY_NAMES)
    for family in registry.FAMILIES:
        words |= {family.key.lower(), family.label.lower()}
    return words


def _family_objects() -> set[str]:
    """Names the family modules give their `ModelFamily` objects (SD1, SD2, SDXL, ...)."""
    import importlib

    names = set()
    for module in {type(f).__module__ for f in registry.FAMILIES}:
        names |= {n for n, v in vars(importlib.import_module(module)).items() if isinstance(v, ModelFamily)}
    return names


def family_branches(source: str, words: set[str], objects: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each place in `source` that branches on a model family by name: a
    comparison with a family key or label (or a family object), an `is_sdxl`-style name, or an
    import of a family's own diffusers/transformers class."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                for item in getattr(side, "elts", [side]):
                    if isinstance(item, ast.Constant) and isinstance(item.value, str) \
                            and item.value.lower() in words:
                        found.append((node.lineno, f"compares with {item.value!r}"))
                    name = getattr(item, "id", None) or getattr(item, "attr", None)
                    if name in objects:
                        found.append((node.lineno, f"compares with the family object {name}"))
        name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
        if isinstance(name, str) and FAMILY_FLAG.match(name):
            found.append((node.lineno, f"uses {name}"))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("diffusers", "transformers"):
            found += [(node.lineno, f"imports {a.name}") for a in node.names if a.name in FAMILY_CLASSES]
    return found


def test_no_family_name_branch_outside_the_families_package():
    words, objects = _family_words(), _family_objects()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(EXEMPT):
            continue
        found += [f"dbtools/{relative}:{line}: {what}"
                  for line, what in family_branches(path.read_text(encoding="utf-8"), words, objects)]
    assert found == [], "ask the family object (dbtools.families) instead:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    'if family.key == "sdxl":\n    pass\n',
    'x = 1 if detected.family.label in ("Stable Diffusion 1.x", "Stable Diffusion 2.x") else 2\n',
    "if family is SDXL:\n    pass\n",
    "if models.is_sdxl:\n    pass\n",
    "def f():\n    from diffusers import UNet2DConditionModel\n",
    "from transformers import CLIPTextModelWithProjection as Second\n",
])
def test_the_branch_check_catches_each_kind_of_branch(source):
    assert family_branches(source, _family_words(), _family_objects())
    assert not family_branches("if family.denoiser == 'unet' and step == 3:\n    pass\n", _family_words(),
                               _family_objects())


# --------------------------------------------------------------------------- detection


def test_the_registry_detects_each_tiny_model(tiny_sd, tiny_sd2, tiny_sdxl):
    assert detect_family(str(tiny_sd)).family is SD1
    sd2 = detect_family(str(tiny_sd2))
    assert sd2.family is SD2 and sd2.prediction_type == "v_prediction" and sd2.resolution == 768
    sdxl = detect_family(str(tiny_sdxl))
    assert sdxl.family is SDXL and sdxl.resolution == 1024
    assert [f.key for f in registry.trained_families()][:3] == ["sd1", "sd2", "sdxl"]
    assert registry.get("sdxl") is SDXL


def test_the_tiny_flux_model_is_named_until_a_flux_family_is_registered(tmp_path):
    from dbtools.tiny import build_tiny_flux

    folder = build_tiny_flux(tmp_path / "flux")
    owner = next((f for f in registry.FAMILIES if "FluxPipeline" in f.pipeline_names), None)
    if owner is not None and owner.trained:
        assert detect_family(str(folder)).family is owner
        return
    with pytest.raises(UnsupportedModelError) as err:
        detect_family(str(folder))
    assert "is a Flux.1 model; this toolkit trains: " + registry.trained_labels() in str(err.value)


@dataclass(frozen=True, eq=False, repr=False)
class ToyFamily(SDFamily):
    """A made-up family: a `ToyPipeline` of a transformer, single files with `double_blocks.`."""

    def matches_model_index(self, model_index, text_config) -> bool:
        return model_index.get("_class_name") == "ToyPipeline"

    def matches_keys(self, keys) -> bool:
        return any(k.startswith(self.single_file_markers) for k in keys)


TOY = ToyFamily("toy", "Toy Diffusion", 256, "ToyPipeline", (("text_encoder", "CLIPTextModel"),),
                denoiser="transformer", denoiser_class="ToyTransformer2DModel", pipeline_names=("ToyPipeline",),
                single_file_markers=("double_blocks.",))


def test_a_registered_family_is_detected_with_no_edit_elsewhere(tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "ToyPipeline", "transformer": ["diffusers", "ToyTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    keys = ["double_blocks.0.img_attn.qkv.weight"]
    with pytest.raises(UnsupportedModelError, match="a transformer, no UNet"):
        detect_family(str(folder))
    with pytest.raises(UnsupportedFamily, match="Flux-style transformer"):
        registry.family_for_keys(keys)

    monkeypatch.setattr(registry, "FAMILIES", [*registry.FAMILIES, TOY])
    detected = detect_family(str(folder))
    assert detected.family is TOY and detected.resolution == 256
    assert TOY.components == ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
    assert registry.family_for_keys(keys) is TOY  # its marker is no longer refused as another family's
    assert registry.get("toy") is TOY
    assert registry.trained_labels().endswith(", Toy Diffusion")
    with pytest.raises(UnsupportedFamily, match=re.escape(f"this toolkit trains: {registry.trained_labels()}")):
        registry.family_for_model_index({"_class_name": "QwenImagePipeline"})
