"""Everything a training run sets up before its first step.

Pre-flight checks (before any model loads), the accelerator, class images, models with
their trained/frozen parts, the data and prompt caches, optimizer, learning-rate
schedule, EMA and resume. `dbtools.train.loop.setup` calls these in this order.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dbtools.core import env
from dbtools.core.errors import UserError
from dbtools.dataset.concepts import Concept, ConceptError, overlap_problems
from dbtools.families import models as family_models
from dbtools.families.base import Components, ModelFamily
from dbtools.families.models import ModelLoadError, UnsupportedModelError, detect_family
from dbtools.families.profiles import fit_warning
from dbtools.families.prompts import truncation_note
from dbtools.train import classgen
from dbtools.train.checkpoints import (
    ARGS_FILE,
    RUN_FILES_DIR,
    check_checkpoint_files,
    checkpoint_step,
    resume_path,
    resume_problems,
)
from dbtools.train.classgen import (
    ClassGenConfig,
    ensure_class_images,
    pipeline_loader_for,
    plan_class_images,
)
from dbtools.train.config import (
    MAX_RESOLUTION,
    MAX_SEED,
    RESOLUTION_ADVICE,
    TrainConfig,
    flag_problems,
    largest_bucket_bytes,
    report_trackers,
    resolve_mixed_precision,
    view,
)
from dbtools.train.data import (
    DataConfig,
    DataPlan,
    DreamBoothData,
    LatentCache,
    concept_class_examples,
    scan_concepts,
    weights_key,
    with_validation,
)
from dbtools.train.folders import MiB, another_run_message, folder_problems, holds_another_run
from dbtools.train.prompt_store import PIPELINE, TRAINING, PromptStore, store_key

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

logger = logging.getLogger(__name__)


class TrainError(UserError):
    """Training cannot start or go on because of something the user can fix."""


# A size below this share of the family's native one trains a model that draws poorly at
# its own size (SDXL at 512 px): worth one warning line.
FAR_BELOW_NATIVE = 0.75


def with_native_resolution(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `resolution` set: the model family's native size when none was given
    (1024 for SDXL; 512 when the model cannot be read, which pre-flight then reports). A
    given size far below the native one gets one warning line."""
    try:
        detected = detect_family(cfg.pretrained_model_name_or_path, revision=cfg.revision)
    except UserError:
        return cfg if cfg.resolution is not None else dataclasses.replace(cfg, resolution=512)
    native = detected.resolution
    cfg = with_family_sample_settings(cfg, detected.family)
    if cfg.resolution is None:
        logger.info("resolution: %d px, the native size of %s (--resolution changes it)", native,
                    detected.family.label)
        return dataclasses.replace(cfg, resolution=native)
    if cfg.resolution < FAR_BELOW_NATIVE * native:
        logger.warning("--resolution %d is far below the %d px %s models are made for: samples at their "
                       "own size will look worse; leave --resolution out to train at %d px.",
                       cfg.resolution, native, detected.family.label, native)
    return cfg


def with_family_sample_settings(cfg: TrainConfig, family) -> TrainConfig:
    """Samples of a family that has its own sampling defaults (Flux: 28 steps, guidance 3.5, as
    its pipeline) take each of them whose flag (`--save_infer_steps`, `--save_guidance_scale`)
    is left at Shivam's default (20, 7.5)."""
    shivam, own = TrainConfig(), {"save_infer_steps": family.sample_steps, "save_guidance_scale": family.guidance_scale}
    changes = {k: v for k, v in own.items() if getattr(cfg, k) == getattr(shivam, k)}
    if not family.samples_at_own_defaults or not changes:
        return cfg
    logger.info("samples: %s, %s's own (the flags change them)", ", ".join(f"--{k} {v:g}" for k, v in changes.items()),
                family.label)
    return dataclasses.replace(cfg, **changes)


def preflight(cfg: TrainConfig) -> tuple[list[Concept], DataPlan]:
    """Check flags, model path, concepts, images and captions before loading any model.

    Raises one `TrainError` listing every problem with its fix; returns the concepts and
    the data plan otherwise.
    """
    problems = flag_problems(cfg)
    if cfg.pretrained_model_name_or_path:
        try:
            family_models.check_model_path(cfg.pretrained_model_name_or_path, skip=("vae",))
            problems += family_problems(cfg)
        except ModelLoadError as exc:
            problems.append(str(exc))
    concepts: list[Concept] = []
    plan = DataPlan([], [])
    if cfg.concepts_list or cfg.instance_data_dir:
        try:
            concepts = cfg.concepts()
        except ConceptError as exc:
            problems.append(str(exc))
    problems += overlap_problems(concepts, nested=False)  # as extract: a folder listed twice
    if concepts:
        plan, data_problems = data_plan(cfg, concepts)
        problems += data_problems
    problems += output_problems(cfg, concepts, plan)
    problems += resume_problems(cfg.output_dir, cfg.resume_from_checkpoint, lora=cfg.use_lora,
                                text_encoder=cfg.train_text_encoder, ema=cfg.use_ema)
    problems += bucket_memory_problems(cfg)
    problems += resume_change_problems(cfg)
    if problems:
        raise TrainError("\n".join(["Cannot start training. Fix these first:", *[f"- {p}" for p in problems]]))
    _warn_if_too_big(cfg)
    return concepts, plan


def family_problems(cfg: TrainConfig) -> list[str]:
    """The model's denoiser folder, and the settings its family cannot train with
    (`ModelFamily.training_problems`), before anything loads. A model that cannot be read
    here (a Hub id offline) is left to loading, which says why; a family we do not train
    is named."""
    try:
        family = detect_family(cfg.pretrained_model_name_or_path, revision=cfg.revision).family
    except UnsupportedModelError:
        raise
    except ModelLoadError:
        return []
    family_models.check_model_path(cfg.pretrained_model_name_or_path, (family.denoiser,))
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    problems = family.training_problems(cfg, classgen.native_bf16() if cuda else None)
    if cfg.quantize_base != "none" and not family.quantizable:
        problems.append(f"--quantize_base {cfg.quantize_base}: {family.label} models train from a full-precision base "
                        "(a quantized base is for the large flow transformers); leave --quantize_base unset.")
    return problems


def data_plan(cfg: TrainConfig, concepts: list[Concept], check_images: bool = True) -> tuple[DataPlan, list[str]]:
    """The examples of `concepts` with the held-out ones set apart, and what is wrong with them."""
    plan, problems = scan_concepts(
        concepts, read_prompts_from_txts=cfg.read_prompts_from_txts, prompt_template=cfg.prompt_template,
        with_prior_preservation=cfg.with_prior_preservation, output_dir=cfg.output_dir, check_images=check_images)
    plan, held_out_problems = with_validation(
        plan, concepts, validation_data_dir=cfg.validation_data_dir, validation_split=cfg.validation_split,
        seed=cfg.seed or 0, read_prompts_from_txts=cfg.read_prompts_from_txts, prompt_template=cfg.prompt_template)
    return plan, problems + held_out_problems


RANDOM_SEED = -1
"""`--seed -1`: draw a seed (logged and saved in args.json, so the run can be repeated)."""


def settle_seed(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with `--seed -1` replaced by the seed of the checkpoint it resumes (so the resume
    is exact), else by a freshly drawn one; any other seed as given."""
    if cfg.seed != RANDOM_SEED:
        return cfg
    import secrets

    saved = checkpoint_args(cfg)
    seed = saved.get("seed")
    if "seed" in saved and seed is None:
        return dataclasses.replace(cfg, seed=None)  # the checkpoint's run had no seed: nor has its resume
    if not isinstance(seed, int) or seed < 0:
        seed = secrets.randbelow(MAX_SEED + 1)
    return dataclasses.replace(cfg, seed=seed)


def agree_on_seed(cfg: TrainConfig, asked: int | None, accelerator, concepts: list[Concept],
                  plan: DataPlan) -> tuple[TrainConfig, DataPlan]:
    """Every process takes the main process's drawn seed; held-out images are chosen again with it."""
    if asked != RANDOM_SEED or accelerator.num_processes == 1:
        return cfg, plan
    from accelerate.utils import broadcast_object_list

    seed = broadcast_object_list([cfg.seed])[0]
    if seed == cfg.seed:
        return cfg, plan
    cfg = dataclasses.replace(cfg, seed=seed)
    return cfg, (data_plan(cfg, concepts, check_images=False)[0] if cfg.validation_split else plan)


def checkpoint_args(cfg: TrainConfig) -> dict:
    """The settings saved in the checkpoint `--resume_from_checkpoint` names ({} when none or unreadable)."""
    path = resume_path(cfg.output_dir, cfg.resume_from_checkpoint)
    try:
        data = json.loads((path / ARGS_FILE).read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# Settings that decide which model, which batches, which noise and which weights train:
# changing one between a checkpoint and its resume means the run no longer continues the
# interrupted one exactly. Learning-rate settings and the number of steps may change.
RESUME_SETTINGS = (
    "pretrained_model_name_or_path", "pretrained_vae_name_or_path", "revision", "variant", "tokenizer_name",
    "concepts_list", "instance_data_dir", "instance_prompt", "read_prompts_from_txts", "prompt_template",
    "with_prior_preservation", "class_data_dir", "class_prompt", "num_class_images", "validation_data_dir",
    "validation_split", "resolution", "center_crop", "hflip", "aspect_ratio_bucketing", "caption_dropout",
    "shuffle_captions", "keep_tokens", "train_batch_size", "gradient_accumulation_steps", "seed",
    "train_text_encoder", "use_lora", "lora_rank", "use_ema", "weighting_scheme", "logit_mean", "logit_std",
    "mode_scale", "guidance_scale", "max_sequence_length", "quantize_base")
_PATH_SETTINGS = ("pretrained_model_name_or_path", "pretrained_vae_name_or_path", "tokenizer_name", "concepts_list",
                  "instance_data_dir", "class_data_dir", "validation_data_dir")


def resume_changes(cfg: TrainConfig) -> list[str]:
    """Each of `RESUME_SETTINGS` (that matters for this run) whose value differs from the
    resumed checkpoint's args.json, as `--flag: <then> in the checkpoint, <now> now`."""
    saved = checkpoint_args(cfg)
    unused = set()
    if not (cfg.with_prior_preservation or saved.get("with_prior_preservation")):
        unused |= {"class_data_dir", "class_prompt", "num_class_images"}
    if cfg.read_prompts_from_txts and not cfg.prompt_template and saved.get("read_prompts_from_txts"):
        unused.add("instance_prompt")
    if not cfg.shuffle_captions:
        unused.add("keep_tokens")
    if not cfg.use_lora:
        unused.add("lora_rank")
    return [f"--{key}: {saved[key]!r} in the checkpoint, {getattr(cfg, key)!r} now" for key in RESUME_SETTINGS
            if key in saved and key not in unused and not _same_setting(key, saved[key], getattr(cfg, key))]


def _same_setting(key: str, then, now) -> bool:
    if key in _PATH_SETTINGS and isinstance(then, str) and isinstance(now, str) and then and now:
        return os.path.realpath(os.path.expanduser(then)) == os.path.realpath(os.path.expanduser(now))
    return then == now or (not then and not now)  # None, "" and False alike


def resume_change_problems(cfg: TrainConfig) -> list[str]:
    """Resuming with settings that break an exact resume: refused unless `--resume_with_changes`
    (then a warning naming them)."""
    changes = resume_changes(cfg) if resume_path(cfg.output_dir, cfg.resume_from_checkpoint) else []
    if not changes:
        return []
    where = resume_path(cfg.output_dir, cfg.resume_from_checkpoint)
    if cfg.resume_with_changes:
        logger.warning("resuming from %s with changed settings (--resume_with_changes): %s. The run will not "
                       "continue the interrupted one exactly.", where, "; ".join(changes))
        return []
    return [f"--resume_from_checkpoint: {where} was written with other settings, so the run would not continue it "
            f"exactly: {'; '.join(changes)}. Resume with the checkpoint's settings (its {ARGS_FILE}), or add "
            "--resume_with_changes to go on with the new ones."]


def _warn_if_too_big(cfg: TrainConfig) -> None:
    """Warn (never refuse: the estimate is rough) when the run is estimated not to fit the GPU."""
    gpu = env.gpu_memory_gib()
    if gpu is None:
        return
    try:
        family = detect_family(cfg.pretrained_model_name_or_path, revision=cfg.revision)
    except UserError:
        return  # the model loader reports what is wrong with it
    warning = fit_warning(family.family.key, dataclasses.asdict(cfg), gpu)
    if warning:
        logger.warning("%s", warning)


def bucket_memory_problems(cfg: TrainConfig) -> list[str]:
    """`--resolution` whose largest bucket cannot even be encoded in the memory of the device
    that trains (the GPU, or the machine's memory without one): refused before anything loads."""
    if not 8 <= cfg.resolution <= MAX_RESOLUTION:
        return []  # `flag_problems` names it
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    gpu = None if on_cpu else env.gpu_memory_gib()
    have, where = (gpu, "GPU") if gpu is not None else (env.ram_gib(), "memory")
    need = largest_bucket_bytes(cfg.resolution, cfg.mixed_precision in ("fp16", "bf16")) / 1024 ** 3
    if have is None or need <= have:
        return []
    return [f"--resolution {cfg.resolution}: one image of the largest bucket ({cfg.resolution}x{cfg.resolution} "
            f"pixels) needs at least {need:.1f} GiB to encode, more than this machine's {have:.1f} GiB of {where}. "
            f"Use a lower --resolution ({RESOLUTION_ADVICE})."]


def output_problems(cfg: TrainConfig, concepts: list[Concept], plan: DataPlan) -> list[str]:
    """Folders the run writes to that are files, unwritable, short of space, or hold another run."""
    model_bytes = local_model_bytes(cfg.pretrained_model_name_or_path)
    problems = folder_problems(cfg.output_dir, "--output_dir", max(model_bytes, 64 * MiB))
    problems += folder_problems(Path(cfg.output_dir, RUN_FILES_DIR, cfg.logging_dir), "--logging_dir", 16 * MiB)
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
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):  # component folders: tokenizers have no weights
        files = [f for f in sub.glob("*") if f.suffix in (".safetensors", ".bin")]
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


# Every process waits at a collective while the main one saves the final weights, exports
# the single file or uploads to the Hub; on a slow disk or link that takes far longer than
# torch's 10-minute default, which would kill the whole run.
PROCESS_GROUP_TIMEOUT_HOURS = 3


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An `Accelerator` with the usable mixed precision, Shivam's log folder and a long collective timeout."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    requested = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    precision, warning = usable_precision(requested, cuda)
    if warning:
        logger.warning(warning)
    project = ProjectConfiguration(project_dir=cfg.output_dir,
                                   logging_dir=str(Path(cfg.output_dir, RUN_FILES_DIR, cfg.logging_dir)))
    trackers = report_trackers(cfg.report_to)
    timeout = InitProcessGroupKwargs(timeout=timedelta(hours=PROCESS_GROUP_TIMEOUT_HOURS))
    return Accelerator(mixed_precision=precision, log_with=trackers or None, project_config=project,
                       cpu=not cuda and torch.cuda.is_available(), kwargs_handlers=[timeout])


def usable_precision(requested: str, cuda: bool) -> tuple[str, str | None]:
    """`resolve_mixed_precision`, asking the GPU about bf16 only when bf16 is requested."""
    return resolve_mixed_precision(requested, cuda, requested == "bf16" and cuda and classgen.native_bf16())


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    """Dtype for frozen modules: half under fp16/bf16 mixed precision, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_class_images(cfg: TrainConfig, concepts: list[Concept], accelerator) -> None:
    """Generate missing class images, shared out across the processes."""
    if not cfg.with_prior_preservation:
        return
    gen = view(ClassGenConfig, cfg, precision=cfg.prior_generation_precision,
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


def load_models(cfg: TrainConfig, weight_dtype: torch.dtype = torch.float32, only=None,
                straight_to=None) -> Components:
    """Tokenizer, text encoders, VAE, UNet and noise scheduler: weights that train in float32,
    frozen ones straight in `weight_dtype` (`frozen_dtypes`), so host memory never holds a
    float32 copy of what trains in half precision (SDXL in float32 is about 14 GB). `only`:
    a function of the family naming the components to load (None: all; see `before_denoiser`);
    `straight_to`, one giving the components read straight onto a device (`encoders_straight_to`)."""
    return family_models.load_sd_components(
        cfg.pretrained_model_name_or_path, vae_name_or_path=cfg.pretrained_vae_name_or_path,
        revision=cfg.revision, variant=cfg.variant, tokenizer_name=cfg.tokenizer_name,
        component_dtypes=lambda family: frozen_dtypes(cfg, weight_dtype, family),
        quantize=None if cfg.quantize_base == "none" else cfg.quantize_base, options=cfg,
        only=only, straight_to=straight_to)


def prompts_first(cfg: TrainConfig, family: ModelFamily) -> bool:
    """Whether the run encodes every prompt before its denoiser loads and then frees the text
    encoders (`ModelFamily.encoders_only_fill_the_cache`): frozen encoders whose prompts are
    cached, captions not shuffled (shuffled captions are encoded at each step)."""
    cached = not cfg.not_cache_latents or cfg.pre_compute_text_embeddings
    return (family.encoders_only_fill_the_cache() and cached and not cfg.train_text_encoder
            and not cfg.shuffle_captions)


def before_denoiser(cfg: TrainConfig, plan: DataPlan, weight_dtype: torch.dtype, pipeline_prompts: Iterable[str]):
    """`load_models`' `only` for the first load: all but the denoiser where `prompts_first`, and
    without the text encoders too when `--cache_dir` holds every prompt the run needs
    (`training_prompts` and `pipeline_prompts`)."""
    def parts(family: ModelFamily) -> list[str] | None:
        if not prompts_first(cfg, family):
            return None
        skip = {family.denoiser}
        store = prompt_store(cfg, family, weight_dtype)
        if store and store.holds(TRAINING, training_prompts(cfg, plan)) and store.holds(PIPELINE, pipeline_prompts):
            skip |= set(family.text_encoder_names)
        return [c for c in family.parts if c not in skip]

    return parts


def encoders_straight_to(cfg: TrainConfig, device):
    """`load_models`' `straight_to` for the first load: where `prompts_first`, the text encoders
    are read straight onto `device`, where they encode the prompts (T5-XXL is 9.5 GB in bf16:
    read onto the GPU tensor by tensor, host memory never holds it whole)."""
    return lambda family: dict.fromkeys(family.text_encoder_names, device) if prompts_first(cfg, family) else {}


def training_prompts(cfg: TrainConfig, plan: DataPlan) -> set[str]:
    """The prompts training steps and the held-out loss read: every example's, and caption
    dropout's empty prompt."""
    examples = (*plan.instance, *plan.classes, *plan.validation)
    return {e.prompt for e in examples} | ({""} if cfg.caption_dropout else set())


def prompt_store(cfg: TrainConfig, family: ModelFamily, weight_dtype: torch.dtype) -> PromptStore | None:
    """Where `--cache_dir` keeps the run's prompt encodings, keyed on the text encoders' and
    tokenizers' files, the model, the dtype and the prompt length; None without `--cache_dir`."""
    if not cfg.cache_dir:
        return None
    name = cfg.pretrained_model_name_or_path
    files = [f for sub in family.text_encoder_names + family.tokenizer_names
             for f in model_files(name, sub, cfg.revision, suffixes=None)]
    return PromptStore(Path(cfg.cache_dir) / "prompts", store_key(
        files, family.key, name, cfg.revision, cfg.variant, cfg.tokenizer_name, weight_dtype, cfg.max_sequence_length))


def cache_prompts_first(cfg: TrainConfig, models: Components, data: DreamBoothData, plan: DataPlan, accelerator,
                        weight_dtype: torch.dtype, pipeline_prompts: Iterable[str]):
    """For models loaded without their denoiser (`before_denoiser`): every prompt of the run
    (its captions, dropout's empty prompt, class and held-out prompts; and `pipeline_prompts`,
    the sample, validation and score prompts, as the pipeline encodes them) read from
    `--cache_dir` or encoded with the text encoders alone on the device; then the encoders
    are freed (device and host memory) and only then the denoiser loads. Returns the prompt
    encoder (its `cache` and `for_pipeline`) and the models with the denoiser and without the
    text encoders."""
    family = models.family
    store = prompt_store(cfg, family, weight_dtype)
    pipeline_prompts = sorted(pipeline_prompts)
    for encoder in models.text_encoders:
        encoder.requires_grad_(False)
        move_module(encoder, accelerator.device, weight_dtype)
    # 8 prompts at a time: T5-XXL's attention keeps a few copies of its 64 x 512 x 512 scores per
    # prompt (about 128 MiB in bf16): 1 GiB for 8 prompts, 8 GiB for 64.
    prompts = make_prompt_encoder(cfg, models, data, accelerator, also={e.prompt for e in plan.validation},
                                  stored=store.load(TRAINING, training_prompts(cfg, plan)) if store else {}, chunk=8)
    if store:
        prompts.for_pipeline.update(store.load(PIPELINE, pipeline_prompts))
    family.cache_pipeline_prompts(prompts, pipeline_prompts, models.text_encoders)
    if store and accelerator.is_main_process:
        written = store.save(TRAINING, prompts.cache) + store.save(PIPELINE, prompts.for_pipeline)
        logger.info("prompts: %d encoded into %s", written, store.folder)
    models = models.replace(**dict.fromkeys(family.text_encoder_names))  # nothing else holds them
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("prompts: %d cached; text encoders freed before the %s loads", len(prompts.cache), family.denoiser)
    denoiser = load_models(cfg, weight_dtype, only=lambda _: [family.denoiser]).denoiser
    return prompts, models.replace(**{family.denoiser: denoiser})


def frozen_dtypes(cfg: TrainConfig, weight_dtype: torch.dtype, family: ModelFamily) -> dict[str, torch.dtype]:
    """The components of `family` loaded in `weight_dtype` because their weights stay frozen: a
    LoRA run's denoiser and text encoders (the adapters, added later, are float32), a full
    fine-tune's text encoders unless they train. The VAE loads in float32 (small, and it may
    have to stay so: `vae_dtype`)."""
    encoders_frozen = cfg.use_lora or not cfg.train_text_encoder
    return {**({family.denoiser: weight_dtype} if cfg.use_lora else {}),
            **(dict.fromkeys(family.text_encoder_names, weight_dtype) if encoders_frozen else {})}


def prepare_modules(cfg: TrainConfig, models, accelerator, weight_dtype) -> list:
    """Freeze what is not trained, add LoRA adapters, enable memory savers; return trainable params."""
    _freeze_and_place(cfg, models, accelerator.device, weight_dtype)
    _enable_memory_savers(cfg, models)
    modules = [models.denoiser] + (models.text_encoders if cfg.train_text_encoder else [])
    for m in modules:
        m.train()
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def _freeze_and_place(cfg: TrainConfig, models, device, weight_dtype) -> None:
    """Frozen modules go to `device` in `weight_dtype` (a VAE that overflows in half
    precision stays float32); trained weights (or LoRA adapters) stay float32."""
    models.vae.requires_grad_(False)
    # With cached latents the VAE is needed only for samples and saves, which bring it in.
    move_module(models.vae, device if cfg.not_cache_latents else "cpu", vae_dtype(models.vae, weight_dtype))
    train_te = cfg.train_text_encoder
    encoders = models.text_encoders
    if cfg.use_lora:
        _add_lora(cfg, models)
    else:
        models.denoiser.requires_grad_(True)
        for encoder in encoders:
            encoder.requires_grad_(train_te)
        for part in unused_text_parts(models):
            part.requires_grad_(False)
    if not train_te:
        for encoder in encoders:
            move_module(encoder, device, weight_dtype)
    if cfg.use_lora and weight_dtype != torch.float32:
        # Frozen base weights in half precision, trainable adapters in float32.
        move_module(models.denoiser, device, weight_dtype)
        if train_te:
            for encoder in encoders:
                move_module(encoder, device, weight_dtype)
        from diffusers.training_utils import cast_training_params

        cast_training_params([models.denoiser] + (encoders if train_te else []), dtype=torch.float32)


def vae_dtype(vae, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype: `weight_dtype`, but float32 for a VAE whose config says it overflows
    in half precision (`force_upcast`: SDXL's own VAE; the fp16-fix VAE does not)."""
    return torch.float32 if getattr(vae.config, "force_upcast", False) else weight_dtype


def _enable_memory_savers(cfg: TrainConfig, models) -> None:
    """Gradient checkpointing, xformers attention and TF32, as asked."""
    if cfg.gradient_checkpointing:
        models.denoiser.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for encoder in models.text_encoders:
                _checkpoint_text_encoder(encoder)
    if cfg.enable_xformers_memory_efficient_attention:
        _try_xformers(models.denoiser)
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

    family = models.family
    models.denoiser.requires_grad_(False)
    for encoder in models.text_encoders:
        encoder.requires_grad_(False)
    models.denoiser.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                           target_modules=family.lora_targets(family.denoiser, models.denoiser)))
    if cfg.train_text_encoder:
        from peft import inject_adapter_in_model

        # peft directly: transformers' own `add_adapter` may demand a newer peft.
        for name in family.text_encoder_names:
            encoder = models.parts[name]
            inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                               target_modules=family.lora_targets(name, encoder)), encoder)


def unused_text_parts(models) -> list[torch.nn.Module]:
    """Text encoder parts whose output never reaches the loss, so they must not train
    (`ModelFamily.unused_parts`: SDXL's first encoder's last layer and final norm). Trained,
    they get no gradient (data-parallel training stops at its second step waiting for it)
    and their LoRA adapters would be saved as zeros."""
    family = models.family
    return [part for name in family.text_encoder_names if models.parts.get(name) is not None
            for part in family.unused_parts(name, models.parts[name])]


def make_data(cfg: TrainConfig, plan: DataPlan, models, accelerator, weight_dtype) -> DreamBoothData:
    """The dataset, with VAE latents cached unless `--not_cache_latents`."""
    vae = models.vae
    step = models.family.size_step(vae, models.parts.get(models.family.denoiser))
    dcfg = view(DataConfig, cfg, bucket_step=step, seed=cfg.seed or 0)
    cache = None
    if not cfg.not_cache_latents:
        key = weights_key(vae_weight_files(cfg), vae.config, cfg.pretrained_model_name_or_path,
                          cfg.pretrained_vae_name_or_path, cfg.revision, cfg.variant)
        cache = LatentCache(key, cfg.cache_dir)
    data = DreamBoothData(plan, dcfg, cache)
    if cache is not None:
        flips = (False, True) if cfg.hflip else (False,)
        _fill_latent_cache(cache, data.all_items(), flips, vae, accelerator, vae_dtype(vae, weight_dtype))
        logger.info("latents: %d encoded, %d read from %s", cache.encoded, cache.read_from_disk,
                    cfg.cache_dir or "memory")
    return data


def _fill_latent_cache(cache: LatentCache, items, flips, vae, accelerator, dtype) -> None:
    """Encode the latents with the VAE alone on the device (call before the UNet and the text
    encoders go there), one image at a time (VAE slicing), so caching never needs more memory
    than a training step. Each process encodes its share; then they exchange them."""
    move_module(vae, accelerator.device, dtype)
    vae.enable_slicing()
    try:
        cache.fill(items, flips, lambda px: _vae_stats(vae, px, accelerator.device, dtype),
                   progress=accelerator.is_local_main_process, rank=accelerator.process_index,
                   world=accelerator.num_processes)
    finally:
        vae.disable_slicing()
        vae.to("cpu")  # back for samples and saves (`_for_inference`)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        cache.add_shared(gather_object(cache.own_share()))


def vae_weight_files(cfg: TrainConfig) -> list[Path]:
    """The files holding the VAE's weights (local paths, or the Hub cache's copies); [] if unknown."""
    name = cfg.pretrained_vae_name_or_path or cfg.pretrained_model_name_or_path
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        sub = "" if (path / "config.json").is_file() else "vae"
    else:
        sub = "" if cfg.pretrained_vae_name_or_path else "vae"
    return model_files(name, sub, cfg.revision)


def model_files(name: str, sub: str, revision: str | None,
                suffixes: tuple[str, ...] | None = (".safetensors", ".bin")) -> list[Path]:
    """The files of component folder `sub` ("": the model's own folder) of a local model or
    single file, or the Hub cache's copies of `name`'s, ending in `suffixes` (None: all); []
    if unknown."""
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return [path]

    def kept(folder: Path) -> list[Path]:
        return sorted(f for f in folder.glob("*") if f.is_file() and (suffixes is None or f.suffix in suffixes))

    if path.is_dir():
        return kept(path / sub)
    try:  # a Hub id: the cached snapshot's files (their folder name is the commit)
        from huggingface_hub import snapshot_download

        prefix = f"{sub}/" if sub else ""
        patterns = [f"{prefix}*"] if suffixes is None else [f"{prefix}*{s}" for s in suffixes]
        snap = Path(snapshot_download(name, revision=revision if revision != "fp16" else None,
                                      allow_patterns=patterns, local_files_only=True))
        return kept(snap / sub)
    except Exception:  # not in the local cache under this name: the ids and the config still key it
        return []


def _vae_stats(vae, pixels, device, dtype):
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(pixels).to(device, dtype=dtype)).latent_dist
    return dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()


def make_prompt_encoder(cfg: TrainConfig, models, data: DreamBoothData, accelerator, also: Iterable[str] = (),
                        stored: dict | None = None, chunk: int = 64):
    """The family's prompt encoder (`ModelFamily.prompt_encoder`); embeddings are cached
    when the text encoders are frozen (the training prompts and `also`, `chunk` at a time;
    those in `stored`, read from disk, are not encoded again)."""
    if accelerator.is_main_process:
        _note_cut_captions(cfg, models.tokenizer, data)
    cache = not cfg.train_text_encoder and (not cfg.not_cache_latents or cfg.pre_compute_text_embeddings)
    enc = models.family.prompt_encoder(models.tokenizers, cache=cache, pad_tokens=cfg.pad_tokens,
                                       max_length=cfg.tokenizer_max_length,
                                       use_attention_mask=cfg.text_encoder_use_attention_mask)
    if cache:
        enc.cache.update(stored or {})
        prompts = {"" if cfg.caption_dropout else None, *also}
        if not cfg.shuffle_captions:
            prompts |= {it.example.prompt for it in data.all_items()}
        prompts = sorted(prompts - {None})
        for k in range(0, len(prompts), chunk):
            models.family.encode_prompts(enc, prompts[k:k + chunk], models.text_encoders, accelerator.device)
        # Shuffled captions almost never repeat: caching them would only fill GPU memory
        # (about 110 KiB per prompt for SD 1.5 in fp16, a step at a time).
        enc.grow = not cfg.shuffle_captions
    return enc


def _note_cut_captions(cfg: TrainConfig, tokenizer, data: DreamBoothData) -> None:
    """Say once per run how many training prompts the text encoder cuts short, and by how much."""
    captions: dict[str, str] = {}
    for item in data.all_items():
        captions.setdefault(item.example.prompt, f"the prompt of {item.example.path}")
    max_length = cfg.tokenizer_max_length or tokenizer.model_max_length
    note = truncation_note(captions, tokenizer, max_length) if captions else None
    if note:
        logger.warning("%s", note)


def offload_cached(cfg: TrainConfig, models, prompts) -> None:
    """Frozen modules whose outputs are all cached leave the GPU until sampling time (all text
    encoders, when the family allows it: what lets SDXL LoRA fit a 16 GB GPU)."""
    if not cfg.not_cache_latents:
        models.vae.to("cpu")
    if prompts.cache is not None and not cfg.shuffle_captions and models.family.text_encoders_may_leave():
        for encoder in models.text_encoders:
            encoder.to("cpu")


def total_steps(cfg: TrainConfig, batches_per_epoch: int, num_processes: int) -> int:
    """`max_train_steps`, or epochs x optimizer steps per epoch."""
    if cfg.max_train_steps:
        return cfg.max_train_steps
    per_epoch = math.ceil(batches_per_epoch / (num_processes * cfg.gradient_accumulation_steps))
    return cfg.num_train_epochs * max(1, per_epoch)


def make_optimizer(cfg: TrainConfig, params: list, device):
    """AdamW, or bitsandbytes' 8-bit AdamW when asked and it runs on `device` (else AdamW +
    warning), or transformers' Adafactor at the fixed `--learning_rate` (the schedule still
    applies; no relative step sizes)."""
    if cfg.use_adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.adam_weight_decay)
    cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        cls = _adamw_8bit(device) or cls
    return cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
               weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def _adamw_8bit(device):
    """bitsandbytes' AdamW8bit if one step runs on `device` here, else None (with a warning)."""
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


def make_lr_scheduler(cfg: TrainConfig, optimizer, max_train_steps: int, num_processes: int):
    """diffusers' schedulers; counts are per process as accelerate steps them once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer=optimizer, step_rules=cfg.lr_step_rules,
                         num_warmup_steps=cfg.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes,
                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def make_ema(cfg: TrainConfig, models: Components, accelerator: Accelerator) -> EMAModel | None:
    """The denoiser's EMA on the main process only: only it saves weights, so the other ranks
    would keep (and step) a full fp32 copy of the denoiser for nothing."""
    if not cfg.use_ema or not accelerator.is_main_process:
        return None
    from diffusers.training_utils import EMAModel

    # foreach: one fused update over all tensors per step instead of a few kernels per tensor.
    denoiser = models.denoiser
    ema = EMAModel(denoiser.parameters(), decay=cfg.ema_decay, model_cls=type(denoiser),
                   model_config=denoiser.config, foreach=True)
    ema.to(accelerator.device)
    return ema


def resume(cfg: TrainConfig, accelerator: Accelerator) -> tuple[int, Path | None]:
    """Load accelerate state from the chosen checkpoint; return the step to continue from
    and the checkpoint folder (0 and None for a new run)."""
    path = resume_path(cfg.output_dir, cfg.resume_from_checkpoint)
    if path is None:
        if cfg.resume_from_checkpoint:
            logger.info("no complete checkpoint in %s: starting a new run", cfg.output_dir)
        return 0, None
    logger.info("resuming from %s", path)
    check_checkpoint_files(path)  # checked in pre-flight too; the folder may have changed since
    accelerator.load_state(str(path))
    return checkpoint_step(path), path


def run_config(cfg: TrainConfig, num_processes: int) -> TrainConfig:
    """The run's own copy of `cfg` with the effective learning rate (`--scale_lr` multiplies
    it by accumulation x batch size x processes, as Shivam's script does; args.json shows it)."""
    if not cfg.scale_lr:
        return cfg
    scale = cfg.gradient_accumulation_steps * cfg.train_batch_size * num_processes
    return dataclasses.replace(cfg, learning_rate=cfg.learning_rate * scale)


def move_module(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)`, casting only when the dtype really changes."""
    if next(module.parameters()).dtype != dtype:
        if getattr(module, "_keep_in_fp32_modules", None):
            module.to(dtype=dtype)
        else:
            # diffusers' `ModelMixin.to` logs "modules ... should be kept in float32" at every
            # cast, even for models that keep none in float32 (the VAE, the UNet); only a model
            # that names such modules needs its handling.
            torch.nn.Module.to(module, dtype=dtype)
    module.to(device)
