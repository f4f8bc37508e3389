"""DreamBooth training of Stable Diffusion with per-image prompts.

`train(cfg)` is the whole run and reads top to bottom: check the inputs, set up
accelerate, make class images, load models, cache data, loop, save. What it calls comes
below it, in the order it is called. Setting up lives in `dbtools.train.setup`, writing
weights, samples, checkpoints and uploads in `dbtools.train.outputs`, the loss maths in
`dbtools.families.losses`, the flags in `dbtools.train.config` and the output-folder rules in
`dbtools.train.checkpoints`; the `Run` every step and save takes is in `dbtools.train.run`.

Output layout (as in Shivam's script): `<output_dir>/<step>/` is a diffusers pipeline
folder (LoRA mode: `pytorch_lora_weights.safetensors`) with `args.json` and
`samples/<i>.png`; TensorBoard logs go under `<output_dir>/0/logs`. Accelerate state for
resuming goes to `<output_dir>/checkpoint-<step>/`. Every folder is built under a
temporary name and renamed when complete, so `latest_weights`, `latest_checkpoint` and
`--resume_from_checkpoint latest` only ever see complete folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dbtools.core.env import quiet_library_progress_bars, quiet_third_party
from dbtools.core.redact import public_settings
from dbtools.families.base import Components, Conditioning
from dbtools.families.losses import dreambooth_loss, training_noise
from dbtools.train.checkpoints import SINGLE_FILE_NAME, register_state_hooks, remove_stale_temporaries, ui_lora_file
from dbtools.train.config import TrainConfig, parse_args
from dbtools.train.data import DataPlan, place_items, step_seed
from dbtools.train.folders import hold_output_dir, move_previous_run
from dbtools.train.outputs import (
    HeldOut,
    disk_full_message,
    make_scorer,
    output_prompts,
    periodic_saves,
    push_to_hub,
    save_at_stop,
    save_lora,
    save_weights,
)
from dbtools.train.run import MicroBatches, Run
from dbtools.train.setup import (
    TrainError,
    agree_on_seed,
    before_denoiser,
    cache_prompts_first,
    class_examples,
    encoders_straight_to,
    load_models,
    make_accelerator,
    make_class_images,
    make_data,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    make_prompt_encoder,
    offload_cached,
    preflight,
    prepare_modules,
    resume,
    run_config,
    settle_seed,
    total_steps,
    weight_dtype_for,
    with_native_resolution,
)
from dbtools.train.watch import Watch, stop_message

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

__all__ = ["Run", "TrainConfig", "TrainError", "TrainResult", "main", "run_training", "train"]


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    weights_dir: Path | None
    global_step: int
    skipped_steps: int
    single_file: Path | None = None
    resumed_from: Path | None = None
    stopped: bool = False
    """Stopped by SIGINT/SIGTERM: `weights_dir` and `checkpoint` hold the last step trained."""
    checkpoint: Path | None = None
    message: str | None = None
    """The line that says where the weights are and how to resume (main process only)."""


# --------------------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> TrainResult:
    """Train as configured; return where the final weights are.

    User errors raise `TrainError` (or `ConceptError`/`ModelLoadError`/`ClassGenError`)
    before any model loads. A resumed seeded run ends with the same weights as an
    uninterrupted one. `cfg` itself is never changed.
    """
    asked = cfg.seed
    cfg = with_native_resolution(settle_seed(cfg))
    concepts, plan = preflight(cfg)
    if cfg.hub_token:
        logger.warning("--hub_token given on the command line: prefer HF_TOKEN or `huggingface-cli login` "
                       "(the token is never written to disk).")
    accelerator = make_accelerator(cfg)
    cfg, plan = agree_on_seed(cfg, asked, accelerator, concepts, plan)
    # One run per output folder at a time; only the run holding it moves an earlier run aside
    # and then writes progress.json there (after the move, which would take it along).
    with hold_output_dir(cfg.output_dir, accelerator):
        if accelerator.is_main_process and cfg.overwrite_output_dir:
            move_previous_run(cfg.output_dir)
        with Watch.start(cfg, accelerator) as watch:
            return _train(cfg, concepts, plan, accelerator, watch, asked)


def _train(cfg: TrainConfig, concepts, plan: DataPlan, accelerator: Accelerator, watch: Watch,
           asked_seed: int | None) -> TrainResult:
    """The run inside its lock and watch: class images, setup, loop, final save (or the clean stop's)."""
    if accelerator.is_main_process:
        _log_start(cfg, plan, accelerator)
        if asked_seed != cfg.seed and cfg.seed is not None:
            logger.info("seed: %d for --seed %d (saved in args.json; --seed %d repeats this run)", cfg.seed,
                        asked_seed, cfg.seed)
        remove_stale_temporaries(cfg.output_dir)
    if cfg.seed is not None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
    if cfg.with_prior_preservation:
        watch.state("class images")
    make_class_images(cfg, concepts, accelerator)
    if cfg.with_prior_preservation:
        plan = dataclasses.replace(plan, classes=class_examples(concepts, cfg.num_class_images,
                                                                cfg.read_prompts_from_txts))
    watch.state("caching")
    run = dataclasses.replace(setup(cfg, plan, accelerator), watch=watch)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth", config=_tracker_config(run.cfg))
    step, skipped = loop(run)
    if watch.stopping:
        return _stopped(run, step, skipped)
    return finish(run, step, skipped)


def _log_start(cfg: TrainConfig, plan: DataPlan, accelerator: Accelerator) -> None:
    """The first lines of a training log: model, data, precision/memory and steps."""
    vae = f" with VAE {cfg.pretrained_vae_name_or_path}" if cfg.pretrained_vae_name_or_path else ""
    logger.info("model: %s%s", cfg.pretrained_model_name_or_path, vae)
    prior = f", prior preservation ({cfg.num_class_images} class images per folder)" \
        if cfg.with_prior_preservation else ""
    held = f", {len(plan.validation)} held out for the validation loss" if plan.validation else ""
    logger.info("data: %d instance images%s%s", len(plan.instance), held, prior)
    savers = [name for name, on in (("8-bit Adam", cfg.use_8bit_adam), ("gradient checkpointing",
              cfg.gradient_checkpointing), ("LoRA", cfg.use_lora)) if on]
    precision = "fp32 (no mixed precision)" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    logger.info("precision: %s on %s%s", precision, accelerator.device,
                f"; memory: {', '.join(savers)}" if savers else "")
    steps = cfg.max_train_steps or f"{cfg.num_train_epochs} epoch(s)"
    ckpt = f", checkpoints every {cfg.checkpointing_steps}" if cfg.checkpointing_steps else ""
    logger.info("steps: %s, weights every %d into %s%s", steps, cfg.save_interval, cfg.output_dir, ckpt)


def setup(cfg: TrainConfig, plan: DataPlan, accelerator: Accelerator) -> Run:
    """Load and prepare models, data, optimizer and schedule; resume if asked."""
    world = accelerator.num_processes
    cfg = run_config(cfg, world)
    weight_dtype = weight_dtype_for(accelerator)
    pipeline_prompts = output_prompts(cfg, plan)
    models = load_models(cfg, weight_dtype, only=before_denoiser(cfg, plan, weight_dtype, pipeline_prompts),
                         straight_to=encoders_straight_to(cfg, accelerator.device))
    data = make_data(cfg, plan, models, accelerator, weight_dtype)  # before the UNet and encoders take the GPU
    prompts = None
    if models.parts.get(models.family.denoiser) is None:  # the encoders fill the prompt cache, then go
        prompts, models = cache_prompts_first(cfg, models, data, plan, accelerator, weight_dtype, pipeline_prompts)
    params = prepare_modules(cfg, models, accelerator, weight_dtype)
    if prompts is None:
        prompts = make_prompt_encoder(cfg, models, data, accelerator)
    offload_cached(cfg, models, prompts)
    max_steps = total_steps(cfg, data.batches_per_epoch, world)
    logger.info("training on %d process(es): %d instance and %d class images, %d steps",
                world, len(data.instance), len(data.classes), max_steps)
    optimizer = make_optimizer(cfg, params, accelerator.device)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, max_steps, world)
    ema = make_ema(cfg, models, accelerator)
    models, optimizer, lr_scheduler = _prepare(cfg, models, optimizer, lr_scheduler, accelerator)
    register_state_hooks(accelerator, ema, save_adapters=lambda folder: save_lora(
        folder, accelerator, models, cfg.train_text_encoder), denoiser=models.family.denoiser)
    start_step, resumed_from = resume(cfg, accelerator)
    batches = MicroBatches(data, cfg, micro_indices(cfg, start_step, max_steps, world, accelerator.process_index))
    held_out = HeldOut(place_items(plan.validation, data.cfg)) if plan.validation else None
    return Run(cfg=cfg, accelerator=accelerator, models=models, data=data, prompts=prompts, optimizer=optimizer,
               lr_scheduler=lr_scheduler, params=params, weight_dtype=weight_dtype, batches=batches, ema=ema,
               seed=cfg.seed or 0, max_train_steps=max_steps, start_step=start_step, resumed_from=resumed_from,
               held_out=held_out, scorer=make_scorer(cfg, plan, accelerator))


def _prepare(cfg: TrainConfig, models: Components, optimizer, lr_scheduler, accelerator: Accelerator):
    """`accelerator.prepare` the trained modules (the UNet, and the text encoders when they
    train), the optimizer and the schedule; `models` holds the prepared modules."""
    family = models.family
    names = [family.denoiser] + ([n for n in family.text_encoder_names if models.parts.get(n) is not None]
                                 if cfg.train_text_encoder else [])
    *trained, optimizer, lr_scheduler = accelerator.prepare(*[models.parts[n] for n in names],
                                                            optimizer, lr_scheduler)
    return models.replace(**dict(zip(names, trained, strict=True))), optimizer, lr_scheduler


def loop(run: Run) -> tuple[int, int]:
    """The training loop: step, log, save, checkpoint; returns the last step and the
    number of skipped (non-finite) steps."""
    bar = tqdm(range(run.max_train_steps), initial=run.start_step, desc="steps",
               disable=not run.accelerator.is_local_main_process)
    recent: list[float] = []
    skipped = nonfinite_in_a_row = 0
    step = run.start_step
    run.watch.loop_started(run)
    with run.batches, logging_redirect_tqdm():  # log lines on their own line, above the bar
        while step < run.max_train_steps and not run.watch.should_stop(run):
            loss = train_step(run, step)
            step += 1
            bar.update(1)
            if loss is None:
                skipped, nonfinite_in_a_row = skipped + 1, nonfinite_in_a_row + 1
                _skip_nonfinite(run, step, nonfinite_in_a_row)
                continue
            nonfinite_in_a_row = 0
            _log_step(run, bar, step, loss, recent)
            run.watch.after_step(run, step, loss)
            periodic_saves(run, step)
            run.watch.after_saves(run, step)
    bar.close()
    return step, skipped


def _skip_nonfinite(run: Run, step: int, in_a_row: int) -> None:
    """Warn about a skipped step; `TrainError` once `max_nonfinite_steps` come in a row."""
    logger.warning("step %d: non-finite loss, step skipped (%d in a row)", step, in_a_row)
    if in_a_row >= run.cfg.max_nonfinite_steps:
        raise TrainError(_nonfinite_message(run.cfg, step, in_a_row))


def _nonfinite_message(cfg: TrainConfig, step: int, count: int) -> str:
    return (f"Training stopped at step {step}: the loss was not finite (NaN/inf) {count} steps in a row "
            f"(--max_nonfinite_steps {cfg.max_nonfinite_steps}). Nothing from these steps was saved. Try a lower "
            f"--learning_rate (now {cfg.learning_rate:g}), --mixed_precision bf16 or no instead of fp16, or check "
            "the model; resume from the last good checkpoint with --resume_from_checkpoint latest.")


def _log_step(run: Run, bar: tqdm, step: int, loss: float, recent: list[float]) -> None:
    """Loss and lr to the trackers every step; their mean on the progress bar every `log_interval`."""
    recent.append(loss)
    lr = run.lr_scheduler.get_last_lr()[0]
    run.accelerator.log({"loss": loss, "lr": lr}, step=step)
    if step % run.cfg.log_interval == 0:
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr:.2e}")
        recent.clear()


# --------------------------------------------------------------------------- one step


def train_step(run: Run, step: int) -> float | None:
    """One optimizer step over `gradient_accumulation_steps` micro-batches.

    Returns the mean loss, or None when the loss (or gradient) was not finite on any
    process: then nothing is applied and the gradients are dropped; weights, optimizer
    state, EMA and learning-rate schedule stay exactly as they were. The loss and the
    finite flags stay on the device until one read per step, so the GPU never waits for
    the host between micro-batches.
    """
    acc, cfg = run.accelerator, run.cfg
    total, nonfinite = _accumulate_gradients(run, step)
    grad_norm = acc.clip_grad_norm_(run.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    if grad_norm is not None and acc.scaler is None:
        nonfinite = nonfinite | ~torch.isfinite(torch.as_tensor(grad_norm, device=nonfinite.device))
    loss, finite = _read_step(acc, total, nonfinite)
    if finite:
        run.optimizer.step()
        # A skipped step leaves the schedule where it was (as accelerate does for a step the
        # fp16 gradient scaler skips): the learning rate follows the updates applied.
        run.lr_scheduler.step()
    elif acc.scaler is not None and grad_norm is not None:
        acc.scaler.update()  # forget this step's unscale so the next step can unscale again
    # Gradients are always freed, not zeroed: it is faster and uses less memory between
    # steps (diffusers' --set_grads_to_none is accepted and is what we always do).
    run.optimizer.zero_grad(set_to_none=True)
    if finite and run.ema is not None:
        run.ema.step(acc.unwrap_model(run.unet).parameters())
    return loss if finite else None


def _accumulate_gradients(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward every micro-batch of `step`.

    Returns the mean loss and a flag "some loss was not finite", both as tensors on the
    device: nothing here waits for the GPU.
    """
    acc = run.accelerator
    accum = run.cfg.gradient_accumulation_steps
    total = nonfinite = None
    for k in range(accum):
        sync = k == accum - 1
        with contextlib.nullcontext() if sync else _no_sync(run):
            loss = compute_loss(run, micro_index(step, k, accum, acc.num_processes, acc.process_index))
            # A NaN loss still goes through backward so every process joins the gradient
            # all-reduce; its gradients are dropped by `train_step`.
            acc.backward(loss / accum)
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        total = loss / accum if total is None else total + loss / accum
        nonfinite = bad if nonfinite is None else nonfinite | bad
    return total, nonfinite


def micro_index(step: int, k: int, accum: int, world: int, rank: int) -> int:
    """The global index of micro-batch `k` of optimizer step `step` on process `rank`.

    Process `rank` takes every `world`-th micro-batch, so the data order (and a resumed
    run's) depends only on the step, never on what was loaded before.
    """
    return (step * accum + k) * world + rank


def micro_indices(cfg: TrainConfig, start_step: int, max_steps: int, world: int, rank: int) -> list[int]:
    """The micro-batch indices this process trains on, in order, from `start_step` on."""
    accum = cfg.gradient_accumulation_steps
    return [micro_index(step, k, accum, world, rank) for step in range(start_step, max_steps) for k in range(accum)]


def compute_loss(run: Run, micro: int) -> torch.Tensor:
    """Loss of micro-batch `micro`: instance loss + prior_loss_weight x class loss.

    All randomness (noise, timesteps, latent samples) comes from a generator seeded by the
    run seed and `micro`, so a resumed run repeats an uninterrupted one exactly.
    """
    batch = run.batches.get(micro)
    gen = torch.Generator().manual_seed(step_seed(run.seed, micro, "noise"))
    parts = [batch["instance"]] + ([batch["class"]] if batch["class"] else [])
    latents = [_latents(run, part, gen) for part in parts]
    family = run.models.family
    encoded = _encode_prompts(run, [p for part in parts for p in part["prompts"]])
    conds = [c.merged(family.image_conditioning(part))
             for c, part in zip(encoded.split([len(part["prompts"]) for part in parts]), parts, strict=True)]
    is_prior = [torch.full((len(lat),), i == 1) for i, lat in enumerate(latents)]
    if len(parts) == 2 and latents[0].shape[1:] == latents[1].shape[1:]:
        latents, is_prior = ([torch.cat(x)] for x in (latents, is_prior))
        conds = [Conditioning.cat(conds)]
    losses = [_part_loss(run, lat, cond, prior, gen)
              for lat, cond, prior in zip(latents, conds, is_prior, strict=True)]
    return losses[0] if len(losses) == 1 else losses[0] + losses[1]


def _encode_prompts(run: Run, prompts: list[str]) -> Conditioning:
    """The family's prompt conditioning of `prompts`, on the training device."""
    return run.models.family.encode_prompts(run.prompts, prompts, run.models.text_encoders, run.accelerator.device)


def _latents(run: Run, part: dict, gen: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents sampled from the cached (or freshly encoded) distribution."""
    device, vae = run.accelerator.device, run.models.vae
    if "latent_mean" in part:
        mean, std = torch.from_numpy(part["latent_mean"]), torch.from_numpy(part["latent_std"])
        sample = mean + std * torch.randn(mean.shape, generator=gen)
        return run.models.family.latents(sample, vae).to(device)
    # Not cached: the distribution stays where the VAE made it (no GPU -> CPU round trip);
    # only the noise, drawn from the seeded CPU generator, travels.
    dtype = getattr(vae, "dtype", run.weight_dtype)  # an SDXL VAE may stay float32 (`vae_dtype`)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(part["pixels"]).to(device, dtype=dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=gen).to(device)
    return run.models.family.latents(dist.mean.float() + dist.std.float() * noise, vae)


def _part_loss(run: Run, latents: torch.Tensor, cond: Conditioning, is_prior: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
    """Noise the latents at random timesteps, predict, and score the prediction; the family
    says how (`ModelFamily.timesteps`, `noisy`, `target`, `predict`, `loss_weights`)."""
    family, scheduler, cfg = run.models.family, run.models.noise_scheduler, run.cfg
    noise = training_noise(tuple(latents.shape), gen, cfg.offset_noise_strength if cfg.offset_noise else 0.0)
    timesteps = family.timesteps(scheduler, latents.shape[0], gen)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = family.noisy(scheduler, latents, noise, timesteps)
    target = family.target(scheduler, latents, noise, timesteps)
    pred = family.predict(run.models.denoiser, noisy, timesteps, cond)
    return dreambooth_loss(pred, target, is_prior=is_prior, prior_loss_weight=cfg.prior_loss_weight,
                           weights=family.loss_weights(scheduler, timesteps, cfg.snr_gamma))


def _no_sync(run: Run) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(run.accelerator.no_sync(run.unet))
    if run.cfg.train_text_encoder:
        for encoder in run.models.text_encoders:
            stack.enter_context(run.accelerator.no_sync(encoder))
    return stack


def _read_step(accelerator: Accelerator, total: torch.Tensor, nonfinite: torch.Tensor) -> tuple[float, bool]:
    """The step's loss and whether it was finite on every process: one read from the device."""
    flag = nonfinite.float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    loss, bad = torch.cat([total.float().reshape(1), flag.reshape(1)]).tolist()
    return loss, bad == 0.0


# --------------------------------------------------------------------------- the end


def finish(run: Run, step: int, skipped: int = 0) -> TrainResult:
    """Save the final weights (and single file, Hub upload); end the trackers."""
    acc, cfg = run.accelerator, run.cfg
    weights = single = None
    run.watch.state("saving", step=step)
    if acc.is_main_process:
        with disk_full_message(run):
            weights = save_weights(run, step, final=True)
        if cfg.save_single_file:
            single = ui_lora_file(weights) if cfg.use_lora else weights / SINGLE_FILE_NAME
        if cfg.push_to_hub:
            logger.info("uploaded to https://huggingface.co/%s", push_to_hub(cfg, weights))
    acc.wait_for_everyone()
    acc.end_training()
    run.watch.finished(run, weights, step)
    return TrainResult(Path(cfg.output_dir), weights, step, skipped, single, run.resumed_from)


def _stopped(run: Run, step: int, skipped: int) -> TrainResult:
    """A clean stop (SIGINT/SIGTERM): weights and a resume checkpoint at the last step trained."""
    weights, checkpoint = save_at_stop(run, step)
    run.accelerator.end_training()
    message = stop_message(step, weights, checkpoint)
    run.watch.state("stopped", step=step, resume_from=checkpoint and str(checkpoint), message=message)
    if not run.accelerator.is_main_process:
        weights = checkpoint = message = None
    return TrainResult(Path(run.cfg.output_dir), weights, step, skipped, None, run.resumed_from, True, checkpoint,
                       message)


def _tracker_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in public_settings(cfg).items() if isinstance(v, (int, float, str, bool))}


# --------------------------------------------------------------------------- command line


def run_training(cfg: TrainConfig) -> int:
    """Train and print a summary; a `UserError` rises to the entry point, which reports it."""
    quiet_library_progress_bars(cfg.verbose)
    try:
        result = train(cfg)
    except KeyboardInterrupt:  # before the loop, or a third interrupt while stopping
        print("Interrupted: nothing more was saved; complete weights and checkpoint folders stay as they were.",
              file=sys.stderr)
        return 130
    if result.stopped:
        if result.message:
            print(result.message)
    elif result.weights_dir is not None:
        print(f"Trained {result.global_step} steps ({result.skipped_steps} skipped). "
              f"Weights: {result.weights_dir}")
        if result.single_file:
            print(f"Single file: {result.single_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools train [flags]`: the same flags as train_dreambooth.py."""
    args = parse_args(argv)
    quiet_third_party(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_training(TrainConfig.from_args(args))
