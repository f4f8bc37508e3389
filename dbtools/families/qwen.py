"""Prompt encoding for the families with a Qwen3 text encoder (Z-Image, Flux.2 [klein]): the
family's own encoding function (its pipeline's), each prompt's result kept on the CPU.

One prompt's result is its embeddings [tokens, width] (Z-Image: as long as the prompt;
Flux.2: always `max_sequence_length`). A batch is padded with zeros to `max_sequence_length`
tokens, with each prompt's length beside it, so batches of any prompts join into one
(`Conditioning.cat`); the family's model call reads only each prompt's own tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbtools.core.errors import UserError
from dbtools.families.base import (
    Components,
    Conditioning,
    MemoryNumbers,
    ModelFamily,
    PartLoader,
    SingleFileLayout,
    UILora,
)
from dbtools.families.flux import FlowSettings, FluxFamily, flow_components
from dbtools.families.lora_layout import peft_names

EncodeFn = Callable[..., dict]
"""(tokenizer, text_encoder, prompts, device, max_sequence_length) -> {"embeds": [B, L, D],
optionally "lengths": [B]} (a family module's `encode_prompts`)."""


class QwenPromptEncoder:
    """Prompts -> Conditioning(embeds [B, max_sequence_length, D], lengths [B]).

    With `cache=True` (a frozen text encoder) each prompt's embeddings are kept on the CPU,
    so the encoder (a 4-8B model) can leave the device once every training prompt is
    encoded; `grow` False stops keeping new prompts (shuffled captions)."""

    def __init__(self, tokenizer, encode: EncodeFn, *, cache: bool, max_sequence_length: int,
                 max_cached: int = 20_000):
        self.tokenizer = tokenizer
        self._encode = encode
        self.max_sequence_length = max_sequence_length
        self.cache: dict | None = {} if cache else None
        self.max_cached = max_cached
        self.grow = True
        self.for_pipeline: dict[str, tuple] = {}
        """Prompts encoded alone as the family's pipeline encodes them by default
        (`keep_for_pipeline`)."""

    def encode(self, prompts: list[str], text_encoders: Sequence, device) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if self.cache is None or p not in self.cache]
        fresh = dict(zip(missing, self._forward(missing, text_encoders[0]), strict=True)) if missing else {}
        if self.cache is not None and self.grow:
            for prompt in missing:
                if len(self.cache) < self.max_cached:
                    self.cache[prompt] = (fresh[prompt],)  # a tuple, as `--cache_dir` stores it
        entries = [fresh[p] if p in fresh else self.cache[p][0] for p in prompts]
        return self._batch(entries, device)

    def keep_for_pipeline(self, prompt: str, text_encoders: Sequence, max_sequence_length: int) -> None:
        """Keep `prompt` encoded alone at the pipeline's default length (whatever the run's
        `--max_sequence_length`), for samples made after the encoder is gone."""
        import torch

        if prompt not in self.for_pipeline:
            with torch.no_grad():
                out = self._encode(self.tokenizer, text_encoders[0], [prompt],
                                   device=next(text_encoders[0].parameters()).device,
                                   max_sequence_length=max_sequence_length)
            length = int(out["lengths"][0]) if "lengths" in out else len(out["embeds"][0])
            self.for_pipeline[prompt] = (out["embeds"][0, :length].cpu(),)

    def _forward(self, prompts: list[str], text_encoder) -> list:
        """Each prompt's embeddings [its tokens, D], on the CPU when cached."""
        device = next(text_encoder.parameters()).device  # a data-parallel wrapper has no `.device`
        out = self._encode(self.tokenizer, text_encoder, prompts, device=device,
                           max_sequence_length=self.max_sequence_length)
        embeds = out["embeds"]
        lengths = out.get("lengths", [len(e) for e in embeds])
        rows = [e[: int(n)] for e, n in zip(embeds, lengths, strict=True)]
        return [r.cpu() if self.cache is not None else r for r in rows]

    def _batch(self, entries: list, device) -> Conditioning:
        import torch

        width = entries[0].shape[-1]
        embeds = entries[0].new_zeros(len(entries), self.max_sequence_length, width)
        for i, row in enumerate(entries):
            embeds[i, : len(row)] = row
        lengths = torch.tensor([len(row) for row in entries])
        return Conditioning(embeds=embeds.to(device), lengths=lengths.to(device))


@dataclass(frozen=True, eq=False, repr=False)
class QwenFlowFamily(ModelFamily):
    """A rectified-flow transformer conditioned on one Qwen3 text encoder (Z-Image, Flux.2
    [klein]). The family module supplies `model` (its `encode_prompts`, `latents`, `predict`
    functions and pipeline facts); the flow-matching maths is `dbtools.families.losses`'.

    Only LoRA adapters on the transformer train (the 4-8B encoder stays frozen, its prompts
    cached); the frozen transformer may be quantized and is never upcast for inference."""

    model: Any = None
    """The family's module (`dbtools.families.zimage` or `.flux2`)."""
    vae_class: str = "AutoencoderKL"
    fixed_sequence_length: bool = False
    """Whether prompts are always read at the pipeline's full length (the transformer attends
    to the padding, so training must see what inference sees)."""
    lora_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    memory_numbers: MemoryNumbers | None = None
    inference_half: str = "bfloat16"
    quantizable: bool = True
    ui_names: tuple[str, str] = ("", "")
    """(kohya `ss_base_model_version`, `modelspec.architecture`) of the UI LoRA file."""

    # detection
    def matches_model_index(self, model_index: Mapping, text_config: Mapping | None) -> bool:
        name = str(model_index.get("_class_name", ""))
        transformer = model_index.get("transformer") or [None, None]
        return name in self.pipeline_names or transformer[-1] == self.denoiser_class

    def matches_keys(self, keys: frozenset[str]) -> bool:
        """A single file holds the transformer alone; training needs the diffusers folder."""
        return False

    # loading
    @property
    def parts(self) -> dict[str, str]:
        return dict(super().parts, vae=f"diffusers.{self.vae_class}")

    def load_components(self, load: PartLoader, needed: Iterable[str] | None = None,
                        quantize: str | None = None, options: Any = None) -> Components:
        """Every part in the training dtype; with `quantize` the transformer 4- or 8-bit. The
        run's flow-matching settings (`options`) ride on the training scheduler, as Flux.1's."""
        needed = set(self.parts if needed is None else needed)
        parts = {}
        for sub, cls in self.parts.items():
            if sub in needed:
                parts[sub] = (load.tokenizer(cls, sub) if sub.startswith("tokenizer")
                              else load.model(cls, sub, quantize=quantize if sub == self.denoiser else None))
        settings = FlowSettings.of(options)
        if "tokenizer" in parts:
            full = self.model.MAX_SEQUENCE_LENGTH
            length = full if self.fixed_sequence_length else min(settings.max_sequence_length, full)
            parts["tokenizer"].model_max_length = length
        return flow_components(self, parts, load.scheduler_config(), settings)

    def training_problems(self, options: Any, cuda_bf16: bool | None) -> list[str]:
        """LoRA on the transformer only; flow-matching weights instead of min-SNR; bf16 on a GPU."""
        problems = []
        if not getattr(options, "use_lora", False):
            problems.append(f"{self.label} trains LoRA adapters only: add --use_lora.")
        if getattr(options, "train_text_encoder", False):
            problems.append(f"--train_text_encoder: {self.label} trains the transformer only (its Qwen3 encoder "
                            "is cached once, then leaves the GPU); drop the flag.")
        if getattr(options, "snr_gamma", None):
            problems.append(f"--snr_gamma is min-SNR weighting for DDPM models; {self.label} is flow matching: use "
                            "--weighting_scheme instead.")
        fp16 = (getattr(options, "mixed_precision", None) or "no") == "fp16"
        if cuda_bf16 is False or (cuda_bf16 is not None and fp16):
            problems.append(f"{self.label} trains in bf16 (fp16 overflows in its transformer): use "
                            "--mixed_precision bf16 on a GPU that runs it (Ampere or newer: A100, L4, RTX 30xx/40xx).")
        return problems

    # prompts
    def prompt_encoder(self, tokenizers: Sequence, *, cache: bool, pad_tokens: bool = False,
                       max_length: int | None = None, use_attention_mask: bool = False) -> QwenPromptEncoder:
        """Prompts are read up to the tokenizer's `model_max_length`, which `load_components` sets:
        `--max_sequence_length` for Z-Image (its padding is dropped), always the pipeline's 512
        for Flux.2 (its transformer attends to the padding, so training sees what inference does)."""
        length = min(tokenizers[0].model_max_length, self.model.MAX_SEQUENCE_LENGTH)
        return QwenPromptEncoder(tokenizers[0], self.model.encode_prompts, cache=cache, max_sequence_length=length)

    def encode_prompts(self, encoder: Any, prompts: list[str], text_encoders: Sequence, device) -> Conditioning:
        return encoder.encode(prompts, list(text_encoders), device)

    def encoders_only_fill_the_cache(self) -> bool:
        """The Qwen3 encoder (4B: 7.5 GiB in bf16) never shares the GPU with the transformer."""
        return True

    def cache_pipeline_prompts(self, encoder: QwenPromptEncoder, prompts, text_encoders: Sequence) -> None:
        """Each prompt and the empty prompt (the negative of classifier-free guidance)."""
        for prompt in dict.fromkeys([*prompts, ""]):
            encoder.keep_for_pipeline(prompt, text_encoders, self.model.MAX_SEQUENCE_LENGTH)

    def read_cached_prompts(self, pipe, encoder: QwenPromptEncoder) -> None:
        """`pipe.encode_prompt` answered from `encoder.for_pipeline` (the family module's
        `cached_encode_prompt`, in its pipeline's signature)."""
        def lookup(prompts, max_sequence_length: int, device) -> list:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            missing = [p for p in prompts if p not in encoder.for_pipeline]
            if missing or max_sequence_length != self.model.MAX_SEQUENCE_LENGTH:
                raise RuntimeError(f"prompt {prompts[0]!r} at {max_sequence_length} tokens was not encoded before "
                                   "the text encoder was freed")
            return [encoder.for_pipeline[p][0].to(device or pipe._execution_device) for p in prompts]

        pipe.encode_prompt = self.model.cached_encode_prompt(pipe, lookup)

    # latents and one step (sigmas in (0, 1], not integer timesteps)
    def latents(self, sample, vae):
        return self.model.latents(sample, vae)

    # The flow-matching step is Flux.1's (`families.flux`): sigmas drawn on the training schedule
    # by the run's weighting scheme (Z-Image's schedule is shifted by its scheduler's `shift`),
    # noisy = (1 - sigma) x + sigma noise, target noise - x, the scheme's loss weights.
    noise_scheduler = FluxFamily.noise_scheduler
    size_step = FluxFamily.size_step  # the VAE's downscaling times the transformer's 2x2 patches: 16 px
    timesteps = FluxFamily.timesteps
    validation_timesteps = FluxFamily.validation_timesteps
    noisy = FluxFamily.noisy
    target = FluxFamily.target
    loss_weights = FluxFamily.loss_weights

    # inference
    def build_pipeline(self, modules: Mapping[str, Any], noise_scheduler: Any) -> Any:
        """The family's pipeline with its own sampler (flow-matching Euler; Flux.2: shifted by
        image size) made afresh from the training scheduler's config."""
        import diffusers

        sampler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
        parts = {c: modules[c] for c in self.components if c != "scheduler"}
        return getattr(diffusers, self.pipeline_class)(scheduler=sampler, **parts, **self.pipeline_kwargs())

    def may_upcast(self, quantized: bool) -> bool:
        """Never: the transformer alone is 16-36 GB in float32, and a quantized one cannot be cast."""
        return False

    # LoRA and export
    def lora_targets(self, component: str, module: Any) -> list[str]:
        return list(self.lora_modules) if component == self.denoiser else []

    def save_lora(self, folder: str, layers: Mapping[str, dict]) -> None:
        import diffusers

        layers = layers.get(self.denoiser)
        getattr(diffusers, self.pipeline_class).save_lora_weights(
            folder, transformer_lora_layers=None if layers is None else peft_names(layers))

    def ui_lora(self, prediction_type: str) -> UILora:
        prefix = self.model.UI_PREFIX
        return UILora(prefixes={self.denoiser: prefix}, base_model_version=self.ui_names[0],
                      architecture=self.ui_names[1], implementation="diffusers", convert=self._ui_tensors)

    def _ui_tensors(self, state_dict: Mapping, alpha: float | Mapping[str, float] | None) -> dict:
        """The UI file's tensors in the family module's layout (its `ui_lora_tensors`)."""
        return self.model.ui_lora_tensors(state_dict, alpha.get(self.denoiser) if isinstance(alpha, Mapping) else alpha)

    def pipeline_size(self, pipe) -> int:
        """The family's native size: the pipeline keeps no default of its own."""
        return self.resolution

    def single_file_layout(self) -> SingleFileLayout:
        raise UserError(f"{self.label}: a single-file export of the whole model is not written; export the "
                        "LoRA file (without --fuse_lora) and load it on the base model in the UI.")

    @property
    def memory(self) -> MemoryNumbers:
        assert self.memory_numbers is not None
        return self.memory_numbers
