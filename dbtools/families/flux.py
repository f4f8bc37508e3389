"""Flux.1 [dev]: a 12B rectified-flow transformer with a guidance embedding, conditioned on
T5-XXL's hidden states (up to 512 tokens) and CLIP-L's pooled embedding.

- Latents: the 16-channel VAE's sample, shifted and scaled ((x - shift_factor) * scaling_factor),
  packed 2x2 into 64-channel tokens with (0, row, column) position ids for the transformer;
  the text tokens' ids are zeros. `predict` packs and unpacks, so the loss is taken on the
  latent grid as for SD.
- Flow matching: sigma in (0, 1], noisy = (1 - sigma) x + sigma noise, target = noise - x;
  sigmas drawn and the loss weighted by diffusers' weighting schemes (`dbtools.families.losses`);
  the transformer sees the timestep sigma x 1000 / 1000 and the guidance embedding the
  training `--guidance_scale` (1.0 by default).
- [schnell] is step-distilled and has no guidance embedding: training LoRA on it works but
  wears away the distillation (its 4-step images blur), so it is trained with a warning.
- A quantized frozen transformer (`--quantize_base nf4|int8`, `dbtools.families.quantize`)
  is never upcast for inference; Flux is never upcast at all (48 GB in float32).
- Needs bf16 on a GPU (fp16 overflows in the transformer); float32 on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from dbtools.families import flux_files
from dbtools.families.base import Components, Conditioning, MemoryNumbers, ModelFamily, SingleFileLayout, UILora

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512
"""T5-XXL's longest prompt in Flux.1 [dev], in tokens (`--max_sequence_length`)."""

FLUX_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
"""The attention projections of every double and single block (diffusers' Flux DreamBooth
LoRA default): 1,167,360 LoRA parameters per unit of rank on Flux.1 [dev]."""
CLIP_LENGTH = 77
SCHNELL = "Flux.1 [schnell]"


@dataclass(frozen=True)
class FlowSettings:
    """The training flags a flow-matching step reads (`TrainConfig`'s names and defaults)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 1.0
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    @classmethod
    def of(cls, options: Any) -> FlowSettings:
        """The settings named in `options` (an object with the flags as attributes), defaults
        for the rest."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls) if hasattr(options, f.name)})


def flow_settings(holder) -> FlowSettings:
    """The run's settings, which `FluxFamily.load_components` keeps on the training scheduler
    and the transformer (the family object is shared by every run; they belong to one)."""
    holder = getattr(holder, "module", holder)  # a data-parallel wrapper
    return getattr(holder, "flow_settings", None) or FlowSettings()


class FluxPromptEncoder:
    """Prompts -> (T5 hidden states, CLIP pooled embedding, text ids) as FluxPipeline encodes
    them: CLIP padded to 77 tokens, T5 to `max_sequence_length`.

    With `cache=True` (frozen encoders) each prompt's tensors are kept on the CPU, so the
    encoders can leave the device once every training prompt is encoded (T5-XXL alone is
    9.5 GB in bf16); `grow` False stops keeping new prompts (shuffled captions).
    """

    def __init__(self, tokenizers: Sequence, *, cache: bool, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 max_cached: int = 20_000):
        self.tokenizers = list(tokenizers)
        self.max_sequence_length = max_sequence_length
        self.cache: dict[str, tuple] | None = {} if cache else None
        self.max_cached = max_cached
        self.grow = True
        self.for_pipeline: dict[str, tuple] = {}
        """Prompts encoded as FluxPipeline encodes them by default (`keep_for_pipeline`)."""

    def encode(self, prompts: list[str], text_encoders: Sequence, device) -> Conditioning:
        import torch

        if self.cache is None:
            return self._conditioning(*self._forward(prompts, text_encoders), device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        fresh = {}
        if missing:
            with torch.no_grad():
                states, pooled = self._forward(missing, text_encoders)
            fresh = {p: (s.cpu(), q.cpu()) for p, s, q in zip(missing, states, pooled, strict=True)}
            for p in missing:
                if self.grow and len(self.cache) < self.max_cached:
                    self.cache[p] = fresh[p]
        entries = [self.cache.get(p) or fresh[p] for p in prompts]
        return self._conditioning(torch.stack([s for s, _ in entries]), torch.stack([q for _, q in entries]), device)

    def keep_for_pipeline(self, prompt: str, text_encoders: Sequence) -> None:
        """Keep `prompt` encoded as FluxPipeline encodes it by default (alone, T5 at its
        `MAX_SEQUENCE_LENGTH` whatever the run's `--max_sequence_length`), for samples made
        after the encoders are gone."""
        import torch

        if prompt not in self.for_pipeline:
            with torch.no_grad():
                states, pooled = self._forward([prompt], text_encoders, MAX_SEQUENCE_LENGTH)
            self.for_pipeline[prompt] = (states.cpu(), pooled.cpu())

    def _forward(self, prompts: list[str], text_encoders: Sequence, length: int | None = None):
        clip, t5 = text_encoders
        clip_tok, t5_tok = self.tokenizers
        ids = clip_tok(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                       return_tensors="pt").input_ids
        # The parameters' device, not `.device`: a data-parallel wrapper has none; a parked
        # encoder (on the CPU) runs where it is.
        pooled = clip(ids.to(_device_of(clip)), output_hidden_states=False).pooler_output
        ids = t5_tok(prompts, padding="max_length", max_length=length or self.max_sequence_length, truncation=True,
                     return_tensors="pt").input_ids
        states = t5(ids.to(_device_of(t5)), output_hidden_states=False)[0]
        return states, pooled

    @staticmethod
    def _conditioning(states, pooled, device) -> Conditioning:
        import torch

        text_ids = torch.zeros(states.shape[0], states.shape[1], 3)
        return Conditioning(embeds=states.to(device), pooled=pooled.to(device), text_ids=text_ids.to(device))


def _device_of(module):
    return next(module.parameters()).device


def is_schnell(transformer_config: Mapping, name: str = "") -> bool:
    """[schnell] from its transformer config (no guidance embedding) or its name."""
    return not transformer_config.get("guidance_embeds", True) or "schnell" in name.lower()


def pack(latents):
    """(B, C, H, W) latents -> (B, H/2 x W/2, 4C) tokens and their (H/2 x W/2, 3) position ids,
    as FluxPipeline lays them out."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    tokens = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return tokens, ids


def unpack(tokens, height: int, width: int):
    """Tokens from `pack` back to (B, C, height, width) latents."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def flow_components(family: ModelFamily, parts: dict, scheduler_config: dict, settings: FlowSettings) -> Components:
    """The loaded parts with the family's flow-matching scheduler; the run's settings ride on the
    scheduler and the denoiser, which the step's methods are handed."""
    scheduler = family.noise_scheduler(scheduler_config)
    for holder in (scheduler, parts.get(family.denoiser)):
        if holder is not None:
            holder.flow_settings = settings
    return Components(family, parts, scheduler)


@dataclass(frozen=True, eq=False, repr=False)
class FluxFamily(ModelFamily):
    """Flux.1 [dev] (and, with a warning, [schnell])."""

    memory_numbers: MemoryNumbers | None = None
    inference_half: str = "bfloat16"
    quantizable: bool = True

    # detection
    def matches_model_index(self, model_index: Mapping, text_config: Mapping | None) -> bool:
        """FluxPipeline, or any pipeline of a `FluxTransformer2DModel` with a T5 encoder."""
        parts = {k: v[1] for k, v in model_index.items() if isinstance(v, (list, tuple)) and len(v) == 2}
        if str(model_index.get("_class_name", "")) in self.pipeline_names:
            return True
        return parts.get("transformer") == self.denoiser_class and parts.get("text_encoder_2") == "T5EncoderModel"

    def matches_keys(self, keys: frozenset[str]) -> bool:
        """A Flux single file holds the transformer alone; training needs the diffusers folder."""
        return False

    # loading
    def noise_scheduler(self, scheduler_config: Mapping) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def load_components(self, load, needed=None, quantize: str | None = None, options: Any = None):
        """Every part in the training dtype; with `quantize` the transformer 4- or 8-bit. The
        run's flow-matching settings (`options`) ride on the training scheduler, the T5 prompt
        length on its tokenizer."""
        needed = set(self.parts if needed is None else needed)
        parts = {}
        for sub, cls in self.parts.items():
            if sub not in needed:
                continue
            if sub.startswith("tokenizer"):
                parts[sub] = load.tokenizer(cls, sub)
            elif sub == self.denoiser:
                parts[sub] = load.model(cls, sub, quantize=quantize)
            else:
                parts[sub] = load.model(cls, sub)
        if self.denoiser in parts:
            warn_if_schnell(parts[self.denoiser])
        settings = FlowSettings.of(options)
        if "tokenizer_2" in parts:
            parts["tokenizer_2"].model_max_length = settings.max_sequence_length
        return flow_components(self, parts, load.scheduler_config(), settings)

    def training_problems(self, options: Any, cuda_bf16: bool | None) -> list[str]:
        """LoRA only, on the transformer; bf16 on a GPU (fp16 overflows in the transformer);
        flow-matching loss weights instead of min-SNR."""
        problems = []
        if not getattr(options, "use_lora", False):
            problems.append("Flux.1 trains LoRA adapters only (its 12B transformer does not fit a full fine-tune "
                            "here): add --use_lora.")
        if getattr(options, "train_text_encoder", False):
            problems.append("--train_text_encoder: Flux.1 trains the transformer only (its prompts are cached "
                            "once, then T5-XXL and CLIP leave the GPU); drop the flag.")
        if getattr(options, "snr_gamma", None):
            problems.append("--snr_gamma is min-SNR weighting for DDPM models; Flux.1 is flow matching: use "
                            "--weighting_scheme (logit_normal, mode, cosmap or sigma_sqrt) instead.")
        precision = getattr(options, "mixed_precision", None) or "no"
        if cuda_bf16 is not None and precision == "fp16":
            problems.append("--mixed_precision fp16: Flux.1 overflows in fp16 (NaN losses); use --mixed_precision "
                            "bf16" + ("." if cuda_bf16 else " on a GPU that has it (Ampere or newer: A100, L4, "
                                                            "RTX 30xx/40xx)."))
        elif cuda_bf16 is False:
            problems.append("Flux.1 trains in bf16, which this GPU does not run natively (a T4 or older): fp16 "
                            "overflows in its transformer and float32 does not fit. Use a GPU with bf16 "
                            "(Ampere or newer: A100, L4, RTX 30xx/40xx).")
        return problems

    # prompts
    def prompt_encoder(self, tokenizers: Sequence, *, cache: bool, pad_tokens: bool = False,
                       max_length: int | None = None, use_attention_mask: bool = False) -> Any:
        """T5 reads the run's `--max_sequence_length` tokens (kept on its tokenizer at load);
        CLIP always 77. Prompts are padded to both lengths, as FluxPipeline pads them."""
        return FluxPromptEncoder(tokenizers, cache=cache, max_sequence_length=tokenizers[1].model_max_length)

    def encode_prompts(self, encoder: Any, prompts: list[str], text_encoders: Sequence, device) -> Conditioning:
        return encoder.encode(prompts, list(text_encoders), device)

    def encoders_only_fill_the_cache(self) -> bool:
        """T5-XXL (9.5 GB in bf16) and CLIP never share the GPU with the transformer."""
        return True

    def cache_pipeline_prompts(self, encoder: FluxPromptEncoder, prompts, text_encoders: Sequence) -> None:
        for prompt in prompts:
            encoder.keep_for_pipeline(prompt, list(text_encoders))

    def read_cached_prompts(self, pipe, encoder: FluxPromptEncoder) -> None:
        """`pipe.encode_prompt` answered from `encoder.for_pipeline`, as FluxPipeline's own
        would answer at its default length (the same tensors: the encoders' outputs)."""
        import torch

        def encode_prompt(prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                          pooled_prompt_embeds=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                          lora_scale=None):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            missing = [p for p in prompts if p not in encoder.for_pipeline]
            if missing or max_sequence_length != MAX_SEQUENCE_LENGTH:
                raise RuntimeError(f"prompt {prompts[0]!r} at {max_sequence_length} tokens was not encoded before "
                                   "the text encoders were freed")
            device = device or pipe._execution_device
            embeds = torch.cat([encoder.for_pipeline[p][0] for p in prompts]).to(device)
            pooled = torch.cat([encoder.for_pipeline[p][1] for p in prompts]).to(device)
            embeds = embeds.repeat_interleave(num_images_per_prompt, 0)
            pooled = pooled.repeat_interleave(num_images_per_prompt, 0)
            return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)

        pipe.encode_prompt = encode_prompt

    def pipeline_size(self, pipe) -> int:
        """The Flux pipeline's own default size (its transformer's config keeps none)."""
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    # latents and one step
    def size_step(self, vae, denoiser) -> int:
        """The VAE's downscaling (8 for Flux.1's) times the 2x2 packing: 16 px."""
        return 2 ** (len(vae.config.block_out_channels) - 1) * 2

    def latents(self, sample, vae):
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    def timesteps(self, scheduler, batch: int, generator):
        """Sigmas (not integer timesteps) drawn by the weighting scheme on the training schedule."""
        from dbtools.families.losses import draw_sigmas  # torch: loaded when training needs it

        s = flow_settings(scheduler)
        return draw_sigmas(s.weighting_scheme, batch, scheduler.sigmas, generator, logit_mean=s.logit_mean,
                           logit_std=s.logit_std, mode_scale=s.mode_scale)

    def validation_timesteps(self, scheduler, count: int) -> list:
        """Sigmas at the middle of `count` equal slices of (0, 1): 0.125, 0.375, 0.625, 0.875."""
        return [(k + 0.5) / count for k in range(count)]

    def noisy(self, scheduler, latents, noise, timesteps):
        from dbtools.families.losses import flow_matching_noisy  # torch: loaded when training needs it

        return flow_matching_noisy(latents, noise, timesteps)

    def target(self, scheduler, latents, noise, timesteps):
        from dbtools.families.losses import flow_matching_target

        return flow_matching_target(latents, noise)

    def loss_weights(self, scheduler, timesteps, snr_gamma: float | None):
        """The weighting scheme's per-sample weights (sigma_sqrt, cosmap); None for the others."""
        from dbtools.families.losses import flow_matching_weights

        scheme = flow_settings(scheduler).weighting_scheme
        return None if scheme == "none" else flow_matching_weights(scheme, timesteps)

    def predict(self, denoiser, noisy, timesteps, cond: Conditioning, guidance_scale: float | None = None):
        """Pack, run the transformer at timestep sigma (it scales by 1000 itself) with the
        guidance embedding fed `guidance_scale` (default: the run's `--guidance_scale`) when the
        model has one, unpack."""
        import torch

        tokens, img_ids = pack(noisy)
        config = getattr(denoiser, "module", denoiser).config
        sigmas = timesteps.to(noisy.device, noisy.dtype).reshape(-1).expand(noisy.shape[0])
        guidance = None
        if config.guidance_embeds:
            scale = flow_settings(denoiser).guidance_scale if guidance_scale is None else guidance_scale
            guidance = torch.full((noisy.shape[0],), scale, device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=tokens, timestep=sigmas, guidance=guidance,
                       pooled_projections=cond["pooled"].to(noisy.dtype),
                       encoder_hidden_states=cond["embeds"].to(noisy.dtype), txt_ids=cond["text_ids"][0],
                       img_ids=img_ids, return_dict=False)[0]
        return unpack(out, noisy.shape[2], noisy.shape[3])

    # inference
    def build_pipeline(self, modules: Mapping[str, Any], noise_scheduler: Any) -> Any:
        """FluxPipeline with its own sampler (flow-matching Euler with the resolution-dependent
        shift) made afresh from the training scheduler's config."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        sampler = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
        return FluxPipeline(scheduler=sampler, **{c: modules[c] for c in self.components if c != "scheduler"})

    def may_upcast(self, quantized: bool) -> bool:
        """Never: the transformer is 48 GB in float32, and a quantized one cannot be cast."""
        return False

    # LoRA and export
    def lora_targets(self, component: str, module: Any) -> list[str]:
        if component == self.denoiser:
            return list(FLUX_LORA_TARGETS)
        if component == "text_encoder":
            return [name for name, _ in module.named_modules()
                    if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]
        return []

    def save_lora(self, folder: str, layers: Mapping[str, dict]) -> None:
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers.get("transformer"),
                                       text_encoder_lora_layers=layers.get("text_encoder"))

    def ui_lora(self, prediction_type: str) -> UILora:
        """kohya's Flux layout and metadata (`flux_files`): ComfyUI and Forge map every key."""
        return UILora(prefixes={"transformer": flux_files.UNET_PREFIX, "text_encoder": flux_files.TEXT_PREFIX},
                      base_model_version=flux_files.BASE_MODEL_VERSION, architecture=flux_files.ARCHITECTURE,
                      implementation=flux_files.IMPLEMENTATION, network_module=flux_files.NETWORK_MODULE,
                      prediction_type=False, convert=flux_files.lora_to_ui)

    def single_file_layout(self) -> SingleFileLayout:
        return SingleFileLayout("Flux.1 transformer (Black Forest Labs layout)",
                                {"transformer": ("flux_transformer", "")}, half_dtype="bfloat16",
                                metadata=flux_files.TRANSFORMER_METADATA)

    @property
    def memory(self) -> MemoryNumbers:
        assert self.memory_numbers is not None
        return self.memory_numbers


def warn_if_schnell(transformer) -> None:
    """Say once, at load, that a [schnell] base is step-distilled: LoRA training on it works
    but wears away the distillation (few-step images blur); [dev] is the base to train."""
    config = getattr(transformer, "config", {})
    if is_schnell(config, str(config.get("_name_or_path", ""))):
        logger.warning("%s is step-distilled (no guidance embedding): LoRA training on it loses the 4-step "
                       "sharpness it was distilled for, so samples blur as training goes on. Train on Flux.1 "
                       "[dev] (black-forest-labs/FLUX.1-dev) and apply the LoRA to [dev] models.", SCHNELL)


FLUX1 = FluxFamily(
    "flux1", "Flux.1", 1024, "FluxPipeline",
    (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel")),
    denoiser="transformer", denoiser_class="FluxTransformer2DModel",
    tokenizer_classes=("CLIPTokenizer", "T5TokenizerFast"), pipeline_names=("FluxPipeline",),
    sample_steps=28, guidance_scale=3.5, samples_at_own_defaults=True, recommended_vae=None, lora_learning_rate=1e-4,
    # Class images at 1024 px from a 12B model take about 30 s each on a T4-class GPU.
    prior_defaults={"num_class_images": 50, "sample_batch_size": 1},
    # Transformer 11.9B, CLIP-L 123M, T5-XXL encoder 4.76B, VAE 84M (counted from the real
    # configs on the meta device); activations at 1024 px, batch 1, bf16 (estimates).
    memory_numbers=MemoryNumbers(11_901_408_320, (123_060_480, 4_762_310_656), 83_819_683, 1_167_360,
                                 (73_728, 0), (3.0, 30.0)),
)
