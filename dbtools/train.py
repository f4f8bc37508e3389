"""DreamBooth training of Stable Diffusion with per-image prompts.

`train(cfg)` is the whole run and reads top to bottom: check the inputs, set up
accelerate, make class images, load models, cache data, loop, save. The settings and
the command line live in `dbtools.train_config`, the output-folder rules (which step
and checkpoint folders are complete, rotation, resume) in `dbtools.checkpoints`; their
public names are importable from here too.

Output layout (as in Shivam's script): `<output_dir>/<step>/` is a diffusers pipeline
folder (LoRA mode: `pytorch_lora_weights.safetensors`) with `args.json` and
`samples/<i>.png`; TensorBoard logs go under `<output_dir>/0/logs`. Accelerate state for
resuming goes to `<output_dir>/checkpoint-<step>/`. Every folder is built under a
temporary name and renamed when complete, so `latest_weights`, `latest_checkpoint` and
`--resume_from_checkpoint latest` only ever see complete folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import errno
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbtools.errors import UserError
from dbtools.atomic import atomic_dir, atomic_save_image, atomic_write_text
from dbtools.checkpoints import (SINGLE_FILE_NAME, check_checkpoint_files, checkpoint_step,
                                 register_state_hooks, remove_stale_temporaries, resume_path, resume_problems,
                                 should_save, write_checkpoint)
from dbtools.concepts import Concept, ConceptError
from dbtools.data import (DataConfig, DataPlan, DreamBoothData, LatentCache, concept_class_examples,
                          scan_concepts, step_seed, weights_key)
from dbtools.train_config import TrainConfig, flag_problems, public_args, report_trackers, resolve_mixed_precision
from dbtools.train_folders import (MiB, another_run_message, folder_problems, holds_another_run, human_size,
                                   move_previous_run, nearest_existing)

# The settings and the output-folder rules have modules of their own; their public names
# stay importable from here.
from dbtools.checkpoints import (CHECKPOINT_PREFIX, LORA_WEIGHTS, checkpoints_to_remove,  # noqa: F401
                                 is_weights_folder, latest_checkpoint, latest_weights, list_weights,
                                 step_folders)
from dbtools.train_config import LR_SCHEDULERS, build_parser, parse_args  # noqa: F401

logger = logging.getLogger(__name__)


class TrainError(UserError):
    """Training cannot start or go on because of something the user can fix."""


# --------------------------------------------------------------------------- pre-flight


def preflight(cfg: TrainConfig) -> tuple[list[Concept], DataPlan]:
    """Check flags, model path, concepts, images and captions before loading any model.

    Raises one `TrainError` listing every problem with its fix; returns the concepts and
    the data plan otherwise.
    """
    from dbtools.models import ModelLoadError, check_model_path

    problems = flag_problems(cfg)
    if cfg.pretrained_model_name_or_path:
        try:
            check_model_path(cfg.pretrained_model_name_or_path,
                             ("tokenizer", "text_encoder", "unet", "scheduler"))
        except ModelLoadError as exc:
            problems.append(str(exc))
    concepts: list[Concept] = []
    plan = DataPlan([], [])
    if cfg.concepts_list or cfg.instance_data_dir:
        try:
            concepts = cfg.concepts()
        except ConceptError as exc:
            problems.append(str(exc))
    if concepts:
        plan, data_problems = scan_concepts(
            concepts, read_prompts_from_txts=cfg.read_prompts_from_txts,
            prompt_template=cfg.prompt_template, with_prior_preservation=cfg.with_prior_preservation,
            output_dir=cfg.output_dir)
        problems += data_problems
    problems += output_problems(cfg, concepts, plan)
    problems += resume_problems(cfg.output_dir, cfg.resume_from_checkpoint)
    if problems:
        raise TrainError("\n".join(["Cannot start training. Fix these first:", *[f"- {p}" for p in problems]]))
    return concepts, plan


def output_problems(cfg: TrainConfig, concepts: list[Concept], plan: DataPlan) -> list[str]:
    """Folders the run writes to that are files, unwritable, short of space, or hold another run."""
    model_bytes = local_model_bytes(cfg.pretrained_model_name_or_path)
    problems = folder_problems(cfg.output_dir, "--output_dir", max(model_bytes, 64 * MiB))
    problems += folder_problems(Path(cfg.output_dir, "0", cfg.logging_dir), "--logging_dir", 16 * MiB)
    if cfg.cache_dir and not cfg.not_cache_latents:
        problems += folder_problems(cfg.cache_dir, "--cache_dir", _latent_bytes(cfg, len(plan.instance)))
    if cfg.with_prior_preservation:
        problems += _class_folder_problems(cfg, concepts)
    resuming = resume_path(cfg.output_dir, cfg.resume_from_checkpoint) is not None
    if not problems and not resuming and not cfg.overwrite_output_dir and holds_another_run(cfg.output_dir):
        problems.append(another_run_message(cfg.output_dir, bool(cfg.resume_from_checkpoint)))
    if resuming and cfg.overwrite_output_dir:
        problems.append("--overwrite_output_dir moves the run aside that --resume_from_checkpoint would continue: "
                        "drop one of the two.")
    return problems


def local_model_bytes(name_or_path: str) -> int:
    """Bytes of the weights a save writes, from a local model (0 when it is a Hub id)."""
    path = Path(name_or_path or "")
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    total = 0
    for sub in ("unet", "text_encoder", "vae"):
        files = [f for f in (path / sub).glob("*") if f.suffix in (".safetensors", ".bin")]
        full = [f for f in files if ".fp16." not in f.name] or files
        total += sum(f.stat().st_size * (2 if ".fp16." in f.name else 1) for f in full)
    return total


def _latent_bytes(cfg: TrainConfig, n_images: int) -> int:
    # mean and std, 4 channels at 1/8 of the resolution, float32, per flip.
    flips = 2 if cfg.hflip else 1
    return max(MiB, n_images * flips * 2 * 4 * (cfg.resolution // 8) ** 2 * 4)


def _class_folder_problems(cfg: TrainConfig, concepts: list[Concept]) -> list[str]:
    """Class folders that must receive generated images: writable, with room for them."""
    problems, seen = [], set()
    for concept in concepts:
        folder = concept.class_data_dir
        if not isinstance(folder, str) or not folder.strip() or os.path.realpath(folder) in seen:
            continue
        seen.add(os.path.realpath(folder))
        missing = cfg.num_class_images - len(concept_class_examples(concept))
        if missing > 0:  # a JPEG of about 3/8 byte per pixel each
            problems += folder_problems(folder, "class_data_dir", max(MiB, missing * cfg.resolution ** 2 * 3 // 8))
    return problems


# --------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    accelerator: Any
    models: Any
    unet: Any
    text_encoder: Any
    data: DreamBoothData
    prompts: "PromptEncoder"
    optimizer: Any
    lr_scheduler: Any
    params: list
    weight_dtype: Any
    ema: Any = None
    seed: int = 0
    max_train_steps: int = 0
    start_step: int = 0
    skipped_steps: int = 0
    resumed_from: Path | None = None
    loader: Any = None


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    weights_dir: Path | None
    global_step: int
    skipped_steps: int
    single_file: Path | None = None
    resumed_from: Path | None = None


# Every process waits at a collective while the main one saves the final weights, exports
# the single file or uploads to the Hub; on a slow disk or link that takes far longer than
# torch's 10-minute default, which would kill the whole run.
PROCESS_GROUP_TIMEOUT_HOURS = 3


def make_accelerator(cfg: TrainConfig):
    """An `Accelerator` with the usable mixed precision, Shivam's log folder and a long collective timeout."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    requested = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    precision, warning = usable_precision(requested, cuda)
    if warning:
        logger.warning(warning)
    project = ProjectConfiguration(project_dir=cfg.output_dir,
                                   logging_dir=str(Path(cfg.output_dir, "0", cfg.logging_dir)))
    trackers = report_trackers(cfg.report_to)
    timeout = InitProcessGroupKwargs(timeout=timedelta(hours=PROCESS_GROUP_TIMEOUT_HOURS))
    return Accelerator(mixed_precision=precision, log_with=trackers or None, project_config=project,
                       cpu=not cuda and torch.cuda.is_available(), kwargs_handlers=[timeout])


def usable_precision(requested: str, cuda: bool) -> tuple[str, str | None]:
    """`resolve_mixed_precision`, asking the GPU about bf16 only when bf16 is requested."""
    from dbtools.classgen import native_bf16

    return resolve_mixed_precision(requested, cuda, requested == "bf16" and cuda and native_bf16())


def weight_dtype_for(accelerator):
    """Dtype for frozen modules: half under fp16/bf16 mixed precision, else float32."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_class_images(cfg: TrainConfig, concepts: list[Concept], accelerator) -> None:
    """Generate missing class images, shared out across the processes."""
    from dbtools.classgen import ClassGenConfig, ensure_class_images, pipeline_loader_for, plan_class_images

    if not cfg.with_prior_preservation:
        return
    gen = ClassGenConfig(num_class_images=cfg.num_class_images, sample_batch_size=cfg.sample_batch_size,
                         seed=cfg.seed, precision=cfg.prior_generation_precision,
                         show_progress=accelerator.is_local_main_process)
    # Every process counts what is missing before any of them writes, so all agree on
    # the indices; each then makes its own share of them.
    plan = plan_class_images(concepts, gen)
    accelerator.wait_for_everyone()
    loader = pipeline_loader_for(cfg.pretrained_model_name_or_path, gen,
                                 vae_name_or_path=cfg.pretrained_vae_name_or_path,
                                 revision=cfg.revision, variant=cfg.variant, device=str(accelerator.device))
    ensure_class_images(concepts, gen, loader, plan=plan, rank=accelerator.process_index,
                        world=accelerator.num_processes)
    accelerator.wait_for_everyone()


def class_examples(concepts: list[Concept], num_class_images: int, read_prompts_from_txts: bool = False) -> list:
    """The first `num_class_images` class images of each distinct class folder (as Shivam's script)."""
    seen, out = set(), []
    for concept in concepts:
        key = os.path.realpath(concept.class_data_dir)
        if key not in seen:
            seen.add(key)
            out += concept_class_examples(concept, read_prompts_from_txts)[:num_class_images]
    return out


def load_models(cfg: TrainConfig):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler, in float32."""
    from dbtools.models import load_sd_components

    return load_sd_components(cfg.pretrained_model_name_or_path, vae_name_or_path=cfg.pretrained_vae_name_or_path,
                              revision=cfg.revision, variant=cfg.variant, tokenizer_name=cfg.tokenizer_name)


def prepare_modules(cfg: TrainConfig, models, accelerator, weight_dtype) -> list:
    """Freeze what is not trained, add LoRA adapters, enable memory savers; return trainable params."""
    _freeze_and_place(cfg, models, accelerator.device, weight_dtype)
    _enable_memory_savers(cfg, models)
    modules = [models.unet] + ([models.text_encoder] if cfg.train_text_encoder else [])
    for m in modules:
        m.train()
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _freeze_and_place(cfg: TrainConfig, models, device, weight_dtype) -> None:
    """Frozen modules go to `device` in `weight_dtype`; trained weights (or LoRA adapters) stay float32."""
    import torch

    models.vae.requires_grad_(False)
    _move(models.vae, device, weight_dtype)
    train_te = cfg.train_text_encoder
    if cfg.use_lora:
        _add_lora(cfg, models)
    else:
        models.unet.requires_grad_(True)
        models.text_encoder.requires_grad_(train_te)
    if not train_te:
        _move(models.text_encoder, device, weight_dtype)
    if cfg.use_lora and weight_dtype != torch.float32:
        # Frozen base weights in half precision, trainable adapters in float32.
        _move(models.unet, device, weight_dtype)
        if train_te:
            _move(models.text_encoder, device, weight_dtype)
        from diffusers.training_utils import cast_training_params

        cast_training_params([models.unet] + ([models.text_encoder] if train_te else []), dtype=torch.float32)


def _enable_memory_savers(cfg: TrainConfig, models) -> None:
    """Gradient checkpointing, xformers attention and TF32, as asked."""
    import torch

    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            _checkpoint_text_encoder(models.text_encoder)
    if cfg.enable_xformers_memory_efficient_attention:
        _try_xformers(models.unet)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _checkpoint_text_encoder(text_encoder) -> None:
    """Non-reentrant gradient checkpointing on any transformers version.

    Reentrant checkpointing (transformers 4.x's default) passes no gradient to LoRA
    adapters when the checkpointed inputs do not require grad, so they silently never
    train. transformers 5 renamed the call; the old name warns.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _try_xformers(unet) -> None:
    """xformers attention when it works here; else a warning and PyTorch's SDPA attention.

    An installed xformers built for another torch or CUDA (common on Colab) fails only
    when enabled, and the run can go on without it.
    """
    import torch

    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # xformers fails with ImportError, RuntimeError, ValueError, NotImplementedError
        unet.disable_xformers_memory_efficient_attention()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.warning("--enable_xformers_memory_efficient_attention: xformers cannot run here (%s); using "
                       "PyTorch's SDPA attention instead. Reinstall xformers to match torch %s, or drop the flag.",
                       reason, torch.__version__)


def _add_lora(cfg: TrainConfig, models) -> None:
    from peft import LoraConfig

    models.unet.requires_grad_(False)
    models.text_encoder.requires_grad_(False)
    models.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if cfg.train_text_encoder:
        from peft import inject_adapter_in_model

        # peft directly: transformers' own `add_adapter` may demand a newer peft.
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                                models.text_encoder)


def make_optimizer(cfg: TrainConfig, params: list, device):
    """AdamW, or bitsandbytes' 8-bit AdamW when asked and it runs on `device` (else AdamW + warning)."""
    import torch

    cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        cls = _adamw_8bit(device) or cls
    return cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
               weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def _adamw_8bit(device):
    """bitsandbytes' AdamW8bit if one step runs on `device` here, else None (with a warning)."""
    import torch

    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096 * 2, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        return bnb.optim.AdamW8bit
    except Exception as exc:  # bitsandbytes raises many kinds (import, CUDA setup, no kernel)
        logger.warning("--use_8bit_adam: bitsandbytes cannot run on %s (%s); using torch AdamW, which "
                       "needs more memory for optimizer state.", device, str(exc).splitlines()[0] if str(exc) else
                       type(exc).__name__)
        return None


class PromptEncoder:
    """Prompts -> text-encoder hidden states, padded like Shivam's script.

    Prompts are tokenized to the max length; without `pad_tokens` a batch is cut to its
    longest prompt. CLIP's attention is causal, so the states of the first n tokens do
    not depend on what follows: cutting cached max-length states gives exactly what
    encoding the shorter batch would. With `cache=True` (frozen text encoder) states are
    kept per prompt; once `grow` is False, prompts not yet cached are encoded every time
    and never kept.
    """

    def __init__(self, tokenizer, text_encoder, *, pad_tokens: bool, max_length: int | None,
                 use_attention_mask: bool, cache: bool, max_cached: int = 20_000):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.pad_tokens, self.use_mask = pad_tokens, use_attention_mask
        self.max_length = max_length or tokenizer.model_max_length
        self.cache: dict[str, tuple] | None = {} if cache else None  # prompt -> (states, tokens)
        self.max_cached = max_cached
        self.grow = True

    def tokenize(self, prompts: list[str]):
        out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return out.input_ids, out.attention_mask

    def encode(self, prompts: list[str], device):
        """Hidden states `(len(prompts), L, D)` on `device` (with grad if the encoder trains)."""
        import torch

        if self.cache is None:
            ids, mask = self.tokenize(prompts)
            length = ids.shape[1] if self.pad_tokens else int(mask.sum(1).max())
            return self._forward(ids[:, :length], mask[:, :length], device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        fresh = {}
        if missing:
            ids, mask = self.tokenize(missing)
            with torch.no_grad():
                states = self._forward(ids, mask, device)
            fresh = {p: (s, int(n)) for p, s, n in zip(missing, states, mask.sum(1))}
            for p in missing:
                if self.grow and len(self.cache) < self.max_cached:
                    self.cache[p] = fresh[p]
        entries = [self.cache.get(p) or fresh[p] for p in prompts]
        length = self.max_length if self.pad_tokens else max(n for _, n in entries)
        return torch.stack([s for s, _ in entries])[:, :length]

    def _forward(self, ids, mask, device):
        """Run the encoder where it is (it may be parked on the CPU); states go to `device`."""
        where = next(self.text_encoder.parameters()).device
        out = self.text_encoder(ids.to(where), attention_mask=mask.to(where) if self.use_mask else None)[0]
        return out.to(device)


def make_data(cfg: TrainConfig, plan: DataPlan, models, accelerator, weight_dtype) -> DreamBoothData:
    """The dataset, with VAE latents cached unless `--not_cache_latents`."""
    vae, unet = models.vae, models.unet
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    step = scale * 2 ** (len(unet.config.block_out_channels) - 1)
    dcfg = DataConfig(resolution=cfg.resolution, bucket_step=step, aspect_ratio_bucketing=cfg.aspect_ratio_bucketing,
                      center_crop=cfg.center_crop, hflip=cfg.hflip, train_batch_size=cfg.train_batch_size,
                      caption_dropout=cfg.caption_dropout, shuffle_captions=cfg.shuffle_captions,
                      keep_tokens=cfg.keep_tokens, seed=cfg.seed or 0)
    cache = None
    if not cfg.not_cache_latents:
        key = weights_key(vae_weight_files(cfg), vae.config, cfg.pretrained_model_name_or_path,
                          cfg.pretrained_vae_name_or_path, cfg.revision, cfg.variant)
        cache = LatentCache(key, cfg.cache_dir)
    data = DreamBoothData(plan, dcfg, cache)
    if cache is not None:
        flips = (False, True) if cfg.hflip else (False,)
        cache.fill(data.all_items(), flips, lambda px: _vae_stats(vae, px, accelerator.device, weight_dtype),
                   progress=accelerator.is_local_main_process)
        logger.info("latents: %d encoded, %d read from %s", cache.encoded, cache.read_from_disk,
                    cfg.cache_dir or "memory")
    return data


def vae_weight_files(cfg: TrainConfig) -> list[Path]:
    """The files holding the VAE's weights (local paths, or the Hub cache's copies); [] if unknown."""
    name = cfg.pretrained_vae_name_or_path or cfg.pretrained_model_name_or_path
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return [path]
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        return [f for f in folder.glob("*") if f.suffix in (".safetensors", ".bin")]
    try:  # a Hub id: the cached snapshot's files (their folder name is the commit)
        from huggingface_hub import snapshot_download

        sub = "" if cfg.pretrained_vae_name_or_path else "vae/"
        snap = Path(snapshot_download(name, revision=cfg.revision if cfg.revision != "fp16" else None,
                                      allow_patterns=[f"{sub}*.safetensors", f"{sub}*.bin"], local_files_only=True))
        return [f for f in (snap / sub).glob("*") if f.suffix in (".safetensors", ".bin")]
    except Exception:  # not in the local cache under this name: the ids and the config still key it
        return []


def _vae_stats(vae, pixels, device, dtype):
    import torch

    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(pixels).to(device, dtype=dtype)).latent_dist
    return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()


def make_prompt_encoder(cfg: TrainConfig, models, data: DreamBoothData, accelerator) -> PromptEncoder:
    """Prompt encoding; embeddings are cached when the text encoder is frozen."""
    cache = not cfg.train_text_encoder and (not cfg.not_cache_latents or cfg.pre_compute_text_embeddings)
    enc = PromptEncoder(models.tokenizer, models.text_encoder, pad_tokens=cfg.pad_tokens,
                        max_length=cfg.tokenizer_max_length, use_attention_mask=cfg.text_encoder_use_attention_mask,
                        cache=cache)
    if cache:
        prompts = {"" if cfg.caption_dropout else None}
        if not cfg.shuffle_captions:
            prompts |= {it.example.prompt for it in data.all_items()}
        prompts = sorted(prompts - {None})
        for k in range(0, len(prompts), 64):
            enc.encode(prompts[k:k + 64], accelerator.device)
        # Shuffled captions almost never repeat: caching them would only fill GPU memory
        # (about 110 KiB per prompt for SD 1.5 in fp16, a step at a time).
        enc.grow = not cfg.shuffle_captions
    return enc


def make_lr_scheduler(cfg: TrainConfig, optimizer, max_train_steps: int, num_processes: int):
    """diffusers' schedulers; counts are per process as accelerate steps them once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, step_rules=cfg.lr_step_rules,
                         num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes,
                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def total_steps(cfg: TrainConfig, batches_per_epoch: int, num_processes: int) -> int:
    """`max_train_steps`, or epochs x optimizer steps per epoch."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    per_epoch = math.ceil(batches_per_epoch / (num_processes * cfg.gradient_accumulation_steps))
    return cfg.num_train_epochs * max(1, per_epoch)


def setup(cfg: TrainConfig, plan: DataPlan, accelerator) -> Run:
    """Load and prepare models, data, optimizer and schedule; resume if asked."""
    models = load_models(cfg)
    weight_dtype = weight_dtype_for(accelerator)
    params = prepare_modules(cfg, models, accelerator, weight_dtype)
    data = make_data(cfg, plan, models, accelerator, weight_dtype)
    prompts = make_prompt_encoder(cfg, models, data, accelerator)
    _offload_cached(cfg, models, prompts)
    world = accelerator.num_processes
    max_steps = total_steps(cfg, data.batches_per_epoch, world)
    logger.info("training on %d process(es): %d instance and %d class images, %d steps",
                world, len(data.instance), len(data.classes), max_steps)
    if cfg.scale_lr:
        cfg.learning_rate *= cfg.gradient_accumulation_steps * cfg.train_batch_size * world
    optimizer = make_optimizer(cfg, params, accelerator.device)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, max_steps, world)
    ema = _make_ema(cfg, models, accelerator)
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(models.unet, models.text_encoder,
                                                                          optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
        text_encoder = models.text_encoder
    prompts.text_encoder = text_encoder
    register_state_hooks(accelerator, ema, save_adapters=lambda folder: _save_lora(run, folder))
    run = Run(cfg=cfg, accelerator=accelerator, models=models, unet=unet, text_encoder=text_encoder, data=data,
              prompts=prompts, optimizer=optimizer, lr_scheduler=lr_scheduler, params=params,
              weight_dtype=weight_dtype, ema=ema, seed=cfg.seed or 0, max_train_steps=max_steps)
    run.start_step = resume(run)
    return run


def _offload_cached(cfg: TrainConfig, models, prompts: PromptEncoder) -> None:
    """Frozen modules whose outputs are all cached leave the GPU until sampling time."""
    if not cfg.not_cache_latents:
        models.vae.to("cpu")
    if prompts.cache is not None and not cfg.shuffle_captions:
        models.text_encoder.to("cpu")


def _make_ema(cfg: TrainConfig, models, accelerator):
    """The UNet's EMA on the main process only: only it saves weights, so the other ranks
    would keep (and step) a full fp32 copy of the UNet for nothing."""
    if not cfg.use_ema or not accelerator.is_main_process:
        return None
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    ema = EMAModel(models.unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                   model_config=models.unet.config)
    ema.to(accelerator.device)
    return ema


def resume(run: Run) -> int:
    """Load accelerate state from the chosen checkpoint; return the step to continue from."""
    path = resume_path(run.cfg.output_dir, run.cfg.resume_from_checkpoint)
    if run.cfg.resume_from_checkpoint and path is None:
        logger.info("no complete checkpoint in %s: starting a new run", run.cfg.output_dir)
        return 0
    if path is None:
        return 0
    logger.info("resuming from %s", path)
    check_checkpoint_files(path)  # checked in pre-flight too; the folder may have changed since
    run.accelerator.load_state(str(path))
    run.resumed_from = path
    return checkpoint_step(path)


# --------------------------------------------------------------------------- one step


def compute_loss(run: Run, micro_index: int):
    """Loss of micro-batch `micro_index`: instance loss + prior_loss_weight x class loss.

    All randomness (noise, timesteps, latent samples) comes from a generator seeded by the
    run seed and `micro_index`, so a resumed run repeats an uninterrupted one exactly.
    """
    import torch

    batch = fetch(run, micro_index)
    gen = torch.Generator().manual_seed(step_seed(run.seed, micro_index, "noise"))
    parts = [batch["instance"]] + ([batch["class"]] if batch["class"] else [])
    latents = [_latents(run, part, gen) for part in parts]
    embeds = run.prompts.encode([p for part in parts for p in part["prompts"]], run.accelerator.device)
    embeds = torch.split(embeds, [len(part["prompts"]) for part in parts])
    if len(parts) == 2 and latents[0].shape[1:] == latents[1].shape[1:]:
        per_sample = _per_sample_loss(run, torch.cat(latents), torch.cat(embeds), gen)
        losses = torch.split(per_sample, [len(latents[0]), len(latents[1])])
    else:
        losses = [_per_sample_loss(run, lat, emb, gen) for lat, emb in zip(latents, embeds)]
    loss = losses[0].mean()
    if len(losses) == 2:
        loss = loss + run.cfg.prior_loss_weight * losses[1].mean()
    return loss


def micro_indices(cfg: TrainConfig, start_step: int, max_steps: int, world: int, rank: int) -> list[int]:
    """The micro-batch indices this process trains on, in order, from `start_step` on."""
    accum = cfg.gradient_accumulation_steps
    return [(step * accum + k) * world + rank for step in range(start_step, max_steps) for k in range(accum)]


class _MicroBatchDataset:
    """Micro-batches by position, for a `DataLoader` that loads images in worker processes."""

    def __init__(self, data: DreamBoothData, indices: list[int]):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        return self.indices[j], self.data.micro_batch(self.indices[j])


def _as_is(x):
    return x


def make_loader(run: Run):
    """Prefetching iterator over this process's micro-batches (only with workers and no latent cache)."""
    cfg = run.cfg
    if cfg.dataloader_num_workers < 1 or run.data.cache is not None:
        return None
    from torch.utils.data import DataLoader

    acc = run.accelerator
    indices = micro_indices(cfg, run.start_step, run.max_train_steps, acc.num_processes, acc.process_index)
    return iter(DataLoader(_MicroBatchDataset(run.data, indices), batch_size=None, shuffle=False,
                           num_workers=cfg.dataloader_num_workers, collate_fn=_as_is))


def fetch(run: Run, micro_index: int) -> dict:
    """Micro-batch `micro_index`, from the prefetching loader when there is one."""
    if run.loader is None:
        return run.data.micro_batch(micro_index)
    index, batch = next(run.loader)
    if index != micro_index:  # the loader and the loop must never drift apart
        raise RuntimeError(f"data loader gave micro-batch {index}, expected {micro_index}")
    return batch


def _latents(run: Run, part: dict, gen):
    """Scaled VAE latents sampled from the cached (or freshly encoded) distribution."""
    import torch

    device, vae = run.accelerator.device, run.models.vae
    if "latent_mean" in part:
        mean, std = torch.from_numpy(part["latent_mean"]), torch.from_numpy(part["latent_std"])
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        return (sample * vae.config.scaling_factor).to(device)
    # Not cached: the distribution stays where the VAE made it (no GPU -> CPU round trip);
    # only the noise, drawn from the seeded CPU generator, travels.
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(part["pixels"]).to(device, dtype=run.weight_dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=gen).to(device)
    return (dist.mean.float() + dist.std.float() * noise) * vae.config.scaling_factor


def _per_sample_loss(run: Run, latents, embeds, gen):
    import torch
    import torch.nn.functional as F

    scheduler, cfg = run.models.noise_scheduler, run.cfg
    noise = torch.randn(latents.shape, generator=gen)
    if cfg.offset_noise:
        noise = noise + cfg.offset_noise_strength * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    pred = run.unet(noisy, timesteps, embeds).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma:
        loss = loss * snr_weights(scheduler, timesteps, cfg.snr_gamma, scheduler.config.prediction_type)
    return loss


def snr_weights(noise_scheduler, timesteps, gamma: float, prediction_type: str):
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023) for the prediction type."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainError(f"unsupported prediction_type {kind!r} in the model's scheduler config "
                     "(expected epsilon or v_prediction).")


def train_step(run: Run, step: int) -> float | None:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    Returns the mean loss, or None when the loss (or gradient) was not finite on any
    process: then nothing is applied and the gradients are dropped. The loss and the
    finite flags stay on the device until one read per step, so the GPU never waits for
    the host between micro-batches.
    """
    import torch

    acc, cfg = run.accelerator, run.cfg
    total, nonfinite = _accumulate_gradients(run, step)
    grad_norm = acc.clip_grad_norm_(run.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    if grad_norm is not None and acc.scaler is None:
        nonfinite = nonfinite | ~torch.isfinite(torch.as_tensor(grad_norm, device=nonfinite.device))
    loss, finite = _read_step(acc, total, nonfinite)
    if finite:
        run.optimizer.step()
    elif acc.scaler is not None and grad_norm is not None:
        acc.scaler.update()  # forget this step's unscale so the next step can unscale again
    run.lr_scheduler.step()
    # Gradients are always freed, not zeroed: it is faster and uses less memory between
    # steps (diffusers' --set_grads_to_none is accepted and is what we always do).
    run.optimizer.zero_grad(set_to_none=True)
    if finite and run.ema is not None:
        run.ema.step(acc.unwrap_model(run.unet).parameters())
    return loss if finite else None


def _accumulate_gradients(run: Run, step: int):
    """Forward and backward every micro-batch of `step`.

    Returns the mean loss and a flag "some loss was not finite", both as tensors on the
    device: nothing here waits for the GPU.
    """
    import torch

    acc = run.accelerator
    accum = run.cfg.gradient_accumulation_steps
    total = nonfinite = None
    for k in range(accum):
        micro = (step * accum + k) * acc.num_processes + acc.process_index
        sync = k == accum - 1
        ctx = contextlib.nullcontext() if sync else _no_sync(run)
        with ctx:
            loss = compute_loss(run, micro)
            # A NaN loss still goes through backward so every process joins the gradient
            # all-reduce; its gradients are dropped by `train_step`.
            acc.backward(loss / accum)
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        total = loss / accum if total is None else total + loss / accum
        nonfinite = bad if nonfinite is None else nonfinite | bad
    return total, nonfinite


def _read_step(accelerator, total, nonfinite) -> tuple[float, bool]:
    """The step's loss and whether it was finite on every process: one read from the device."""
    import torch

    flag = nonfinite.float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    loss, bad = torch.cat([total.float().reshape(1), flag.reshape(1)]).tolist()
    return loss, bad == 0.0


def _no_sync(run: Run):
    stack = contextlib.ExitStack()
    stack.enter_context(run.accelerator.no_sync(run.unet))
    if run.cfg.train_text_encoder:
        stack.enter_context(run.accelerator.no_sync(run.text_encoder))
    return stack


# --------------------------------------------------------------------------- saving


def build_pipeline(run: Run):
    """A `StableDiffusionPipeline` from the models being trained (DDIM sampler)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    acc = run.accelerator
    return StableDiffusionPipeline(
        vae=run.models.vae, text_encoder=acc.unwrap_model(run.text_encoder), tokenizer=run.models.tokenizer,
        unet=acc.unwrap_model(run.unet), scheduler=DDIMScheduler.from_config(run.models.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@contextlib.contextmanager
def _for_inference(run: Run):
    """Frozen modules on the device in float32, EMA weights swapped in; all undone afterwards."""
    import torch

    device = run.accelerator.device
    frozen = [run.models.vae] + ([] if run.cfg.train_text_encoder else [run.models.text_encoder])
    before = [(m, next(m.parameters()).device, next(m.parameters()).dtype) for m in frozen]
    for m in frozen:
        _move(m, device, torch.float32)
    params = list(run.accelerator.unwrap_model(run.unet).parameters())
    if run.ema is not None:
        run.ema.store(params)
        run.ema.copy_to(params)
    try:
        yield
    finally:
        if run.ema is not None:
            run.ema.restore(params)
        for m, dev, dtype in before:
            _move(m, dev, dtype)


def _move(module, device, dtype) -> None:
    """`module.to(device, dtype)`, casting only when the dtype really changes."""
    import torch

    if next(module.parameters()).dtype != dtype:
        if getattr(module, "_keep_in_fp32_modules", None):
            module.to(dtype=dtype)
        else:
            # diffusers' `ModelMixin.to` logs "modules ... should be kept in float32" at every
            # cast, even for models that keep none in float32 (the VAE, the UNet); only a model
            # that names such modules needs its handling.
            torch.nn.Module.to(module, dtype=dtype)
    module.to(device)


def generate(pipe, prompt: str, n: int, cfg: TrainConfig, seed: int, negative: str | None = None) -> list:
    """`n` images of `prompt` with a fixed seed (one pipeline call per image)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(n):
        gen = torch.Generator("cpu").manual_seed(seed + i)
        with torch.no_grad():
            images += pipe(prompt, negative_prompt=negative, guidance_scale=cfg.save_guidance_scale,
                           num_inference_steps=cfg.save_infer_steps, generator=gen, height=cfg.resolution,
                           width=cfg.resolution).images
    return images


def save_weights(run: Run, step: int, final: bool = False) -> Path:
    """Write `<output_dir>/<step>/` (weights, args.json, samples) atomically; main process only.

    With `--output_layout diffusers` the final weights go into `output_dir` itself instead
    (`from_pretrained(output_dir)` loads them, as with diffusers' script).
    """
    cfg = run.cfg
    if final and cfg.output_layout == "diffusers":
        return _save_final_in_place(run, step)
    target = Path(cfg.output_dir) / str(step)
    with atomic_dir(target) as tmp:
        with _for_inference(run):
            pipe = build_pipeline(run)
            if cfg.use_lora:
                _save_lora(run, tmp)
            else:
                _save_pipeline(pipe, tmp, skip_text_encoder=final and cfg.skip_save_text_encoder)
            atomic_write_text(tmp / "args.json", json.dumps(public_args(cfg), indent=2))
            if cfg.save_sample_prompt:
                for i, img in enumerate(generate(pipe, cfg.save_sample_prompt, cfg.n_save_sample, cfg, run.seed,
                                                 cfg.save_sample_negative_prompt)):
                    atomic_save_image(img, tmp / "samples" / f"{i}.png")
            del pipe
        if final and cfg.save_single_file:
            # The export reads the saved folder, so it runs after the float32 VAE and text
            # encoder have left the GPU and the EMA's copy of the trained weights is gone.
            from dbtools.export import export_single_file

            export_single_file(tmp, tmp / SINGLE_FILE_NAME)
    logger.info("[*] weights saved at %s", target)
    return target


def _save_pipeline(pipe, folder: Path, skip_text_encoder: bool = False) -> None:
    """`save_pretrained` in safetensors; without the text encoder when asked (diffusers'
    `--skip_save_text_encoder`: the base model's is given back when loading)."""
    if skip_text_encoder:
        pipe = type(pipe)(**{**pipe.components, "text_encoder": None})
    pipe.save_pretrained(folder, safe_serialization=True)


def _save_final_in_place(run: Run, step: int) -> Path:
    """The final weights straight into `output_dir` (diffusers' layout), built in a step
    folder first so a crash never leaves a half-written pipeline; the step folder's files
    are then moved up, each with an atomic rename."""
    staged = save_weights(run, step)
    root = Path(run.cfg.output_dir)
    for item in sorted(staged.iterdir()):
        dest = root / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)
    staged.rmdir()
    logger.info("[*] final weights moved into %s (--output_layout diffusers)", root)
    return root


def lora_state_dict(model, adapter: str = "default") -> dict:
    """The LoRA tensors of `model` with peft's key names (adapter name removed)."""
    marker = f".{adapter}."
    return {k.replace(marker, "."): v for k, v in model.state_dict().items() if "lora_" in k}


def _save_lora(run: Run, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    acc = run.accelerator
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(acc.unwrap_model(run.unet)))
    te_layers = None
    if run.cfg.train_text_encoder:
        te_layers = convert_state_dict_to_diffusers(lora_state_dict(acc.unwrap_model(run.text_encoder)))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=te_layers)


def save_validation(run: Run, step: int) -> None:
    """diffusers-style validation images: `<output_dir>/validation/<step>/<i>.png` and TensorBoard."""
    import numpy as np

    cfg = run.cfg
    with atomic_dir(Path(cfg.output_dir) / "validation" / str(step)) as tmp, _for_inference(run):
        pipe = build_pipeline(run)
        if cfg.validation_scheduler:
            from dbtools.models import make_scheduler

            pipe.scheduler = make_scheduler(cfg.validation_scheduler, pipe.scheduler.config)
        images = generate(pipe, cfg.validation_prompt, cfg.num_validation_images, cfg, run.seed)
        for i, img in enumerate(images):
            atomic_save_image(img, tmp / f"{i}.png")
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")


def save_checkpoint(run: Run, step: int) -> Path:
    """Accelerate state in `<output_dir>/checkpoint-<step>/`, atomically; then rotate old ones."""
    return write_checkpoint(run.accelerator, run.cfg.output_dir, step, run.cfg.checkpoints_total_limit,
                            args=public_args(run.cfg))


def push_to_hub(cfg: TrainConfig, folder: Path) -> str:
    """Upload `folder` with `HfApi.upload_folder`; the token comes from HF_TOKEN / login unless given."""
    from huggingface_hub import HfApi

    api = HfApi(token=cfg.hub_token or None)
    repo_id = cfg.hub_model_id or Path(cfg.output_dir).resolve().name
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"weights {folder.name}")
    return repo_id


# --------------------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> TrainResult:
    """Train as configured; return where the final weights are.

    User errors raise `TrainError` (or `ConceptError`/`ModelLoadError`/`ClassGenError`)
    before any model loads. A resumed seeded run ends with the same weights as an
    uninterrupted one.
    """
    concepts, plan = preflight(cfg)
    if cfg.hub_token:
        logger.warning("--hub_token given on the command line: prefer HF_TOKEN or `huggingface-cli login` "
                       "(the token is never written to disk).")
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        _log_start(cfg, plan, accelerator)
        if cfg.overwrite_output_dir:
            move_previous_run(cfg.output_dir)
        remove_stale_temporaries(cfg.output_dir)
    if cfg.seed is not None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
    make_class_images(cfg, concepts, accelerator)
    if cfg.with_prior_preservation:
        plan = DataPlan(plan.instance, class_examples(concepts, cfg.num_class_images, cfg.read_prompts_from_txts))
    run = setup(cfg, plan, accelerator)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth", config=_tracker_config(cfg))
    step = loop(run)
    return finish(run, step)


def _log_start(cfg: TrainConfig, plan: DataPlan, accelerator) -> None:
    """The first lines of a training log: model, data, precision/memory and steps."""
    vae = f" with VAE {cfg.pretrained_vae_name_or_path}" if cfg.pretrained_vae_name_or_path else ""
    logger.info("model: %s%s", cfg.pretrained_model_name_or_path, vae)
    prior = f", prior preservation ({cfg.num_class_images} class images per folder)" \
        if cfg.with_prior_preservation else ""
    logger.info("data: %d instance images%s", len(plan.instance), prior)
    savers = [name for name, on in (("8-bit Adam", cfg.use_8bit_adam), ("gradient checkpointing",
              cfg.gradient_checkpointing), ("LoRA", cfg.use_lora)) if on]
    logger.info("precision: %s on %s%s", accelerator.mixed_precision, accelerator.device,
                f"; memory: {', '.join(savers)}" if savers else "")
    steps = cfg.max_train_steps or f"{cfg.num_train_epochs} epoch(s)"
    ckpt = f", checkpoints every {cfg.checkpointing_steps}" if cfg.checkpointing_steps else ""
    logger.info("steps: %s, weights every %d into %s%s", steps, cfg.save_interval, cfg.output_dir, ckpt)


def loop(run: Run) -> int:
    """The training loop: step, log, save, checkpoint; returns the last step."""
    from tqdm.auto import tqdm

    bar = tqdm(range(run.max_train_steps), initial=run.start_step, desc="steps",
               disable=not run.accelerator.is_local_main_process)
    run.loader = make_loader(run)
    recent: list[float] = []
    nonfinite_in_a_row = 0
    step = run.start_step
    while step < run.max_train_steps:
        loss = train_step(run, step)
        step += 1
        bar.update(1)
        if loss is None:
            nonfinite_in_a_row += 1
            _skip_nonfinite(run, step, nonfinite_in_a_row)
            continue
        nonfinite_in_a_row = 0
        _log_step(run, bar, step, loss, recent)
        _periodic_saves(run, step)
    bar.close()
    run.loader = None  # stops loader workers
    return step


def _skip_nonfinite(run: Run, step: int, in_a_row: int) -> None:
    """Count a skipped step; `TrainError` once `max_nonfinite_steps` come in a row."""
    run.skipped_steps += 1
    logger.warning("step %d: non-finite loss, step skipped (%d in a row)", step, in_a_row)
    if in_a_row >= run.cfg.max_nonfinite_steps:
        raise TrainError(_nonfinite_message(run.cfg, step, in_a_row))


def _log_step(run: Run, bar, step: int, loss: float, recent: list[float]) -> None:
    """Loss and lr to the trackers every step; their mean on the progress bar every `log_interval`."""
    recent.append(loss)
    lr = run.lr_scheduler.get_last_lr()[0]
    run.accelerator.log({"loss": loss, "lr": lr}, step=step)
    if step % run.cfg.log_interval == 0:
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr:.2e}")
        recent.clear()


def _periodic_saves(run: Run, step: int) -> None:
    with _disk_full_message(run):
        _main_process_saves(run, step, step == run.max_train_steps)
    run.accelerator.wait_for_everyone()


def _main_process_saves(run: Run, step: int, last: bool) -> None:
    acc, cfg = run.accelerator, run.cfg
    if acc.is_main_process:
        if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0:
            save_checkpoint(run, step)
        if should_save(step, cfg) and not last:
            save_weights(run, step)
        if cfg.validation_prompt and step % cfg.validation_steps == 0:
            save_validation(run, step)


@contextlib.contextmanager
def _disk_full_message(run: Run):
    """A full disk while saving becomes one `TrainError` naming the folder and the space needed
    (the half-written folder is already removed by `atomic_dir`)."""
    try:
        yield
    except Exception as exc:  # safetensors and torch.save report a full disk in their own ways
        out = Path(run.cfg.output_dir)
        need, free = _save_bytes(run), shutil.disk_usage(nearest_existing(out)).free
        if not (_is_disk_full(exc) or free < need):
            raise
        raise TrainError(f"The disk is full: saving in {out} needs about {human_size(need)} "
                         f"({human_size(free)} free). Free space there (e.g. remove older step folders with "
                         "`python -m dbtools cleanup` or the clean-up cell), then continue with "
                         "--resume_from_checkpoint latest.") from exc


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "code: 28" in text


def _save_bytes(run: Run) -> int:
    """Bytes of one weights save: every saved module in float32."""
    modules = [run.models.unet, run.models.text_encoder, run.models.vae]
    return sum(p.numel() * 4 for m in modules for p in m.parameters())


def _nonfinite_message(cfg: TrainConfig, step: int, count: int) -> str:
    return (f"Training stopped at step {step}: the loss was not finite (NaN/inf) {count} steps in a row "
            f"(--max_nonfinite_steps {cfg.max_nonfinite_steps}). Nothing from these steps was saved. Try a lower "
            f"--learning_rate (now {cfg.learning_rate:g}), --mixed_precision bf16 or no instead of fp16, or check "
            "the model; resume from the last good checkpoint with --resume_from_checkpoint latest.")


def finish(run: Run, step: int) -> TrainResult:
    """Save the final weights (and single file, Hub upload); end the trackers."""
    acc, cfg = run.accelerator, run.cfg
    weights = single = None
    if acc.is_main_process:
        with _disk_full_message(run):
            weights = save_weights(run, step, final=True)
        single = weights / SINGLE_FILE_NAME if cfg.save_single_file else None
        if cfg.push_to_hub:
            logger.info("uploaded to https://huggingface.co/%s", push_to_hub(cfg, weights))
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(Path(cfg.output_dir), weights, step, run.skipped_steps, single, run.resumed_from)


def _tracker_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in public_args(cfg).items() if isinstance(v, (int, float, str, bool))}


# --------------------------------------------------------------------------- command line

def run_training(cfg: TrainConfig) -> int:
    """Train and print a summary; a `UserError` rises to the entry point, which reports it."""
    result = train(cfg)
    if result.weights_dir is not None:
        print(f"Trained {result.global_step} steps ({result.skipped_steps} skipped). "
              f"Weights: {result.weights_dir}")
        if result.single_file:
            print(f"Single file: {result.single_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools train [flags]`: the same flags as train_dreambooth.py."""
    from dbtools.env import quiet_third_party

    args = parse_args(argv)
    quiet_third_party(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_training(TrainConfig.from_args(args))
