"""Stable Diffusion 1.x and 2.x: a UNet denoising DDPM-style (epsilon or v-prediction) on
one CLIP text encoder's last hidden states.

- SD 1.x: OpenAI CLIP ViT-L (`quick_gelu`), 512 px, epsilon.
- SD 2.x: OpenCLIP ViT-H (plain GELU, 1024 wide); the 512 px "base" releases are epsilon,
  the 768 px ones v-prediction.

Detection: a pipeline of a UNet and CLIP text encoders (a second encoder makes it SDXL, see
`families.sdxl`), told apart by the text encoder's activation; a single file by its text
encoder's tensor names (`cond_stage_model.transformer.*` for CLIP, `cond_stage_model.model.*`
for OpenCLIP). The DDPM step maths here is shared with SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbtools.core.errors import UserError
from dbtools.families.base import (
    EPSILON,
    V_PREDICTION,
    Conditioning,
    MemoryNumbers,
    ModelFamily,
    SingleFileLayout,
    UILora,
)

PREDICTION_TYPES = (EPSILON, V_PREDICTION)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."

UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

SD_VAE = "stabilityai/sd-vae-ft-mse"
"""The VAE the original notebook swapped in for SD 1.x/2.x."""


# --------------------------------------------------------------------------- detection rules


def is_openclip(text_config: Mapping | None) -> bool:
    """Whether a text encoder config is OpenCLIP's (SD 2.x) rather than OpenAI CLIP's (SD 1.x).

    OpenCLIP uses plain GELU; OpenAI CLIP `quick_gelu`. With another activation, a 1024-wide
    encoder is taken as OpenCLIP.
    """
    text_config = text_config or {}
    act = text_config.get("hidden_act", "quick_gelu")
    return act == "gelu" or (act != "quick_gelu" and text_config.get("hidden_size") == 1024)


def component_class(model_index: Mapping, name: str) -> str | None:
    """The class name of one `model_index.json` component (None when absent or null)."""
    entry = model_index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    return None


def sd_parts_refusal(model_index: Mapping) -> tuple[str, str] | None:
    """(label, detail) when a pipeline's parts are not a UNet with CLIP text encoders (what
    SD 1.x, 2.x and XL are made of); None when they are, or when it lists no parts."""
    name = str(model_index.get("_class_name", ""))
    if not any(k in model_index for k in ("unet", "transformer", "text_encoder", "text_encoder_2")):
        return None
    encoder, encoder_2 = (component_class(model_index, n) for n in ("text_encoder", "text_encoder_2"))
    label = name.removesuffix("Pipeline") or "diffusers"
    if component_class(model_index, "transformer") and not component_class(model_index, "unet"):
        return label, " (a transformer, no UNet)"
    if encoder_2 and not encoder:
        return "SDXL refiner", " (one text encoder, made for img2img)"
    for cls in (encoder, encoder_2):
        if cls is not None and not cls.startswith("CLIPTextModel"):
            return label, f" ({cls} text encoder)"
    return None


def model_index_kind(model_index: Mapping, text_config: Mapping | None) -> str | None:
    """"sd1", "sd2" or "sdxl" for a UNet + CLIP pipeline (a second text encoder, or "XL" in the
    pipeline name, makes it SDXL: fine-tunes sometimes save under another pipeline name);
    None when its parts are something else."""
    if sd_parts_refusal(model_index) is not None:
        return None
    if "XL" in str(model_index.get("_class_name", "")) or component_class(model_index, "text_encoder_2"):
        return "sdxl"
    return "sd2" if is_openclip(text_config) else "sd1"


SDXL_KEY_PREFIXES = ("conditioner.embedders.", UNET_PREFIX + "label_emb.0.")


def keys_kind(keys: frozenset[str]) -> str | None:
    """"sdxl", "sd2" or "sd1" for a single file's tensor names (its text encoders decide; a
    UNet-only file is SDXL when the UNet has added conditioning, else SD 1.x); None if none."""
    if any(k.startswith(SDXL_KEY_PREFIXES) for k in keys):
        return "sdxl"
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(("cond_stage_model.transformer.", UNET_PREFIX)) for k in keys):
        return "sd1"
    return None


# --------------------------------------------------------------------------- the family


@dataclass(frozen=True, eq=False, repr=False)
class SDFamily(ModelFamily):
    """SD 1.x or 2.x (and, through `SDXLFamily`, the UNet/DDPM maths of SDXL)."""

    epsilon_resolution: int | None = None
    """Native size of the family's epsilon models when it differs from `resolution` (SD 2.x: 512)."""
    single_file_prediction: str = EPSILON
    """A single file's prediction type when neither a config nor a `v_pred` key says it."""
    memory_numbers: MemoryNumbers | None = None
    ui: tuple[str, str, bool] = ("sd_v1", "stable-diffusion-v1", False)
    """(kohya `ss_base_model_version`, modelspec architecture, `ss_v2`) for epsilon models."""
    ui_v: tuple[str, str] = ("sd_v1_v", "stable-diffusion-v1")
    """The same two names for v-prediction models."""
    text_layout: str = "clip"
    """The exporter's converter for the text encoder ("clip" or "openclip")."""

    # identity
    def native_resolution(self, prediction_type: str) -> int:
        if self.epsilon_resolution and prediction_type == EPSILON:
            return self.epsilon_resolution
        return self.resolution

    # detection
    def matches_model_index(self, model_index: Mapping, text_config: Mapping | None) -> bool:
        return model_index_kind(model_index, text_config) == self.key

    def matches_keys(self, keys: frozenset[str]) -> bool:
        return keys_kind(keys) == self.key

    def refusal(self, model_index: Mapping) -> tuple[str, str] | None:
        return sd_parts_refusal(model_index)

    def prediction_type_from_keys(self, keys: frozenset[str]) -> str:
        """v-prediction when the file carries the `v_pred` marker key, else the family's default
        (SD 2.x: v, as its flagship 768 px releases are and as diffusers also assumes)."""
        return V_PREDICTION if "v_pred" in keys else self.single_file_prediction

    # loading
    def noise_scheduler(self, scheduler_config: Mapping) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler_config)

    def pipeline_kwargs(self) -> dict:
        return dict(safety_checker=None, requires_safety_checker=False)

    # prompts
    def prompt_encoder(self, tokenizers: Sequence, *, cache: bool, pad_tokens: bool = False,
                       max_length: int | None = None, use_attention_mask: bool = False) -> Any:
        from dbtools.families.prompts import PromptEncoder  # torch: loaded when training needs it

        return PromptEncoder(tokenizers[0], pad_tokens=pad_tokens, max_length=max_length,
                             use_attention_mask=use_attention_mask, cache=cache)

    def encode_prompts(self, encoder: Any, prompts: list[str], text_encoders: Sequence, device) -> Conditioning:
        return Conditioning(embeds=encoder.encode(prompts, text_encoders[0], device))

    # latents and one step
    def size_step(self, vae, denoiser) -> int:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return scale * 2 ** (len(denoiser.config.block_out_channels) - 1)

    def latents(self, sample, vae):
        return sample * vae.config.scaling_factor

    def timesteps(self, scheduler, batch: int, generator):
        import torch

        return torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)

    def noisy(self, scheduler, latents, noise, timesteps):
        return scheduler.add_noise(latents, noise, timesteps)

    def target(self, scheduler, latents, noise, timesteps):
        """The noise (epsilon) or the velocity (v-prediction), as the scheduler's
        `prediction_type` says."""
        kind = scheduler.config.prediction_type
        if kind == EPSILON:
            return noise
        if kind == V_PREDICTION:
            return scheduler.get_velocity(latents, noise, timesteps)
        raise UserError(f"unsupported prediction_type {kind!r} in the model's scheduler config "
                        f"(expected one of {', '.join(PREDICTION_TYPES)}).")

    def loss_weights(self, scheduler, timesteps, snr_gamma: float | None):
        """Min-SNR-gamma weights (Hang et al. 2023) when `snr_gamma` is set: min(SNR, gamma) / SNR
        for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction."""
        if not snr_gamma:
            return None
        return snr_weights(scheduler, timesteps, snr_gamma, scheduler.config.prediction_type)

    def predict(self, denoiser, noisy, timesteps, cond: Conditioning, guidance_scale: float | None = None):
        return denoiser(noisy, timesteps, cond["embeds"], **self._added_cond(cond, noisy.device)).sample

    def _added_cond(self, cond: Conditioning, device) -> dict:
        return {}

    # inference
    def build_pipeline(self, modules: Mapping[str, Any], noise_scheduler: Any) -> Any:
        """The family's pipeline class with a DDIM sampler made from the training scheduler's config."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        parts = {c: modules[c] for c in self.components if c != "scheduler"}
        extra = dict(self.pipeline_kwargs(), feature_extractor=None) if self.pipeline_kwargs() else {}
        return cls(**parts, scheduler=diffusers.DDIMScheduler.from_config(noise_scheduler.config), **extra)

    # LoRA and export
    def lora_targets(self, component: str, module: Any) -> list[str]:
        if component == self.denoiser:
            return list(UNET_LORA_TARGETS)
        unused = {id(m) for part in self.unused_parts(component, module) for m in part.modules()}
        return [name for name, sub in module.named_modules()
                if name.rsplit(".", 1)[-1] in TEXT_LORA_PROJECTIONS and id(sub) not in unused]

    def save_lora(self, folder: str, layers: Mapping[str, dict]) -> None:
        import diffusers

        names = {"unet": "unet_lora_layers", "text_encoder": "text_encoder_lora_layers",
                 "text_encoder_2": "text_encoder_2_lora_layers"}
        getattr(diffusers, self.pipeline_class).save_lora_weights(
            folder, **{names[c]: layers.get(c) for c in (self.denoiser, *self.text_encoder_names)})

    def ui_lora(self, prediction_type: str) -> UILora:
        version, arch = self.ui_v if prediction_type == V_PREDICTION else self.ui[:2]
        prefixes = {self.denoiser: "lora_unet_"}
        if len(self.text_encoders) == 1:
            prefixes[self.text_encoder_names[0]] = "lora_te_"
        else:
            prefixes.update({sub: f"lora_te{i}_" for i, sub in enumerate(self.text_encoder_names, 1)})
        return UILora(prefixes=prefixes, base_model_version=version, architecture=arch,
                      implementation="diffusers", v2=self.ui[2])

    def single_file_layout(self) -> SingleFileLayout:
        prefix = CLIP_PREFIX if self.text_layout == "clip" else OPENCLIP_PREFIX
        what = "OpenAI CLIP" if self.text_layout == "clip" else "OpenCLIP"
        return SingleFileLayout(f"{self.label.replace('Stable Diffusion', 'SD')}, {what} text encoder",
                                {"unet": ("sd_unet", UNET_PREFIX), "vae": ("sd_vae", VAE_PREFIX),
                                 "text_encoder": (self.text_layout, prefix)})

    @property
    def memory(self) -> MemoryNumbers:
        assert self.memory_numbers is not None
        return self.memory_numbers


def snr_weights(scheduler, timesteps, gamma: float, prediction_type: str):
    """Min-SNR-gamma loss weights per sample: min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == V_PREDICTION else clipped / snr


_CLIP_L = (("text_encoder", "CLIPTextModel"),)

SD1 = SDFamily(
    "sd1", "Stable Diffusion 1.x", 512, "StableDiffusionPipeline", _CLIP_L,
    pipeline_names=("StableDiffusionPipeline",), recommended_vae=SD_VAE, guidance_scale=7.5,
    memory_numbers=MemoryNumbers(859_520_964, (123_060_480,), 83_653_863, 199_296, (73_728,), (0.4, 2.5)),
)
SD2 = SDFamily(
    "sd2", "Stable Diffusion 2.x", 768, "StableDiffusionPipeline", _CLIP_L,
    pipeline_names=("StableDiffusionPipeline",), recommended_vae=SD_VAE, guidance_scale=7.5,
    epsilon_resolution=512, single_file_prediction=V_PREDICTION, text_layout="openclip",
    ui=("sd_v2", "stable-diffusion-v2-512", True), ui_v=("sd_v2_v", "stable-diffusion-v2-768-v"),
    memory_numbers=MemoryNumbers(865_910_724, (340_387_840,), 83_653_863, 199_296, (245_760,), (1.0, 5.5)),
)
