"""Model families (SD 1.x, SD 2.x, SDXL): what tells them apart and what each one needs.

Other families (Flux, SD3, Z-Image, ...) are recognised and refused by name
(`UnsupportedFamily`), never taken for one of ours.

Pure rules, no file access: callers (`dbtools.families.models`) read `model_index.json`, component
configs or a single file's key names and hand them in. A family is detected from what a
model is, never declared by a flag:

- SDXL: a pipeline with a second text encoder (`text_encoder_2`), or a single file with
  `conditioner.embedders.*` keys;
- SD 2.x: an OpenCLIP text encoder (plain GELU, 1024 wide), or a single file with
  `cond_stage_model.model.*` keys; epsilon or v-prediction from the scheduler config;
- SD 1.x: an OpenAI CLIP text encoder (`quick_gelu`), or `cond_stage_model.transformer.*`.

Also here, ready for training: SDXL prompt encoding (`encode_prompt_sdxl`) and the
micro-conditioning `add_time_ids` from an image's real original size, crop and target size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dbtools.core.errors import UserError

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"


@dataclass(frozen=True)
class Family:
    """What a stage needs to know about one model family."""

    key: str
    """Short name used in messages and file layouts: "sd1", "sd2" or "sdxl"."""
    label: str
    resolution: int
    """Native training and generation size in pixels (square)."""
    pipeline_class: str
    """The diffusers pipeline class name that loads this family."""
    text_encoders: tuple[tuple[str, str], ...]
    """(subfolder, transformers class name) for each text encoder, in order."""

    @property
    def is_sdxl(self) -> bool:
        return self.key == "sdxl"

    @property
    def components(self) -> tuple[str, ...]:
        """The diffusers folder's component subfolders this family needs for generation."""
        tokenizers = tuple(sub.replace("text_encoder", "tokenizer") for sub, _ in self.text_encoders)
        return tokenizers + tuple(sub for sub, _ in self.text_encoders) + ("vae", "unet", "scheduler")


SD1 = Family("sd1", "Stable Diffusion 1.x", 512, "StableDiffusionPipeline",
             (("text_encoder", "CLIPTextModel"),))
SD2 = Family("sd2", "Stable Diffusion 2.x", 768, "StableDiffusionPipeline",
             (("text_encoder", "CLIPTextModel"),))
SDXL = Family("sdxl", "Stable Diffusion XL", 1024, "StableDiffusionXLPipeline",
              (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")))
FAMILIES = {f.key: f for f in (SD1, SD2, SDXL)}


@dataclass(frozen=True)
class Detected:
    """A detected family and the model's prediction type ("epsilon" or "v_prediction")."""

    family: Family
    prediction_type: str = EPSILON

    @property
    def resolution(self) -> int:
        """Native size: SD 2.x epsilon models (the 512 "base" releases) are 512, v-models 768."""
        if self.family is SD2 and self.prediction_type == EPSILON:
            return 512
        return self.family.resolution


# --------------------------------------------------------------------------- detection


def family_from_text_config(text_config: dict) -> Family:
    """SD 1.x or SD 2.x from the (first) text encoder's config.

    OpenCLIP (SD 2.x) uses plain GELU; OpenAI CLIP (SD 1.x) uses `quick_gelu`. With another
    activation, a 1024-wide encoder is taken as OpenCLIP.
    """
    act = text_config.get("hidden_act", "quick_gelu")
    if act == "gelu" or (act != "quick_gelu" and text_config.get("hidden_size") == 1024):
        return SD2
    return SD1


# Pipelines we recognise but do not train (yet), by the start of their `_class_name`; the
# first match wins, so the more specific names come first.
OTHER_PIPELINES = (
    ("Flux2Klein", "Flux.2 [klein]"), ("Flux2", "Flux.2 [dev]"), ("FluxKontext", "Flux.1 Kontext"),
    ("Flux", "Flux.1"), ("StableDiffusion3", "Stable Diffusion 3"), ("ZImage", "Z-Image"),
    ("QwenImage", "Qwen-Image"), ("Chroma", "Chroma"), ("HiDream", "HiDream"), ("Sana", "Sana"),
    ("Lumina", "Lumina"), ("PixArt", "PixArt"), ("Kandinsky", "Kandinsky"), ("IF", "DeepFloyd IF"),
    ("StableCascade", "Stable Cascade"), ("HunyuanDiT", "Hunyuan-DiT"), ("AuraFlow", "AuraFlow"),
    ("CogView", "CogView"), ("Kolors", "Kolors"), ("StableVideoDiffusion", "Stable Video Diffusion"),
    ("StableDiffusionXLInpaint", "SDXL inpainting"), ("StableDiffusionInpaint", "Stable Diffusion inpainting"),
    ("StableDiffusionUpscale", "Stable Diffusion upscaler"), ("StableDiffusionLatentUpscale",
                                                              "Stable Diffusion upscaler"),
)
TRAINED = "SD 1.x, SD 2.x, SDXL"
"""The families this toolkit trains, as messages name them."""


class UnsupportedFamily(UserError):
    """A model of a family this toolkit recognises but does not train; `label` names it."""

    def __init__(self, label: str, detail: str = ""):
        article = "an" if label[:1].upper() in "AEIOU" else "a"
        super().__init__(f"{article} {label} model{detail}; this toolkit trains: {TRAINED}")
        self.label = label


def _component_class(model_index: dict, name: str) -> str | None:
    """The class name of one `model_index.json` component (None when absent or null)."""
    entry = model_index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    return None


def family_from_model_index(model_index: dict, text_config: dict | None = None) -> Family:
    """The family of a diffusers pipeline from its `model_index.json` (and text encoder config).

    A pipeline class we know but do not train (Flux, SD3, Z-Image, an inpainting model, ...)
    or a pipeline of a transformer and no UNet, or with other than CLIP text encoders, raises
    `UnsupportedFamily`: nothing
    is guessed. Otherwise a second CLIP text encoder means SDXL (fine-tunes sometimes save
    under another pipeline name); SD 1.x and 2.x share a pipeline class, so `text_config`
    tells them apart (SD 1.x when it is not given).
    """
    name = str(model_index.get("_class_name", ""))
    label = next((lab for prefix, lab in OTHER_PIPELINES if name.startswith(prefix)), None)
    if label:
        raise UnsupportedFamily(label)
    encoder, encoder_2 = (_component_class(model_index, n) for n in ("text_encoder", "text_encoder_2"))
    has_parts = any(k in model_index for k in ("unet", "transformer", "text_encoder", "text_encoder_2"))
    if has_parts:
        _check_sd_parts(name, model_index, encoder, encoder_2)
    if "XL" in name or encoder_2:
        return SDXL
    return family_from_text_config(text_config or {})


def _check_sd_parts(name: str, model_index: dict, encoder: str | None, encoder_2: str | None) -> None:
    """Refuse a pipeline whose parts are not a UNet with CLIP text encoders (SD 1.x/2.x/XL)."""
    label = name.removesuffix("Pipeline") or "diffusers"
    if _component_class(model_index, "transformer") and not _component_class(model_index, "unet"):
        raise UnsupportedFamily(label, " (a transformer, no UNet)")
    if encoder_2 and not encoder:
        raise UnsupportedFamily("SDXL refiner", " (one text encoder, made for img2img)")
    for cls in (encoder, encoder_2):
        if cls is not None and not cls.startswith("CLIPTextModel"):
            raise UnsupportedFamily(label, f" ({cls} text encoder)")


# Single files of transformer families, by a tensor name prefix (with or without ComfyUI's
# `model.diffusion_model.` in front).
OTHER_SINGLE_FILES = (("double_blocks.", "Flux-style transformer"), ("joint_blocks.", "Stable Diffusion 3"),
                      ("noise_refiner.", "Z-Image/Lumina 2"))


def family_from_keys(keys: Iterable[str]) -> Family | None:
    """The family of a single-file checkpoint (original layout) from its tensor names; None if unknown.

    The text encoders' names decide; a file with a UNet only is SDXL when the UNet has SDXL's
    added conditioning (`label_emb`), else SD 1.x (SD 2.x has the same UNet names). A
    transformer family's file (Flux, SD3, Z-Image) raises `UnsupportedFamily`.
    """
    seen = {"sdxl": False, "sd2": False, "sd1": False}
    unet = False
    for key in keys:
        bare = key.removeprefix("model.diffusion_model.")
        other = next((label for prefix, label in OTHER_SINGLE_FILES if bare.startswith(prefix)), None)
        if other:
            raise UnsupportedFamily(other)
        unet = unet or key.startswith("model.diffusion_model.")
        if key.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb.0.")):
            seen["sdxl"] = True
        elif key.startswith("cond_stage_model.model."):
            seen["sd2"] = True
        elif key.startswith("cond_stage_model.transformer."):
            seen["sd1"] = True
    return next((FAMILIES[k] for k, hit in seen.items() if hit), SD1 if unet else None)


def prediction_type_from_scheduler(scheduler_config: dict | None) -> str:
    """The scheduler config's `prediction_type` (diffusers' default, epsilon, when absent)."""
    return str((scheduler_config or {}).get("prediction_type") or EPSILON)


def prediction_type_from_keys(keys: Iterable[str], family: Family) -> str:
    """A single file's prediction type: v-prediction when it carries the `v_pred` marker key,
    and for SD 2.x (whose flagship 768 px releases are v-models, as diffusers also assumes);
    epsilon otherwise. A file's config folder, when given, overrides this."""
    keys = set(keys)
    if "v_pred" in keys or family is SD2:
        return V_PREDICTION
    return EPSILON


# --------------------------------------------------------------------------- SDXL conditioning


def add_time_ids(original_size: Sequence[int], crop_top_left: Sequence[int],
                 target_size: Sequence[int]) -> list[int]:
    """SDXL's six micro-conditioning numbers for one image, as the UNet's `time_ids` expects.

    `original_size` is the image's (height, width) before any resizing, `crop_top_left`
    the (top, left) of the crop in the resized image, `target_size` the (height, width)
    trained on. Order: original h, w, crop top, left, target h, w.
    """
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError("sizes are (height, width) pairs and the crop is (top, left)")
    return [int(v) for v in values]


def cover_crop(original_size: Sequence[int], target_size: Sequence[int],
               center: bool = True) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of `original_size` is fitted to `target_size`: ((resized h, w), (top, left)).

    The image is scaled (aspect kept) until it covers the target, then cropped: centred, or
    from the top-left corner with `center=False`. The crop corner is in the resized image's
    pixels, which is what SDXL's `crop_top_left` conditioning means.
    """
    (h, w), (th, tw) = original_size, target_size
    scale = max(th / h, tw / w)
    rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if not center:
        return (rh, rw), (0, 0)
    return (rh, rw), ((rh - th) // 2, (rw - tw) // 2)


def time_ids_for_image(original_size: Sequence[int], target_size: Sequence[int],
                       center: bool = True) -> list[int]:
    """`add_time_ids` for an image resized to cover `target_size` (a bucket) and cropped."""
    _, crop = cover_crop(original_size, target_size, center)
    return add_time_ids(original_size, crop, target_size)


def encode_prompt_sdxl(text_encoders: Sequence, input_ids: Sequence):
    """SDXL text conditioning: (prompt_embeds, pooled_prompt_embeds).

    `text_encoders` are CLIP ViT-L (`CLIPTextModel`) and OpenCLIP bigG
    (`CLIPTextModelWithProjection`); `input_ids` the token ids from each one's tokenizer.
    `prompt_embeds` concatenates both encoders' penultimate hidden states along the
    feature axis, [batch, tokens, 768 + 1280] for the real models; `pooled_prompt_embeds`
    is the second encoder's projected pooled output (`text_embeds`), [batch, 1280].
    """
    import torch

    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids, strict=True):
        # The parameters' device, not `.device`: a data-parallel wrapper (training) has none.
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise ValueError("the last text encoder must be a CLIPTextModelWithProjection (pooled, projected "
                         "embeddings); SDXL's second encoder is")
    return torch.cat(hidden, dim=-1), pooled


def tokenize_sdxl(tokenizers: Sequence, prompts: Sequence[str]) -> list:
    """Token ids of `prompts` from each tokenizer, padded to its `model_max_length` (77)."""
    return [tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
                truncation=True, return_tensors="pt").input_ids for tok in tokenizers]
