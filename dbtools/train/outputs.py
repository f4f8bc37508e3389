"""What a training run writes: weights folders with sample images, validation images,
the held-out validation loss and the scores of each save (`metrics.jsonl`), accelerate
checkpoints and the Hub upload.

Samples are made by `dbtools.after.generate.generate`, one image per pipeline call, and each PNG
stores its settings as `generate` stores them, so `python -m dbtools generate --model
<output_dir>/<step> --from_png <output_dir>/<step>/samples/0.png` makes the same image.

Every folder is built under a temporary name and renamed when complete (`atomic_dir`),
so a crash never leaves a half-written folder that looks finished. Only the main
process calls these.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dbtools.after import evaluate, export
from dbtools.after import generate as generation
from dbtools.after.evaluate import EvalConfig, SaveScorer, refresh_summary, training_plan
from dbtools.after.generate import Generated, save_image
from dbtools.after.kohya import kohya_metadata, write_kohya_lora
from dbtools.core.atomic import atomic_dir, atomic_write_text
from dbtools.core.redact import public_settings
from dbtools.families.base import Components, Conditioning
from dbtools.families.models import make_scheduler
from dbtools.train.checkpoints import CHECKPOINT_PREFIX, SINGLE_FILE_NAME, ui_lora_name, weights_due, write_checkpoint
from dbtools.train.config import TrainConfig, view
from dbtools.train.data import DataPlan, Item, item_time_ids, load_item
from dbtools.train.folders import human_size, nearest_existing
from dbtools.train.metrics import append_metrics
from dbtools.train.run import Run
from dbtools.train.setup import TrainError, move_module, vae_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline
    from PIL.Image import Image

logger = logging.getLogger(__name__)


def periodic_saves(run: Run, step: int) -> None:
    """Checkpoint, weights and validation images due at `step` (main process; the others
    wait, and only at a step where something is due: every process knows which those are)."""
    due = saves_due(run.cfg, step, last=step == run.max_train_steps, held_out=run.held_out is not None)
    if not due:
        return
    with disk_full_message(run):
        if run.accelerator.is_main_process:
            _write_due(run, step, due)
    run.accelerator.wait_for_everyone()


def saves_due(cfg: TrainConfig, step: int, last: bool, held_out: bool) -> list[str]:
    """What is written at `step`, in order: "validation_loss", "checkpoint", "weights",
    "validation_images" (the final weights are saved by `finish`, not here)."""
    validating = step % cfg.validation_steps == 0
    due = {"validation_loss": held_out and validating,
           "checkpoint": bool(cfg.checkpointing_steps) and step % cfg.checkpointing_steps == 0,
           "weights": should_save(step, cfg) and not last,
           "validation_images": bool(cfg.validation_prompt) and validating}
    return [name for name, yes in due.items() if yes]


def _write_due(run: Run, step: int, due: list[str]) -> None:
    writers = {"validation_loss": log_validation_loss, "checkpoint": save_checkpoint, "weights": save_weights,
               "validation_images": save_validation}
    for name in due:
        writers[name](run, step)


def should_save(step: int, cfg: TrainConfig) -> bool:
    """Shivam's rule: weights every `save_interval` steps once `save_min_steps` is reached."""
    return weights_due(step, cfg.save_interval, cfg.save_min_steps)


def save_weights(run: Run, step: int, final: bool = False) -> Path:
    """Write `<output_dir>/<step>/` (weights, args.json, samples) atomically; main process only.

    With `--output_layout diffusers` the final weights go into `output_dir` itself instead
    (`from_pretrained(output_dir)` loads them, as with diffusers' script).
    """
    cfg = run.cfg
    if final and cfg.output_layout == "diffusers":
        return _save_final_in_place(run, step)
    target = Path(cfg.output_dir) / str(step)
    samples: list[Generated] = []
    with atomic_dir(target) as tmp:
        with _for_inference(run):
            pipe = build_pipeline(run)
            if cfg.use_lora:
                save_lora(tmp, run.accelerator, run.models, cfg.train_text_encoder)
                save_ui_lora(run, tmp, step)
            else:
                _save_pipeline(pipe, tmp, skip_text_encoder=final and cfg.skip_save_text_encoder)
            atomic_write_text(tmp / "args.json", json.dumps(public_settings(cfg), indent=2))
            if cfg.save_sample_prompt:
                samples = sample_images(pipe, cfg.save_sample_prompt, cfg.n_save_sample, cfg, run.seed,
                                        cfg.save_sample_negative_prompt)
                for i, sample in enumerate(samples):
                    sample.settings["model"] = str(target)
                    save_image(sample, tmp / "samples" / f"{i}.png")
            del pipe
        if final and cfg.save_single_file and not cfg.use_lora:  # a LoRA folder has its UI file already
            # The export reads the saved folder, so it runs after the float32 VAE and text
            # encoder have left the GPU and the EMA's copy of the trained weights is gone.

            export.export_single_file(tmp, tmp / SINGLE_FILE_NAME)
    logger.info("[*] weights saved at %s", target)
    if run.held_out is not None and run.held_out.last_step != step:
        log_validation_loss(run, step)  # the best-step rule reads the loss of each saved step
    if run.scorer is not None:
        score_save(run, step, [s.image for s in samples])  # after the folder is complete: a failure keeps it
    return target


def _save_pipeline(pipe: DiffusionPipeline, folder: Path, skip_text_encoder: bool = False) -> None:
    """`save_pretrained` in safetensors; without the text encoder when asked (diffusers'
    `--skip_save_text_encoder`: the base model's is given back when loading)."""
    if skip_text_encoder:
        encoders = [n for n in pipe.components if n.startswith("text_encoder")]
        pipe = type(pipe)(**{**pipe.components, **dict.fromkeys(encoders)})
    with _float32_on_cpu([m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]):
        pipe.save_pretrained(folder, safe_serialization=True)


@contextlib.contextmanager
def _float32_on_cpu(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Half-precision (frozen) modules in float32 on the CPU for the duration, so a saved
    pipeline is float32 throughout (as `from_pretrained` without a dtype expects) without
    a float32 copy on the GPU; then back where they were."""
    half = [(m, next(m.parameters()).device, next(m.parameters()).dtype) for m in modules
            if next(m.parameters()).dtype in (torch.float16, torch.bfloat16)]
    for m, _, _ in half:
        m.to("cpu")  # first, so the float32 copy is made in host memory
        move_module(m, "cpu", torch.float32)
    try:
        yield
    finally:
        for m, device, dtype in half:
            move_module(m, device, dtype)


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


def build_pipeline(run: Run) -> DiffusionPipeline:
    """The family's pipeline from the models being trained (unwrapped), with the family's
    sampler (`ModelFamily.build_pipeline`)."""
    acc, models = run.accelerator, run.models
    modules = {name: acc.unwrap_model(m) if isinstance(m, torch.nn.Module) else m for name, m in models.parts.items()}
    pipe = models.family.build_pipeline(modules, models.noise_scheduler)
    if models.family.text_encoder_names and not models.text_encoders:  # freed once every prompt was cached
        models.family.read_cached_prompts(pipe, run.prompts)
    return pipe


@contextlib.contextmanager
def _for_inference(run: Run) -> Iterator[None]:
    """Frozen modules on the device, EMA weights swapped in, the accelerator's autocast on;
    all undone afterwards.

    Frozen text encoders stay in the training dtype and the VAE in the dtype its config
    allows (`vae_dtype`: float32 only for a VAE that overflows in half precision, which then
    also runs outside autocast); the VAE encodes and decodes one image at a time (slicing).
    On a CPU in float32 nothing changes, so samples equal what `generate` makes.
    """
    device, vae = run.accelerator.device, run.models.vae
    frozen = [(vae, vae_dtype(vae, run.weight_dtype))]
    frozen += [] if run.cfg.train_text_encoder else [(e, run.weight_dtype) for e in run.models.text_encoders]
    before = [(m, next(m.parameters()).device, next(m.parameters()).dtype) for m, _ in frozen]
    for m, dtype in frozen:
        move_module(m, device, dtype)
    params = list(run.accelerator.unwrap_model(run.models.denoiser).parameters())
    if run.ema is not None:
        run.ema.store(params)
        run.ema.copy_to(params)
    vae.enable_slicing()
    try:
        with _vae_in_own_dtype(vae), run.accelerator.autocast():
            yield
    finally:
        vae.disable_slicing()
        if run.ema is not None:
            run.ema.restore(params)
        for m, dev, dtype in before:
            move_module(m, dev, dtype)


@contextlib.contextmanager
def _vae_in_own_dtype(vae) -> Iterator[None]:
    """The VAE's `encode` and `decode` take inputs in its own dtype and run outside autocast
    (which would run a float32 VAE's convolutions in half precision, where it overflows)."""
    originals = {name: getattr(vae, name) for name in ("encode", "decode")}

    def wrap(method):
        def call(x, *args, **kwargs):
            with torch.autocast(x.device.type, enabled=False):
                return method(x.to(vae.dtype), *args, **kwargs)
        return call

    for name, method in originals.items():
        setattr(vae, name, wrap(method))
    try:
        yield
    finally:
        for name in originals:
            delattr(vae, name)  # the class's methods again


def sample_images(pipe: DiffusionPipeline, prompt: str, n: int, cfg: TrainConfig, seed: int,
                  negative: str | None = None) -> list[Generated]:
    """`n` images of `prompt` on the seeds `seed`, `seed + 1`, ... with their settings.

    Made by `dbtools.after.generate.generate`, one image per pipeline call (as `generate
    --from_png` makes one again): the same scheduler config, generator device and dtypes,
    so the saved weights reproduce each sample pixel for pixel on a CPU in float32.
    """
    if n < 1:
        return []
    pipe.set_progress_bar_config(disable=True)
    return generation.generate(pipe, prompt, negative or "", n, cfg.save_guidance_scale, cfg.save_infer_steps,
                               cfg.resolution, cfg.resolution, seed, batch_size=1)


def lora_state_dict(model, adapter: str = "default") -> dict:
    """The LoRA tensors of `model` with peft's key names (adapter name removed)."""
    marker = f".{adapter}."
    return {k.replace(marker, "."): v for k, v in model.state_dict().items() if "lora_" in k}


def save_lora(folder: Path, accelerator: Accelerator, models: Components, train_text_encoder: bool) -> None:
    """The LoRA adapters of the denoiser (and the text encoders when trained) in diffusers' file
    layout: `pytorch_lora_weights.safetensors`, which `load_lora_weights` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    family = models.family
    layers = {family.denoiser: convert_state_dict_to_diffusers(
        get_peft_model_state_dict(accelerator.unwrap_model(models.denoiser)))}
    for name in family.text_encoder_names:
        encoder = models.parts.get(name)
        layers[name] = convert_state_dict_to_diffusers(lora_state_dict(accelerator.unwrap_model(encoder))) \
            if train_text_encoder and encoder is not None else None
    family.save_lora(str(folder), layers)


def output_name(cfg: TrainConfig) -> str:
    """The run's name in the web UIs: `--output_name`, else the output folder's name."""
    return cfg.output_name or Path(cfg.output_dir).resolve().name


def save_ui_lora(run: Run, folder: Path, step: int) -> Path:
    """Write the LoRA in `folder` (just saved by `save_lora`) as the kohya-style file with kohya's
    metadata that AUTOMATIC1111, Forge and ComfyUI load: `<output name>-<step>-lora.safetensors`."""
    cfg, models, unwrap = run.cfg, run.models, run.accelerator.unwrap_model
    family = models.family
    alphas = {name: _lora_alpha(unwrap(models.parts[name]), cfg.lora_rank)
              for name in (family.denoiser, *family.text_encoder_names) if models.parts.get(name) is not None}
    name = ui_lora_name(output_name(cfg), step)
    meta = kohya_metadata(family, cfg.lora_rank, alphas[family.denoiser], name[: -len(".safetensors")],
                          v_prediction=models.prediction_type == "v_prediction", resolution=cfg.resolution,
                          steps=step, args=public_settings(cfg))
    return write_kohya_lora(folder, folder / name, alpha=alphas, metadata=meta, family=family)


def _lora_alpha(model, default: float) -> float:
    """The `lora_alpha` peft gave `model`'s adapters (`default` when it has no peft config)."""
    config = (getattr(model, "peft_config", None) or {}).get("default")
    return getattr(config, "lora_alpha", default)


def save_validation(run: Run, step: int) -> None:
    """diffusers-style validation images: `<output_dir>/validation/<step>/<i>.png` and TensorBoard."""
    cfg = run.cfg
    with atomic_dir(Path(cfg.output_dir) / "validation" / str(step)) as tmp, _for_inference(run):
        pipe = build_pipeline(run)
        if cfg.validation_scheduler:
            pipe.scheduler = make_scheduler(cfg.validation_scheduler, pipe.scheduler.config)
        images = sample_images(pipe, cfg.validation_prompt, cfg.num_validation_images, cfg, run.seed)
        for i, img in enumerate(images):
            save_image(img, tmp / f"{i}.png")
        images = [g.image for g in images]
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")


# --------------------------------------------------------------------------- held-out loss and scores


class HeldOut:
    """The held-out images for the validation loss (never in a training batch).

    Their latents are encoded once, from the VAE's mean (a few images at a time), so the
    loss does not depend on a random latent sample; their prompts are encoded at each use,
    since the text encoder may be training.
    """

    def __init__(self, items: list[Item]):
        self.items = items
        self.groups: list[tuple[torch.Tensor, list[str], Conditioning]] | None = None
        self.last_step: int | None = None

    def loss(self, run: Run) -> float:
        """The mean validation loss over the held-out images (`evaluate.validation_loss`:
        fixed timesteps, fixed noise seeded by the run's seed); call under `_for_inference`."""
        acc, device, family = run.accelerator, run.accelerator.device, run.models.family
        denoiser = acc.unwrap_model(run.models.denoiser)
        encoders = [acc.unwrap_model(e) for e in run.models.text_encoders]
        total = 0.0
        for latents, prompts, image_cond in self._latents(run):
            with torch.no_grad(), acc.autocast():
                cond = family.encode_prompts(run.prompts, prompts, encoders, device).merged(image_cond)
                total += evaluate.validation_loss(denoiser, latents.to(device), cond, run.models.noise_scheduler,
                                                  family=family, seed=run.seed) * len(prompts)
        return total / len(self.items)

    def _latents(self, run: Run) -> list[tuple[torch.Tensor, list[str], Conditioning]]:
        """Latents as the denoiser sees them, prompts and the family's image conditioning (SDXL's
        time ids), one group per image size (buckets), encoded once."""
        if self.groups is None:
            vae, device, family = run.models.vae, run.accelerator.device, run.models.family
            by_size: dict[tuple[int, int], list[Item]] = {}
            for item in self.items:
                by_size.setdefault(item.size, []).append(item)
            self.groups = []
            for items in by_size.values():
                mean = torch.cat([self._encode(vae, chunk, device) for chunk in _chunks(items, HELD_OUT_CHUNK)])
                time_ids = np.array([item_time_ids(it, False) for it in items], dtype=np.float32)
                self.groups.append((family.latents(mean, vae).float().cpu(), [it.example.prompt for it in items],
                                    family.image_conditioning({"time_ids": time_ids})))
        return self.groups

    @staticmethod
    def _encode(vae, items: list[Item], device) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack([load_item(it, False) for it in items]))
        with torch.no_grad():
            return vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float()


HELD_OUT_CHUNK = 4
"""Held-out images encoded per VAE call: all of them at once would hold every image's activations."""


def _chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def log_validation_loss(run: Run, step: int) -> float:
    """The held-out loss at `step`, to the trackers and `<output_dir>/metrics.jsonl`."""
    with _for_inference(run):
        loss = run.held_out.loss(run)
    run.held_out.last_step = step
    run.accelerator.log({"validation_loss": loss}, step=step)
    append_metrics(run.cfg.output_dir, {"step": step, "validation_loss": loss})
    if run.scorer is not None:
        refresh_summary(run.cfg.output_dir, run.cfg.best_step_tolerance, drift_tolerance=run.cfg.drift_tolerance)
    logger.info("step %d: validation loss %.6f", step, loss)
    return loss


def make_scorer(cfg: TrainConfig, plan: DataPlan, accelerator: Accelerator) -> SaveScorer | None:
    """With `--score_saves`, the score models (loaded once, main process only) and what to score:
    likeness against the instance images trained on, prompt fidelity of the eval prompts, and
    class drift from the run's class prompts."""
    if not cfg.score_saves or not accelerator.is_main_process:
        return None
    ecfg = view(EvalConfig, cfg, eval_prompts=list(cfg.eval_prompts or []), num_samples=cfg.eval_num_samples,
                seed=1337 if cfg.seed is None else cfg.seed, tolerance=cfg.best_step_tolerance)
    return SaveScorer.load(ecfg, score_plan(cfg, plan))


def score_plan(cfg: TrainConfig, plan: DataPlan):
    """What `--score_saves` scores at each save (`evaluate.training_plan`)."""
    prompt = cfg.save_sample_prompt or cfg.instance_prompt or ""
    return training_plan(prompt, cfg.eval_prompts, [e.path for e in plan.instance], cfg.save_infer_steps,
                         cfg.save_guidance_scale, cfg.resolution, [c.class_prompt for c in cfg.concepts()])


def output_prompts(cfg: TrainConfig, plan: DataPlan) -> set[str]:
    """The prompts a run's pipeline generates from: the sample and validation prompts, those
    `--score_saves` generates, and the empty prompt (classifier-free guidance's default negative)."""
    prompts = {p for p in (cfg.save_sample_prompt, cfg.save_sample_negative_prompt, cfg.validation_prompt) if p}
    prompts.add("")
    if cfg.score_saves:
        scored = score_plan(cfg, plan)
        prompts |= {*scored.eval_prompts, *scored.class_prompts}
    return prompts


def score_save(run: Run, step: int, samples: list[Image]) -> dict:
    """Score the weights just saved at `step` (EMA weights, as saved) and update the metrics files."""
    with _for_inference(run):
        return run.scorer.score(step, build_pipeline(run), samples, run.accelerator.device)


def save_checkpoint(run: Run, step: int) -> Path:
    """Accelerate state in `<output_dir>/checkpoint-<step>/`, atomically; then rotate old ones."""
    return write_checkpoint(run.accelerator, run.cfg.output_dir, step, run.cfg.checkpoints_total_limit,
                            args=public_settings(run.cfg))


def save_at_stop(run: Run, step: int) -> tuple[Path | None, Path | None]:
    """The clean stop's saves at `step` (every process calls this): a complete weights folder
    and a resume checkpoint, unless the periodic saves of that step made them already.
    Returns (weights folder, checkpoint folder); (None, None) when no step was trained."""
    if step <= run.start_step:
        return None, None
    out = Path(run.cfg.output_dir)
    weights, checkpoint = out / str(step), out / f"{CHECKPOINT_PREFIX}{step}"
    run.watch.state("saving", step=step)
    with disk_full_message(run):
        if run.accelerator.is_main_process:
            if not weights.is_dir():
                save_weights(run, step)
            if not checkpoint.is_dir():
                save_checkpoint(run, step)
    run.accelerator.wait_for_everyone()
    run.watch.progress.saved(out, step)
    return weights, checkpoint


def push_to_hub(cfg: TrainConfig, folder: Path) -> str:
    """Upload `folder` with `HfApi.upload_folder`; the token comes from HF_TOKEN / login unless given."""
    from huggingface_hub import HfApi

    api = HfApi(token=cfg.hub_token or None)
    repo_id = cfg.hub_model_id or Path(cfg.output_dir).resolve().name
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"weights {folder.name}")
    return repo_id


@contextlib.contextmanager
def disk_full_message(run: Run) -> Iterator[None]:
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
    models = run.models
    modules = [m for m in models.parts.values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() * 4 for m in modules for p in m.parameters())
