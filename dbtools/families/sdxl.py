"""Stable Diffusion XL: the SD UNet and DDPM maths (`families.sd`) with two text encoders.

- CLIP ViT-L + OpenCLIP bigG (`CLIPTextModelWithProjection`): their penultimate hidden states
  side by side, the pooled embedding from bigG, and `add_time_ids` (original size, crop,
  target size) per image as added conditioning. 1024 px.
- Its VAE overflows in fp16: the notebook recommends the fp16-fix VAE.
- Text encoder 1's last layer and final norm never reach the loss (`unused_parts`).
- Single files: `model.diffusion_model.*`, `first_stage_model.*`,
  `conditioner.embedders.0.transformer.text_model.*`, `conditioner.embedders.1.model.*`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbtools.families.base import Conditioning, MemoryNumbers, SingleFileLayout, UILora
from dbtools.families.sd import UNET_PREFIX, VAE_PREFIX, SDFamily

SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"
"""SDXL's own VAE overflows in fp16 (NaNs) and must run in fp32; this one does not."""
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."


@dataclass(frozen=True, eq=False, repr=False)
class SDXLFamily(SDFamily):
    """SDXL: two text encoders, pooled embeddings and size/crop conditioning."""

    def pipeline_kwargs(self) -> dict:
        return {}  # no safety checker in SDXL pipelines

    def prompt_encoder(self, tokenizers: Sequence, *, cache: bool, pad_tokens: bool = False,
                       max_length: int | None = None, use_attention_mask: bool = False) -> Any:
        """Prompts are always padded to 77 tokens, as diffusers' SDXL pipeline encodes them."""
        from dbtools.families.prompts import SDXLPromptEncoder  # torch: loaded when training needs it

        return SDXLPromptEncoder(tokenizers, cache=cache)

    def encode_prompts(self, encoder: Any, prompts: list[str], text_encoders: Sequence, device) -> Conditioning:
        embeds, pooled = encoder.encode(prompts, list(text_encoders), device)
        return Conditioning(embeds=embeds, pooled=pooled)

    def image_conditioning(self, part: Mapping) -> Conditioning:
        """The micro-conditioning `time_ids` of each image (original size, crop, target size)."""
        import torch

        return Conditioning(time_ids=torch.from_numpy(part["time_ids"]))

    def _added_cond(self, cond: Conditioning, device) -> dict:
        return {"added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"].to(device)}}

    def unused_parts(self, component: str, module: Any) -> list:
        """The first text encoder's last layer and final layer norm: SDXL conditions on the
        penultimate hidden states and takes the pooled embedding from the second encoder, so
        they get no gradient (data-parallel training would wait for it at its second step)
        and their LoRA adapters would be saved as zeros."""
        if component != "text_encoder":
            return []
        text_model = getattr(module, "text_model", module)  # transformers 4 nests it
        return [text_model.encoder.layers[-1], text_model.final_layer_norm]

    def ui_lora(self, prediction_type: str) -> UILora:
        """kohya files SDXL LoRAs by `ss_base_model_version` "sdxl_base_v1-0" (no `_v` suffix)."""
        return UILora(prefixes={"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                      base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base",
                      implementation="https://github.com/Stability-AI/generative-models")

    def single_file_layout(self) -> SingleFileLayout:
        return SingleFileLayout("SDXL, CLIP and OpenCLIP text encoders",
                                {"unet": ("sd_unet", UNET_PREFIX), "vae": ("sd_vae", VAE_PREFIX),
                                 "text_encoder": ("clip", SDXL_CLIP_PREFIX),
                                 "text_encoder_2": ("openclip", SDXL_OPENCLIP_PREFIX)})



# --------------------------------------------------------------------------- conditioning


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


SDXL = SDXLFamily(
    "sdxl", "Stable Diffusion XL", 1024, "StableDiffusionXLPipeline",
    (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")),
    tokenizer_classes=("CLIPTokenizer", "CLIPTokenizer"),
    pipeline_names=("StableDiffusionXLPipeline",), recommended_vae=SDXL_VAE, guidance_scale=5.0,
    # Class images at 1024 px cost about four times SD 1.x's each: fewer of them, two at a time.
    prior_defaults={"num_class_images": 50, "sample_batch_size": 2},
    memory_numbers=MemoryNumbers(2_567_463_684, (123_060_480, 694_659_840), 83_653_863, 1_451_520,
                                 (73_728, 327_680), (2.5, 16.0)),
)
