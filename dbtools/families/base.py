"""The model-family seam: `ModelFamily`, the one object per family that says everything that
differs between families.

One module per family (`families/sd.py` for SD 1.x and 2.x, `families/sdxl.py`, ...) defines a
subclass and its instances; `families/registry.py` lists them in order and detects a model's
family by asking each one. The training loop, validation, evaluation, export, generate,
class images and the notebook ask the family; they never branch on its name.

What a family says, in the order a run needs it:

- identity: `key`, `label`, whether we train it, native size, sampling defaults, the VAE
  the notebook recommends, LoRA's learning rate;
- detection: from `model_index.json` (`matches_model_index`) or a single file's tensor
  names (`matches_keys`);
- loading: the components and their classes (`parts`), the denoiser's name (`denoiser`),
  `load_components` (through a `PartLoader` that does the file work), the training noise
  scheduler;
- prompts: `prompt_encoder` (with its cache) returning a `Conditioning` that the family's
  own `predict` understands, plus what comes from the image (`image_conditioning`);
- latents: `latents` turns a VAE sample into what the denoiser sees;
- one training step: `timesteps`, `noisy`, `target`, `loss_weights`, `predict`
  (the generic reduction stays in `dbtools.families.losses`); `validation_timesteps` for a fixed grid;
- inference: `build_pipeline` from training components, `may_upcast`;
- LoRA: `lora_targets`, `save_lora`, the UI file's prefixes and metadata (`ui_lora`);
- single-file export: `single_file_layout` (converter names the exporter knows);
- memory numbers: `memory`.

Pure: nothing here reads a file or loads a model; `PartLoader` (in `dbtools.families.models`)
does the reading and hands each family what it asks for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dbtools.core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"


def midpoint_grid(num_train_timesteps: int, count: int) -> list[int]:
    """`count` integer timesteps: the midpoints of equal slices of `num_train_timesteps`."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


class UnsupportedFamily(UserError):
    """A model of a family this toolkit recognises but does not train; `label` names it.

    `trained` lists the families we do train, as the message names them (the registry
    passes it; see `registry.refuse`)."""

    def __init__(self, label: str, detail: str = "", trained: str = ""):
        article = "an" if label[:1].upper() in "AEIOU" else "a"
        super().__init__(f"{article} {label} model{detail}; this toolkit trains: {trained}")
        self.label = label


@dataclass(frozen=True)
class Detected:
    """A detected family and the model's prediction type ("epsilon", "v_prediction", "flow")."""

    family: ModelFamily
    prediction_type: str = EPSILON

    @property
    def resolution(self) -> int:
        """The family's native size for this prediction type (`ModelFamily.native_resolution`)."""
        return self.family.native_resolution(self.prediction_type)


class Conditioning(dict):
    """What the denoiser is conditioned on, as named batch-first tensors (e.g. SD:
    `embeds`; SDXL: `embeds`, `pooled`, `time_ids`; Flux: T5 states, CLIP pooled, text ids).

    Only the family that made it reads the names (in its `predict`); the loop only splits
    and joins it along the batch."""

    def split(self, sizes: Sequence[int]) -> list[Conditioning]:
        """One `Conditioning` per consecutive group of `sizes` samples."""
        import torch

        parts = {k: torch.split(v, list(sizes)) for k, v in self.items()}
        return [Conditioning({k: v[i] for k, v in parts.items()}) for i in range(len(sizes))]

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The samples of `parts` as one batch (same names in each)."""
        import torch

        return Conditioning({k: torch.cat([p[k] for p in parts]) for k in parts[0]})

    def merged(self, other: Mapping[str, Any]) -> Conditioning:
        return Conditioning({**self, **other})


COMPONENT_NAMES = ("unet", "transformer", "vae")
"""Component names that read as None on `Components` when a family has no such part."""


@dataclass
class Components:
    """A family's loaded training components, by component name (`unet` or `transformer`,
    `text_encoder`, `text_encoder_2`, `tokenizer`, `tokenizer_2`, `vae`; absent ones are None),
    and the training noise scheduler.

    `components.unet`, `components.text_encoder_2`, ... read `parts`; a part the family does
    not have reads as None. `denoiser` is the one that trains (the family's `denoiser` name).
    """

    family: ModelFamily
    parts: dict[str, Any]
    noise_scheduler: Any

    def __getattr__(self, name: str) -> Any:
        parts = self.__dict__.get("parts") or {}
        if name in parts:
            return parts[name]
        if name in COMPONENT_NAMES or name.startswith(("text_encoder", "tokenizer")):
            return None  # a part this family does not have (or that was not loaded)
        raise AttributeError(name)

    @property
    def denoiser(self) -> Any:
        return self.parts[self.family.denoiser]

    @property
    def prediction_type(self) -> str:
        """The scheduler config's (a flow-matching scheduler has none: epsilon, as detection says)."""
        return self.noise_scheduler.config.get("prediction_type", EPSILON)

    @property
    def text_encoders(self) -> list:
        """The text encoders that are loaded, in the family's order."""
        return [self.parts[sub] for sub in self.family.text_encoder_names if self.parts.get(sub) is not None]

    @property
    def tokenizers(self) -> list:
        return [self.parts[sub] for sub in self.family.tokenizer_names if self.parts.get(sub) is not None]

    def replace(self, **parts: Any) -> Components:
        """A copy with some parts replaced (e.g. by the modules accelerate prepared)."""
        return Components(self.family, {**self.parts, **parts}, self.noise_scheduler)


class PartLoader(Protocol):
    """What `ModelFamily.load_components` loads through (implemented in `dbtools.families.models`,
    which owns paths, Hub ids, variants, dtypes and errors)."""

    def model(self, class_path: str, component: str, *, quantize: str | None = None) -> Any:
        """Component folder `component` as `class_path` ("diffusers.AutoencoderKL"), in the
        dtype asked for it; `quantize` ("nf4", "int8") loads it 4/8-bit through bitsandbytes."""

    def tokenizer(self, class_path: str, component: str) -> Any:
        """A tokenizer folder as `class_path` ("transformers.CLIPTokenizer")."""

    def scheduler_config(self) -> dict:
        """The model's `scheduler/scheduler_config.json`."""


@dataclass(frozen=True)
class MemoryNumbers:
    """Facts about the real-size model for the memory estimate (`families.profiles`)."""

    denoiser_params: int
    text_params: tuple[int, ...]
    vae_params: int
    lora_per_rank: int
    """LoRA parameters per unit of rank on the denoiser's targets."""
    text_lora_per_rank: tuple[int, ...]
    activations_gib: tuple[float, float]
    """Activation GiB at native size, batch 1, half precision: (gradient checkpointing, without)."""


@dataclass(frozen=True)
class UILora:
    """How the family's LoRA file for the web UIs (kohya layout) is written."""

    prefixes: Mapping[str, str]
    """diffusers component -> kohya key prefix (e.g. "unet" -> "lora_unet_")."""
    base_model_version: str
    """kohya's `ss_base_model_version` (how AUTOMATIC1111 files the LoRA)."""
    architecture: str
    """`modelspec.architecture` before `/lora`."""
    implementation: str
    v2: bool = False
    network_module: str = "networks.lora"
    """kohya's `ss_network_module` (its Flux.1 LoRAs: "networks.lora_flux")."""
    prediction_type: bool = True
    """Whether the file states `modelspec.prediction_type` (not for flow-matching models)."""
    convert: Callable[[Mapping, Any], dict] | None = None
    """The family's own diffusers LoRA -> UI tensors conversion `(state_dict, alpha)`, for a layout
    that is more than renamed `prefixes` (Flux.1: the original transformer's module names); None
    for kohya's renaming."""


@dataclass(frozen=True)
class SingleFileLayout:
    """The original single-file layout of a family, as names the exporter (`dbtools.after.export`)
    has converters for: each component -> (converter, key prefix)."""

    description: str
    """What `export` says it writes ("SDXL, CLIP and OpenCLIP text encoders")."""
    parts: Mapping[str, tuple[str, str]]
    """component -> (converter name: "sd_unet", "sd_vae", "clip", "openclip", ...; key prefix)."""
    half_dtype: str = "float16"
    """What `--half` stores floating-point weights as (Flux.1: "bfloat16", its own precision)."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """modelspec metadata the file carries (export adds `modelspec.title` and `.date`)."""


@dataclass(frozen=True, eq=False, repr=False)
class ModelFamily(ABC):
    """One model family. Instances are compared by identity: one object per family.

    Subclasses implement the abstract methods; the fields are the family's facts.
    """

    key: str
    """Short name in messages, file layouts and profiles: "sd1", "sd2", "sdxl", "flux1", ..."""
    label: str
    """What messages call it: "Stable Diffusion XL"."""
    resolution: int
    """Native training and generation size in pixels (square)."""
    pipeline_class: str
    """The diffusers pipeline class name that loads this family for inference."""
    text_encoders: tuple[tuple[str, str], ...]
    """(component, transformers class name) for each text encoder, in order."""
    denoiser: str = "unet"
    """The denoiser's component name: "unet" or "transformer"."""
    denoiser_class: str = "UNet2DConditionModel"
    """The denoiser's diffusers class name."""
    tokenizer_classes: tuple[str, ...] = ("CLIPTokenizer",)
    """transformers class name of each text encoder's tokenizer, same order."""
    trained: bool = True
    """Whether this toolkit trains it (a recognised family we do not train is refused by name)."""
    refusal_detail: str = ""
    """What the refusal of a family we do not train adds after its name (e.g. what to train instead)."""
    pipeline_names: tuple[str, ...] = ()
    """`model_index.json` `_class_name`s that belong to this family outright."""
    single_file_markers: tuple[str, ...] = ()
    """Tensor name prefixes of this family's single files that the registry's list of
    refused families would otherwise claim (e.g. "double_blocks." for Flux)."""
    sample_steps: int = 30
    """Default sampling steps for samples and generate."""
    guidance_scale: float = 7.5
    """Default classifier-free guidance scale."""
    recommended_vae: str | None = None
    """The VAE the notebook swaps in (a Hub id), or None to keep the model's own."""
    lora_learning_rate: float = 1e-4
    """The learning rate LoRA adapters train well at for this family."""
    prior_defaults: Mapping[str, Any] = field(default_factory=dict)
    """Training flags the notebook's `auto` sets for prior preservation (e.g. fewer class images
    for a family whose images are costly to make)."""
    inference_half: str = "float16"
    """The half-precision dtype it generates in on a CUDA GPU ("bfloat16" for the flow
    transformers, which overflow in float16)."""
    quantizable: bool = False
    """Whether its frozen denoiser may be quantized (`--quantize_base nf4|int8`)."""
    samples_at_own_defaults: bool = False
    """Whether training samples take `sample_steps` and `guidance_scale` when their flags are
    left at Shivam's defaults (20 steps, 7.5), which suit SD but not a guidance-distilled model."""

    # ----------------------------------------------------------------- identity

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(sub for sub, _ in self.text_encoders)

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        return tuple(sub.replace("text_encoder", "tokenizer") for sub, _ in self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        """The diffusers folder's component subfolders this family needs for generation."""
        return self.tokenizer_names + self.text_encoder_names + ("vae", self.denoiser, "scheduler")

    def native_resolution(self, prediction_type: str) -> int:
        """The native size for a model of this family with `prediction_type` (SD 2.x: epsilon
        512, v 768); by default `resolution`."""
        return self.resolution

    def __repr__(self) -> str:
        return f"<{self.label} family {self.key!r}>"

    # ----------------------------------------------------------------- detection

    @abstractmethod
    def matches_model_index(self, model_index: Mapping, text_config: Mapping | None) -> bool:
        """Whether a diffusers pipeline is of this family, from its `model_index.json` and its
        (first) text encoder's config. Families of one module must not both match one model."""

    @abstractmethod
    def matches_keys(self, keys: frozenset[str]) -> bool:
        """Whether a single-file checkpoint (original layout) with these tensor names is of
        this family. Families must not both match one file."""

    def refusal(self, model_index: Mapping) -> tuple[str, str] | None:
        """When no family matched: (label, detail) if this family's module can say what the
        model is instead (e.g. "SDXL refiner", " (one text encoder, made for img2img)")."""
        return None

    def name_refusal(self, name: str) -> str | None:
        """Why a model of this family is not trained when only its name tells (Z-Image-Turbo
        ships Z-Image's files): the message with what to train instead, or None."""
        return None

    def prediction_type_from_keys(self, keys: frozenset[str]) -> str:
        """A single file's prediction type when no config says it."""
        return EPSILON

    # ----------------------------------------------------------------- loading

    @property
    def parts(self) -> dict[str, str]:
        """Component -> class path ("diffusers.AutoencoderKL") of what training loads."""
        out = {tok: f"transformers.{cls}" for tok, cls in zip(self.tokenizer_names, self.tokenizer_classes,
                                                                strict=True)}
        out.update({sub: f"transformers.{cls}" for sub, cls in self.text_encoders})
        out.update({"vae": "diffusers.AutoencoderKL", self.denoiser: f"diffusers.{self.denoiser_class}"})
        return out

    @abstractmethod
    def noise_scheduler(self, scheduler_config: Mapping) -> Any:
        """The training noise scheduler from the model's scheduler config (DDPM for SD)."""

    def load_components(self, load: PartLoader, needed: Iterable[str] | None = None,
                        quantize: str | None = None, options: Any = None) -> Components:
        """Load the training components through `load`: each of `parts` (or just `needed`),
        the denoiser quantized when `quantize` is "nf4"/"int8", and the noise scheduler.
        `options` is the run's settings (flags as attributes, e.g. a `TrainConfig`) for a family
        whose training step reads some of them (Flux: the weighting scheme); None: defaults."""
        if quantize is not None:
            raise UserError(f"--quantize_base {quantize}: {self.label} models are not trained from a quantized "
                            "base; leave --quantize_base unset.")
        needed = set(self.parts if needed is None else needed)
        parts = {}
        for sub, cls in self.parts.items():
            if sub not in needed:
                continue
            parts[sub] = load.tokenizer(cls, sub) if sub.startswith("tokenizer") else load.model(cls, sub)
        return Components(self, parts, self.noise_scheduler(load.scheduler_config()))

    def training_problems(self, options: Any, cuda_bf16: bool | None) -> list[str]:
        """Settings this family cannot train with, each with its fix, found before anything
        loads. `options` as for `load_components`; `cuda_bf16` whether the training GPU runs
        bf16 natively (None: training on the CPU)."""
        return []

    def pipeline_kwargs(self) -> dict:
        """Extra keyword arguments for the pipeline class (e.g. no safety checker)."""
        return {}

    # ----------------------------------------------------------------- prompts

    @abstractmethod
    def prompt_encoder(self, tokenizers: Sequence, *, cache: bool, pad_tokens: bool = False,
                       max_length: int | None = None, use_attention_mask: bool = False) -> Any:
        """The family's prompt encoder for `tokenizers` (in the family's order). With `cache`
        (frozen text encoders) it keeps each prompt's encoding: `encoder.cache` (a dict, or None
        without cache) and `encoder.grow` (False: new prompts are encoded, not kept)."""

    @abstractmethod
    def encode_prompts(self, encoder: Any, prompts: list[str], text_encoders: Sequence, device) -> Conditioning:
        """`prompts` through `encoder` (from `prompt_encoder`) and `text_encoders` (the family's,
        in order; possibly wrapped for data-parallel training), on `device`."""

    def image_conditioning(self, part: Mapping) -> Conditioning:
        """Conditioning that comes from the image rather than the prompt (SDXL's `time_ids`
        from a data part's `time_ids` array); none by default."""
        return Conditioning()

    def text_encoders_may_leave(self) -> bool:
        """Whether frozen text encoders may leave the device once all prompts are cached."""
        return True

    def encoders_only_fill_the_cache(self) -> bool:
        """Whether a run's frozen text encoders serve only to fill the prompt cache: every prompt
        the run will need is encoded before the denoiser loads, then the encoders are freed and
        samples read the cache (`read_cached_prompts`). False (SD, SDXL): they stay in host
        memory and come back to the device for samples."""
        return False

    def cache_pipeline_prompts(self, encoder: Any, prompts: Iterable[str], text_encoders: Sequence) -> None:
        """Keep `prompts` in `encoder` encoded as the family's pipeline encodes them (for samples,
        validation images and scores once the encoders are gone: `read_cached_prompts`)."""
        raise NotImplementedError(f"{self.label}: prompts are encoded by the pipeline's text encoders")

    def read_cached_prompts(self, pipe: Any, encoder: Any) -> None:
        """Make `pipe` (from `build_pipeline`, without text encoders) take its prompts'
        encodings from `encoder`'s cache (for a family whose `encoders_only_fill_the_cache`)."""
        raise NotImplementedError(f"{self.label}: prompts are encoded by the pipeline's text encoders")

    # ----------------------------------------------------------------- latents and one step

    @abstractmethod
    def size_step(self, vae: Any, denoiser: Any) -> int:
        """Training image sides must be multiples of this many pixels (VAE downscaling times
        the denoiser's own: SD's UNet halves the latents once per down block)."""

    @abstractmethod
    def latents(self, sample: torch.Tensor, vae: Any) -> torch.Tensor:
        """A VAE sample -> what the denoiser sees (SD: times `scaling_factor`)."""

    @abstractmethod
    def timesteps(self, scheduler: Any, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Random training timesteps (or sigmas) for `batch` samples, drawn from `generator`."""

    def validation_timesteps(self, scheduler: Any, count: int) -> list:
        """`count` fixed timesteps for the held-out loss: by default the midpoints of equal
        slices of the training schedule (`midpoint_grid`)."""
        return midpoint_grid(scheduler.config.num_train_timesteps, count)

    @abstractmethod
    def noisy(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at `timesteps`."""

    @abstractmethod
    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser must predict (epsilon, v, or noise - x)."""

    def loss_weights(self, scheduler: Any, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-sample loss weights (min-SNR for DDPM), or None for plain means."""
        return None

    @abstractmethod
    def predict(self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                guidance_scale: float | None = None) -> torch.Tensor:
        """The denoiser's prediction for `noisy` at `timesteps` under `cond`."""

    # ----------------------------------------------------------------- inference

    @abstractmethod
    def build_pipeline(self, modules: Mapping[str, Any], noise_scheduler: Any) -> Any:
        """The inference pipeline from training components (`modules` by component name,
        possibly LoRA'd, unwrapped from data-parallel wrappers), with the family's sampler
        made from the training `noise_scheduler`'s config (SD: DDIM)."""

    def pipeline_size(self, pipe: Any) -> int:
        """The native image side of a loaded pipeline of this family (its denoiser's sample
        size times the VAE's downscaling)."""
        return int(getattr(pipe, self.denoiser).config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def may_upcast(self, quantized: bool) -> bool:
        """Whether frozen weights may be cast to float32 for inference (never a quantized base)."""
        return not quantized

    # ----------------------------------------------------------------- LoRA and export

    @abstractmethod
    def lora_targets(self, component: str, module: Any) -> list[str]:
        """Module names LoRA adapts in `module`, the loaded `component` (the denoiser or a text
        encoder), none inside `unused_parts`."""

    def unused_parts(self, component: str, module: Any) -> list:
        """Sub-modules of a text encoder whose output never reaches the loss (they must not
        train); none by default."""
        return []

    @abstractmethod
    def save_lora(self, folder: str, layers: Mapping[str, dict]) -> None:
        """Write the diffusers LoRA file of `layers` (component -> peft state dict) to `folder`."""

    @abstractmethod
    def ui_lora(self, prediction_type: str) -> UILora:
        """The kohya-style LoRA file's prefixes and metadata for a model of this family."""

    @abstractmethod
    def single_file_layout(self) -> SingleFileLayout:
        """Which of the exporter's converters write each component of a full single file."""

    @property
    @abstractmethod
    def memory(self) -> MemoryNumbers:
        """Parameter counts and activation sizes of the real-size model."""

