"""Training settings: the `TrainConfig` dataclass, the command line and the flag rules.

Each training flag is declared once, as a `TrainConfig` field made by `flag(...)`: its
default, help, choices and range. The parser (`build_parser`) and the range checks
(`range_problems`) are made from those declarations. The command line
(`train_dreambooth.py`, `accelerate launch train_dreambooth.py`, `python -m dbtools train`)
accepts the flags of Shivam Shrirao's script and of diffusers' current `train_dreambooth.py`
with the same meanings and defaults, and builds a `TrainConfig`; the notebook and the
tests build the same object. Everything here is pure: no model, no accelerator, nothing
written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dbtools.dataset.concepts import Concept, read_concepts
from dbtools.families.flux import MAX_SEQUENCE_LENGTH
from dbtools.families.quantize import QUANTIZATIONS
from dbtools.train.checkpoints import CHECKPOINT_PREFIX, SINGLE_FILE_NAME, resume_path

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "piecewise_constant")
"""The names diffusers' `get_scheduler` accepts (`diffusers.optimization.SchedulerType`)."""

OUTPUT_LAYOUTS = ("shivam", "diffusers")
"""`shivam`: final weights in `<output_dir>/<step>/`; `diffusers`: in `output_dir` itself."""

DEEPFLOYD_ONLY = ("validation_images", "class_labels_conditioning")
"""diffusers' flags for DeepFloyd IF upscaler training, which this project does not do."""

MAX_RESOLUTION = 4096
"""The largest `--resolution`: twice the largest native size of the families trained here
(SD 1.x 512, SD 2.x 768, SDXL 1024); one 4096 px image alone takes about 16 GiB to encode."""
MAX_SEED = 2**32 - 1
"""The largest `--seed` (numpy's generators take no more); -1 draws one."""
RESOLUTION_ADVICE = "the models' own sizes: 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL"


def largest_bucket_bytes(resolution: int, half: bool) -> int:
    """A lower bound of the memory one image of the largest bucket takes to encode.

    Every bucket holds at most `resolution`² pixels. The pixels are float32, and the VAE
    encoder's first block holds at least two 128-channel activations of the full image
    (in half precision under fp16/bf16). Training needs more than this; never less.
    """
    return resolution ** 2 * (3 * 4 + 2 * 128 * (2 if half else 4))


WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
"""diffusers' flow-matching weighting schemes (`dbtools.families.losses` applies them)."""
QUANTIZE_BASE = ("none", *QUANTIZATIONS)


@dataclass(frozen=True)
class Flag:
    """How a `TrainConfig` field is given on the command line, and which values it takes.

    `low`/`high` bound the value (`above`/`below`: the bound itself is not allowed), `step`
    asks for a multiple of it, `choices` lists the allowed values; None (left out) is always
    allowed. `fix` says how to pick a good value; the range message ends with it.
    """

    help: str
    low: float | None = None
    high: float | None = None
    above: bool = False
    below: bool = False
    step: int | None = None
    choices: tuple[str, ...] | None = None
    fix: str | None = None
    metavar: str | None = None


def flag(default: Any, help: str, *, repr: bool = True, **rules: Any) -> Any:
    """A `TrainConfig` field that is also the flag `--<field name>` (see `Flag` for `rules`)."""
    return field(default=default, repr=repr, metadata={"flag": Flag(help, **rules)})


@dataclass
class TrainConfig:
    """Every training setting; field names and defaults are the command-line flags'."""
    # model
    pretrained_model_name_or_path: str = flag("", "Hub id, diffusers folder, or .safetensors/.ckpt file.")
    pretrained_vae_name_or_path: str | None = flag(None, "VAE to use instead of the model's (Hub id, VAE or model "
        "folder).")
    revision: str | None = flag(None, "Hub revision; 'fp16' means the fp16 variant; ignored for local folders.")
    variant: str | None = flag(None, "Weights variant, e.g. fp16.")
    tokenizer_name: str | None = flag(None, "Tokenizer to use instead of the model's.")
    # data
    instance_data_dir: str | None = flag(None, "Folder of training images (or use --concepts_list).")
    instance_prompt: str | None = flag(None, "Prompt for the instance images, e.g. 'a photo of sks dog'.")
    class_data_dir: str | None = flag(None, "Folder of class images (filled by generation when short).")
    class_prompt: str | None = flag(None, "Prompt for class images, e.g. 'a photo of a dog'.")
    concepts_list: str | None = flag(None, "JSON file: list of {instance_prompt, class_prompt, instance_data_dir, "
        "class_data_dir[, prompt_template]}.")
    read_prompts_from_txts: bool = flag(False, "Prompt of X.png is read from X.png.txt (or X.txt / X.caption).")
    prompt_template: str | None = flag(None, "Combine each caption with the prompts, e.g. '{instance_prompt}, "
        "{caption}'. Default: the caption file is the prompt.")
    resolution: int | None = flag(None, "Training resolution in pixels (bucket area with --aspect_ratio_bucketing). "
        "Default: the model's native size (512 for SD 1.x, 768 for SD 2.x v-prediction models, 1024 for SDXL).",
        low=8, high=MAX_RESOLUTION, step=8, fix=RESOLUTION_ADVICE)
    """None: the model family's native size (`with_native_resolution` fills it in)."""
    center_crop: bool = flag(False, "Center-crop instead of random crop.")
    hflip: bool = flag(False, "Randomly flip images horizontally.")
    aspect_ratio_bucketing: bool = flag(False, "Keep each image's aspect ratio: batches are drawn from buckets of "
        "about resolution^2 pixels.")
    caption_dropout: float = flag(0.0, "Probability of training a sample with an empty prompt.",
        low=0, high=1, fix="a probability")
    shuffle_captions: bool = flag(False, "Shuffle the comma-separated parts of each caption every step.")
    keep_tokens: int = flag(0, "With --shuffle_captions: leading comma-separated parts kept in place.", low=0)
    pad_tokens: bool = flag(False, "Pad prompts to the tokenizer's max length (as at inference).")
    tokenizer_max_length: int | None = flag(None, "Token length limit (default: the tokenizer's).")
    text_encoder_use_attention_mask: bool = flag(False, "Pass the attention mask to the text encoder.")
    not_cache_latents: bool = flag(False, "Encode images with the VAE every step instead of caching latents.")
    pre_compute_text_embeddings: bool = flag(False, "Pre-compute prompt embeddings (implied by latent caching when "
        "the text encoder is frozen).")
    cache_dir: str | None = flag(None, "Keep the latent cache in this folder so a restarted run skips encoding.")
    dataloader_num_workers: int = flag(0, "Worker processes loading images (without latent caching).", low=0)
    # prior preservation
    with_prior_preservation: bool = flag(False, "Add the prior-preservation loss on class images.")
    prior_loss_weight: float = flag(1.0, "Weight of the prior-preservation loss.", low=0)
    num_class_images: int = flag(100, "Class images wanted per class folder; missing ones are generated.", low=0)
    sample_batch_size: int = flag(4, "Batch size for generating class images.", low=1)
    prior_generation_precision: str | None = flag(None, "Precision for generating class images.",
        choices=("no", "fp32", "fp16", "bf16"))
    # optimisation
    seed: int | None = flag(None, "Seed for reproducible training; -1 draws one (logged and saved in args.json; "
        "resuming with -1 takes the checkpoint's).",
        low=-1, high=MAX_SEED, fix=f"a seed from 0 to {MAX_SEED}, or -1 to draw one: it is logged and saved in "
        "args.json, so the run can be repeated")
    train_text_encoder: bool = flag(False, "Train the text encoder too.")
    train_batch_size: int = flag(4, "Batch size per device.", low=1)
    num_train_epochs: int = flag(1, "Epochs (used when --max_train_steps is not given).", low=0)
    max_train_steps: int | None = flag(None, "Total optimizer steps; overrides --num_train_epochs.", low=1)
    gradient_accumulation_steps: int = flag(1, "Micro-batches per optimizer step.", low=1)
    gradient_checkpointing: bool = flag(False, "Trade compute for memory.")
    learning_rate: float = flag(5e-6, "Learning rate (after warmup).", low=0, above=True)
    scale_lr: bool = flag(False, "Scale the learning rate by GPUs, accumulation steps and batch size.")
    lr_scheduler: str = flag("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = flag(500, "Warmup steps.", low=0)
    lr_num_cycles: int = flag(1, "Hard restarts for cosine_with_restarts.", low=0)
    lr_step_rules: str | None = flag(None, "piecewise_constant rules, e.g. '1:10,0.1:20,0.01:30,0.005' (multiplier 1 "
        "until step 10, 0.1 until 20, ..., 0.005 after).")
    lr_power: float = flag(1.0, "Power of the polynomial schedule.", low=0, above=True)
    use_8bit_adam: bool = flag(False, "8-bit AdamW from bitsandbytes (falls back to AdamW when it cannot run).")
    use_adafactor: bool = flag(False, "Adafactor (transformers) at --learning_rate instead of AdamW: factored second "
        "moments, about 0.1 floats of state per weight; what fits an SDXL full fine-tune in 24 GB.")
    adam_beta1: float = flag(0.9, "Adam beta1.", low=0, high=1, below=True)
    adam_beta2: float = flag(0.999, "Adam beta2.", low=0, high=1, below=True)
    adam_weight_decay: float = flag(1e-2, "Weight decay.", low=0)
    adam_epsilon: float = flag(1e-08, "Adam epsilon.", low=0)
    max_grad_norm: float = flag(1.0, "Gradient clipping norm.", low=0)
    mixed_precision: str | None = flag(None, "no, fp16 or bf16 (default: accelerate's config; fp16 needs CUDA).",
        choices=("no", "fp16", "bf16"))
    allow_tf32: bool = flag(False, "Allow TF32 matmuls on Ampere+ GPUs (faster).")
    enable_xformers_memory_efficient_attention: bool = flag(False, "Use xformers attention (must be installed).")
    set_grads_to_none: bool = flag(False, "Accepted for compatibility: gradients are always freed (set to None) after "
        "each step, which is faster and uses less memory.")
    snr_gamma: float | None = flag(None, "Min-SNR loss weighting gamma (5.0 is recommended).", low=0, above=True)
    offset_noise: bool = flag(False, "Fine-tune with offset noise.")
    offset_noise_strength: float = flag(0.1, "Strength of the offset noise.", low=0)
    use_ema: bool = flag(False, "Keep an EMA of the UNet; saved weights are the EMA weights.")
    ema_decay: float = flag(0.9999, "EMA decay.", low=0, high=1)
    use_lora: bool = flag(False, "Train LoRA adapters (peft) instead of all weights: low memory.")
    lora_rank: int = flag(4, "LoRA rank.", low=1)
    max_nonfinite_steps: int = flag(5, "Abort after this many non-finite losses in a row (each is skipped).", low=1)
    # flow-matching transformers (Flux.1 and later)
    weighting_scheme: str = flag("none", "How training sigmas are drawn and the loss weighted: logit_normal and mode "
        "draw more sigmas from the middle, sigma_sqrt and cosmap weight the loss, none draws uniformly.",
        choices=WEIGHTING_SCHEMES)
    logit_mean: float = flag(0.0, "Mean of the logit-normal draw (--weighting_scheme logit_normal; above 0 favours "
        "less noise, as in diffusers).")
    logit_std: float = flag(1.0, "Spread of the logit-normal draw.", low=0, above=True)
    mode_scale: float = flag(1.29, "How strongly --weighting_scheme mode favours the middle sigmas.", low=0)
    guidance_scale: float = flag(1.0, "Value fed to the guidance embedding while training a guidance-distilled model "
        "(Flux.1 [dev]); 1.0 trains the LoRA to work at every guidance.", low=0)
    max_sequence_length: int = flag(MAX_SEQUENCE_LENGTH, f"Longest T5 prompt in tokens (at most "
        f"{MAX_SEQUENCE_LENGTH}); longer captions are cut.", low=1, high=MAX_SEQUENCE_LENGTH)
    quantize_base: str = flag("none", "Quantize the frozen transformer (bitsandbytes nf4 or int8; LoRA adapters stay "
        "float32): Flux.1 [dev] in nf4 trains on a 16 GB GPU.", choices=QUANTIZE_BASE)
    # saving, samples, logging
    output_dir: str = flag("text-inversion-model", "Where weights, checkpoints and logs go.")
    overwrite_output_dir: bool = flag(False, "Start a new run in an output folder that holds another run: its folders "
        "are moved aside to <output_dir>-previous-<time> (never deleted).")
    save_interval: int = flag(10_000, "Save weights every N steps.", low=1)
    save_min_steps: int = flag(0, "Start saving weights after N steps.", low=0)
    save_sample_prompt: str | None = flag(None, "Prompt for sample images saved with the weights.")
    save_sample_negative_prompt: str | None = flag(None, "Negative prompt for samples.")
    n_save_sample: int = flag(4, "Sample images per save.", low=1)
    save_guidance_scale: float = flag(7.5, "CFG scale for samples.", low=0)
    save_infer_steps: int = flag(20, "Inference steps for samples.", low=0)
    save_single_file: bool = flag(False, f"Also export the final weights as <step>/{SINGLE_FILE_NAME} (original SD "
        "layout for AUTOMATIC1111/ComfyUI). A LoRA run needs no flag: every step folder holds <output "
        "name>-<step>-lora.safetensors, the LoRA file they load.")
    output_name: str | None = flag(None, "Name of a LoRA run's files for the web UIs (<name>-<step>-lora.safetensors, "
        "and their ss_output_name); default: the output folder's name.")
    training_comment: str | None = flag(None, "A note stored in each LoRA file's metadata (ss_training_comment), as "
        "kohya's scripts do.")
    checkpointing_steps: int | None = flag(None, "Save accelerate state for resuming every N steps (default: never, "
        "as in Shivam's script).", low=1, fix="or leave it out: no resume checkpoints")
    checkpoints_total_limit: int | None = flag(None, "Keep at most this many checkpoint-<step> folders.",
        low=1, fix="or leave it out to keep all")
    resume_from_checkpoint: str | None = flag(None, "A checkpoint folder, or 'latest'.")
    resume_with_changes: bool = flag(False, "Resume although the model, data, resolution, batch size, seed or what is "
        "trained differ from the checkpoint's args.json (refused without it: the run would not continue the "
        "interrupted one exactly).")
    validation_prompt: str | None = flag(None, "Prompt for validation images.")
    num_validation_images: int = flag(4, "Validation images per run.", low=0)
    validation_steps: int = flag(100, "Validate every N steps.", low=1)
    validation_scheduler: str | None = flag(None, "Scheduler for validation images (e.g. DPMSolverMultistepScheduler, "
        "dpm++, ddim; default: the model's).")
    output_layout: str = flag("shivam", "shivam: final weights in <output_dir>/<step>/ (default); diffusers: the "
        "final pipeline in <output_dir> itself, as diffusers' script.", choices=OUTPUT_LAYOUTS)
    skip_save_text_encoder: bool = flag(False, "Do not save the text encoder with the final weights when it was not "
        "trained (the pipeline then needs the base model's).")
    # held-out validation loss and scores per save
    validation_data_dir: str | None = flag(None, "Held-out images (with caption files, read like instance data): "
        "their diffusion loss is logged every --validation_steps to the trackers and <output_dir>/metrics.jsonl.")
    validation_split: float = flag(0.0, "Or keep this share of the instance images out of training for the validation "
        "loss, e.g. 0.1 (chosen by file name and --seed).",
        low=0, high=1, below=True, fix="a share of the instance images, e.g. 0.1")
    score_saves: bool = flag(False, "Score each weights save: likeness of the samples to the instance images "
        "(--likeness_model) and prompt fidelity of --eval_prompts images (--clip_model); writes metrics.jsonl, "
        "metrics-summary.json (suggested best step) and metrics.png.")
    eval_prompts: list[str] | None = flag(None, "'New context' prompts for prompt fidelity (default: the sample "
        "prompt on a beach, in a snowy forest, in a city street at night, as an oil painting).", metavar="PROMPT")
    eval_num_samples: int = flag(4, "Images per eval prompt at each save, on the same seeds every time.", low=1)
    likeness_model: str = flag("facebook/dinov2-small", "DINOv2 model for likeness (Hub id or folder).")
    clip_model: str = flag("openai/clip-vit-base-patch32", "CLIP model for prompt fidelity (Hub id or folder).")
    best_step_tolerance: float = flag(0.05, "How far prompt fidelity may fall below the first save's and still be "
        "suggested.", low=0, fix="0.05 is typical")
    drift_tolerance: float = flag(0.05, "With a class prompt, --score_saves also measures class drift (how much "
        "images of the class prompt alone look like the instance images); a save whose drift rose more than this "
        "above the first save's is not suggested.", low=0, fix="0.05 is typical")
    validation_images: list[str] | None = flag(None, "DeepFloyd IF only: not supported here.")
    class_labels_conditioning: str | None = flag(None, "DeepFloyd IF only: not supported here.")
    verbose: bool = flag(False, "Show every third-party warning and log line.")
    logging_dir: str = flag("logs", "TensorBoard folder, under <output_dir>/0/ (default: <output_dir>/0/logs, "
        "Shivam's layout).")
    log_interval: int = flag(10, "Show the mean loss every N steps.", low=1)
    report_to: str = flag("tensorboard", "tensorboard, wandb, all or none.")
    # hub
    push_to_hub: bool = flag(False, "Upload the final weights to the Hub (token from HF_TOKEN or huggingface-cli "
        "login).")
    hub_token: str | None = flag(None, "Hub token (prefer HF_TOKEN or `huggingface-cli login`; never written to "
        "disk).", repr=False)
    hub_model_id: str | None = flag(None, "Hub repo id for --push_to_hub (default: the output folder's name).")
    local_rank: int = flag(-1, "Set by the launcher.")

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict) -> TrainConfig:
        """Build from parsed flags (unknown keys are ignored)."""
        data = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def concepts(self) -> list[Concept]:
        """The concepts to train: `concepts_list` when given, else the single-concept flags."""
        if self.concepts_list:
            return read_concepts(self.concepts_list)
        return [Concept(instance_data_dir=self.instance_data_dir or "",
                        instance_prompt=self.instance_prompt or "",
                        class_prompt=self.class_prompt or "",
                        class_data_dir=self.class_data_dir or "")]


View = TypeVar("View")


def view(cls: type[View], source: TrainConfig | argparse.Namespace, **values: Any) -> View:
    """The sub-config `cls` (`DataConfig`, `ClassGenConfig`, `EvalConfig`, ...) as seen from
    `source`, the training config or flags parsed with the same names: each field of `cls`
    named like one of `source`'s takes its value (the name is the flag's, so the meaning is
    too); `values` set the others and override any."""
    given = {f.name: getattr(source, f.name) for f in dataclasses.fields(source)} \
        if dataclasses.is_dataclass(source) else vars(source)
    shared = {f.name: given[f.name] for f in dataclasses.fields(cls) if f.init and f.name in given}
    return cls(**{**shared, **values})


def declared_flags() -> list[tuple[dataclasses.Field, Flag]]:
    """Every training flag: the `TrainConfig` field and its declaration, in field order."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(TrainConfig) if "flag" in f.metadata]


_TYPES = {"int": int, "float": float, "str": str}


def _kind(f: dataclasses.Field) -> str:
    """The field's value type without `| None`: `int`, `float`, `str`, `bool` or `list[str]`."""
    return str(f.type).split("|")[0].strip()


def build_parser() -> argparse.ArgumentParser:
    """The one parser behind `train_dreambooth.py` and `python -m dbtools train`, made from
    `TrainConfig`'s declarations: a `bool` field is a switch, a list takes one or more values."""
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description="DreamBooth training for Stable Diffusion with per-image prompts.")
    for f, spec in declared_flags():
        kind = _kind(f)
        if kind == "bool":
            kw: dict[str, Any] = {"action": "store_true"}
        else:
            kw = {"nargs": "+"} if kind.startswith("list[") else {"type": _TYPES[kind]}
            kw.update({k: v for k, v in (("choices", spec.choices), ("metavar", spec.metavar)) if v is not None})
        p.add_argument(f"--{f.name}", default=f.default, help=spec.help.replace("%", "%%"), **kw)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse training flags (`sys.argv[1:]` when `argv` is None); `LOCAL_RANK` wins if set."""
    args = build_parser().parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    return args


def range_problems(cfg: TrainConfig) -> list[str]:
    """Every flag whose value is outside its declared range or choices (`--learning_rate -1`,
    `nan`, `--lr_scheduler cosin`), one message each naming the flag, the value and the fix.
    Checked here, not only by the parser: the notebook and tests build `TrainConfig` directly."""
    return [problem for f, spec in declared_flags()
            if (problem := _range_problem(f.name, getattr(cfg, f.name), spec, _kind(f) == "float"))]


def _range_problem(name: str, value: Any, spec: Flag, finite: bool) -> str | None:
    if value is None or isinstance(value, (bool, list)):
        return None
    if spec.choices is not None:
        return None if value in spec.choices else f"--{name} {value}: must be one of {', '.join(spec.choices)}."
    if _in_range(value, spec, finite):
        return None
    return f"--{name} {value}: must be {_requirement(spec, finite)}" + (f" ({spec.fix})" if spec.fix else "") + "."


def _in_range(value: float, spec: Flag, finite: bool) -> bool:
    if finite and not math.isfinite(value):
        return False
    if spec.low is not None and (value <= spec.low if spec.above else value < spec.low):
        return False
    if spec.high is not None and (value >= spec.high if spec.below else value > spec.high):
        return False
    return not (spec.step and value % spec.step)


def _requirement(spec: Flag, finite: bool) -> str:
    """`spec`'s range in words: "at least 1", "a finite number from 0 to below 1", ..."""
    low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (spec.low, spec.high))
    if spec.low is not None and spec.high is not None and not spec.above:
        bounds = f"from {low} to {'below ' if spec.below else ''}{high}"
    else:
        bounds = " and ".join([f"{'above' if spec.above else 'at least'} {low}"] * (spec.low is not None)
                              + [f"{'below' if spec.below else 'at most'} {high}"] * (spec.high is not None))
    kind = f"a multiple of {spec.step} " if spec.step else "a finite number " if finite else ""
    return kind + bounds


def resolve_mixed_precision(requested: str | None, cuda: bool, bf16_ok: bool = True) -> tuple[str, str | None]:
    """The mixed precision to use and a warning when the request cannot run here.

    fp16 needs CUDA; without it training runs in fp32 ("no"). bf16 needs a GPU that
    supports it, or the CPU.
    """
    requested = requested or "no"
    if requested == "fp16" and not cuda:
        return "no", "fp16 mixed precision needs a CUDA GPU; training in full precision (fp32) instead."
    if requested == "bf16" and cuda and not bf16_ok:
        return "no", "this GPU does not support bf16; training in full precision (fp32) instead."
    return requested, None


def flag_problems(cfg: TrainConfig) -> list[str]:
    """Flag values and combinations that cannot work, each with its fix."""
    problems = []
    if not cfg.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required (a Hub id, a diffusers folder or a "
                        ".safetensors/.ckpt file).")
    if not cfg.concepts_list and not cfg.instance_data_dir:
        problems.append("No training data: give --instance_data_dir (and --instance_prompt) or "
                        "--concepts_list.")
    problems += range_problems(cfg)
    problems += _diffusers_flag_problems(cfg)
    if cfg.use_8bit_adam and cfg.use_adafactor:
        problems.append("--use_8bit_adam and --use_adafactor pick different optimizers: drop one of the two.")
    if cfg.use_lora and cfg.use_ema:
        problems.append("--use_ema works on full UNet weights; drop it when training with --use_lora.")
    if cfg.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        problems.append("--enable_xformers_memory_efficient_attention: xformers is not installed. "
                        "`pip install xformers`, or drop the flag (PyTorch's SDPA attention is used).")
    for tracker in report_trackers(cfg.report_to):
        if importlib.util.find_spec(tracker) is None:
            problems.append(f"--report_to {tracker}: {tracker} is not installed. `pip install {tracker}` "
                            "or choose --report_to none.")
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "latest" \
            and resume_path(cfg.output_dir, cfg.resume_from_checkpoint) is None:
        problems.append(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no such checkpoint "
                        f"folder (looked in {cfg.output_dir}). Use 'latest' or an existing "
                        f"{CHECKPOINT_PREFIX}<step> folder.")
    return problems + _evaluation_problems(cfg)


def _evaluation_problems(cfg: TrainConfig) -> list[str]:
    """The scoring flags."""
    problems = []
    if cfg.score_saves and not (cfg.eval_prompts or cfg.save_sample_prompt or cfg.instance_prompt):
        problems.append("--score_saves needs a prompt to score: give --save_sample_prompt (the samples are "
                        "scored for likeness) or --eval_prompts.")
    if cfg.score_saves:
        for option, name in (("--likeness_model", cfg.likeness_model), ("--clip_model", cfg.clip_model)):
            problems += filter(None, [score_model_problem(name, option)])
    return problems


def score_model_problem(name: str, flag: str) -> str | None:
    """What is wrong with a scoring model name (`--likeness_model`, `--clip_model`), if anything:
    a name that can only be a local path (not `org/model`) must be an existing folder."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not Path(name).expanduser().is_dir():
        return f"{flag} {name}: no such folder. Give a Hub id (e.g. facebook/dinov2-small) or an existing model folder."
    return None


def _diffusers_flag_problems(cfg: TrainConfig) -> list[str]:
    """diffusers-only flags given in a way this project cannot honour."""
    problems = [f"--{name} is for DeepFloyd IF upscaler training, which this project does not do "
                "(Stable Diffusion 1.x/2.x only). Drop the flag." for name in DEEPFLOYD_ONLY
                if getattr(cfg, name)]
    if cfg.lr_scheduler == "piecewise_constant" and not cfg.lr_step_rules:
        problems.append("--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. "
                        "'1:100,0.1:200,0.01' (multiplier:until_step, ..., final multiplier).")
    return problems


def report_trackers(report_to: str | None) -> list[str]:
    """The trackers `--report_to` names: [] for none, both for "all"."""
    if not report_to or report_to == "none":
        return []
    return ["tensorboard", "wandb"] if report_to == "all" else [report_to]

