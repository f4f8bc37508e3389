"""Training settings: the `TrainConfig` dataclass, the command line and the flag rules.

The command line (`train_dreambooth.py`, `accelerate launch train_dreambooth.py`,
`python -m dbtools train`) accepts the flags of Shivam Shrirao's script and of
diffusers' current `train_dreambooth.py` with the same meanings and defaults, and
builds a `TrainConfig`; the notebook and the tests build the same object. Everything
here is pure: no model, no accelerator, nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field

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


@dataclass
class TrainConfig:
    """Every training setting; field names and defaults are the command-line flags'."""

    # model
    pretrained_model_name_or_path: str = ""
    pretrained_vae_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    tokenizer_name: str | None = None
    # data
    instance_data_dir: str | None = None
    instance_prompt: str | None = None
    class_data_dir: str | None = None
    class_prompt: str | None = None
    concepts_list: str | None = None
    read_prompts_from_txts: bool = False
    prompt_template: str | None = None
    resolution: int | None = None
    """None: the model family's native size (`with_native_resolution` fills it in)."""
    center_crop: bool = False
    hflip: bool = False
    aspect_ratio_bucketing: bool = False
    caption_dropout: float = 0.0
    shuffle_captions: bool = False
    keep_tokens: int = 0
    pad_tokens: bool = False
    tokenizer_max_length: int | None = None
    text_encoder_use_attention_mask: bool = False
    not_cache_latents: bool = False
    pre_compute_text_embeddings: bool = False
    cache_dir: str | None = None
    dataloader_num_workers: int = 0
    # prior preservation
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    prior_generation_precision: str | None = None
    # optimisation
    seed: int | None = None
    train_text_encoder: bool = False
    train_batch_size: int = 4
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 5e-6
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_step_rules: str | None = None
    lr_power: float = 1.0
    use_8bit_adam: bool = False
    use_adafactor: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-08
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    allow_tf32: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    set_grads_to_none: bool = False
    snr_gamma: float | None = None
    offset_noise: bool = False
    offset_noise_strength: float = 0.1
    use_ema: bool = False
    ema_decay: float = 0.9999
    use_lora: bool = False
    lora_rank: int = 4
    max_nonfinite_steps: int = 5
    # flow-matching transformers (Flux.1)
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 1.0
    max_sequence_length: int = 512
    quantize_base: str = "none"
    # saving, samples, logging
    output_dir: str = "text-inversion-model"
    overwrite_output_dir: bool = False
    save_interval: int = 10_000
    save_min_steps: int = 0
    save_sample_prompt: str | None = None
    save_sample_negative_prompt: str | None = None
    n_save_sample: int = 4
    save_guidance_scale: float = 7.5
    save_infer_steps: int = 20
    save_single_file: bool = False
    output_name: str | None = None
    training_comment: str | None = None
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    resume_with_changes: bool = False
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_steps: int = 100
    validation_scheduler: str | None = None
    output_layout: str = "shivam"
    skip_save_text_encoder: bool = False
    # held-out validation loss and scores per save
    validation_data_dir: str | None = None
    validation_split: float = 0.0
    score_saves: bool = False
    eval_prompts: list[str] | None = None
    eval_num_samples: int = 4
    likeness_model: str = "facebook/dinov2-small"
    clip_model: str = "openai/clip-vit-base-patch32"
    best_step_tolerance: float = 0.05
    drift_tolerance: float = 0.05
    validation_images: list[str] | None = None
    class_labels_conditioning: str | None = None
    verbose: bool = False
    logging_dir: str = "logs"
    log_interval: int = 10
    report_to: str = "tensorboard"
    # hub
    push_to_hub: bool = False
    hub_token: str | None = field(default=None, repr=False)
    hub_model_id: str | None = None
    local_rank: int = -1

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


_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|auth)$", re.I)
# A flag whose name holds one of these words as a whole part (`--hub_token`, `--token_x`),
# but not `--keep_tokens` or `--tokenizer_name`.
_SECRET_FLAG = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|auth)(_|$)", re.I)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_[A-Za-z0-9]{20,})\b")
SECRET_FLAGS = ("hub_token",)
REDACTED = "<redacted>"


def public_args(cfg: TrainConfig) -> dict:
    """The config as a JSON-able dict without secrets: no `hub_token`, no token-like keys,
    and token-looking strings in values replaced by `<redacted>`."""
    out = {}
    for key, value in dataclasses.asdict(cfg).items():
        if _SECRET_KEY.search(key):
            continue
        if isinstance(value, str):
            value = _SECRET_VALUE.sub("<redacted>", value)
        out[key] = value
    return out


def mask_secret_text(text: str) -> str:
    """`text` with token-looking strings (`hf_...`) replaced by `<redacted>`."""
    return _SECRET_VALUE.sub(REDACTED, text)


def is_secret_flag(name: str) -> bool:
    """True for a flag name that carries a secret (`hub_token`, `*_token`, ...)."""
    # A prefix of a secret flag is masked too: old parsers accepted abbreviations.
    return bool(_SECRET_FLAG.search(name)) or any(len(name) >= 3 and s.startswith(name) for s in SECRET_FLAGS)


def mask_secrets(argv: list[str]) -> list[str]:
    """A command line safe to show or log: values of token-like flags (`--hub_token x`,
    `--hub_token=x`, any `--*_token`) and token-looking strings anywhere become `<redacted>`."""
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next and not arg.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        if arg.startswith("--"):
            name, eq, _ = arg[2:].partition("=")
            if is_secret_flag(name):
                out.append(f"--{name}={REDACTED}" if eq else arg)
                hide_next = not eq
                continue
        out.append(mask_secret_text(arg))
    return out


def _help(text: str) -> str:
    return text.replace("%", "%%")


class _FlagAdder:
    """Adds `--<name>` flags whose defaults come from `TrainConfig`'s fields."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser, self.defaults = parser, TrainConfig()

    def __call__(self, name: str, help: str, **kw) -> None:
        if kw.get("action") not in ("store_true",):
            kw.setdefault("default", getattr(self.defaults, name))
        self.parser.add_argument(f"--{name}", help=_help(help), **kw)

    def switch(self, name: str, help: str) -> None:
        self(name, help, action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The one parser behind `train_dreambooth.py` and `python -m dbtools train`."""
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description="DreamBooth training for Stable Diffusion with per-image prompts.")
    f = _FlagAdder(p)
    for add in (_model_flags, _data_flags, _prior_flags, _optimizer_flags, _flow_matching_flags, _output_flags,
                _evaluation_flags, _hub_flags):
        add(f)
    return p


def _model_flags(f: _FlagAdder) -> None:
    """Which model to start from."""
    f("pretrained_model_name_or_path", "Hub id, diffusers folder, or .safetensors/.ckpt file.", type=str)
    f("pretrained_vae_name_or_path", "VAE to use instead of the model's (Hub id, VAE or model folder).", type=str)
    f("revision", "Hub revision; 'fp16' means the fp16 variant; ignored for local folders.", type=str)
    f("variant", "Weights variant, e.g. fp16.", type=str)
    f("tokenizer_name", "Tokenizer to use instead of the model's.", type=str)


def _data_flags(f: _FlagAdder) -> None:
    """Training images, prompts and how they become batches."""
    f("instance_data_dir", "Folder of training images (or use --concepts_list).", type=str)
    f("instance_prompt", "Prompt for the instance images, e.g. 'a photo of sks dog'.", type=str)
    f("class_data_dir", "Folder of class images (filled by generation when short).", type=str)
    f("class_prompt", "Prompt for class images, e.g. 'a photo of a dog'.", type=str)
    f("concepts_list", "JSON file: list of {instance_prompt, class_prompt, instance_data_dir, "
      "class_data_dir[, prompt_template]}.", type=str)
    f.switch("read_prompts_from_txts", "Prompt of X.png is read from X.png.txt (or X.txt / X.caption).")
    f("prompt_template", "Combine each caption with the prompts, e.g. '{instance_prompt}, {caption}'. "
      "Default: the caption file is the prompt.", type=str)
    f("resolution", "Training resolution in pixels (bucket area with --aspect_ratio_bucketing). Default: the "
      "model's native size (512 for SD 1.x, 768 for SD 2.x v-prediction models, 1024 for SDXL).", type=int)
    f.switch("center_crop", "Center-crop instead of random crop.")
    f.switch("hflip", "Randomly flip images horizontally.")
    f.switch("aspect_ratio_bucketing", "Keep each image's aspect ratio: batches are drawn from buckets of "
             "about resolution^2 pixels.")
    f("caption_dropout", "Probability of training a sample with an empty prompt.", type=float)
    f.switch("shuffle_captions", "Shuffle the comma-separated parts of each caption every step.")
    f("keep_tokens", "With --shuffle_captions: leading comma-separated parts kept in place.", type=int)
    f.switch("pad_tokens", "Pad prompts to the tokenizer's max length (as at inference).")
    f("tokenizer_max_length", "Token length limit (default: the tokenizer's).", type=int)
    f.switch("text_encoder_use_attention_mask", "Pass the attention mask to the text encoder.")
    f.switch("not_cache_latents", "Encode images with the VAE every step instead of caching latents.")
    f.switch("pre_compute_text_embeddings", "Pre-compute prompt embeddings (implied by latent caching "
             "when the text encoder is frozen).")
    f("cache_dir", "Keep the latent cache in this folder so a restarted run skips encoding.", type=str)
    f("dataloader_num_workers", "Worker processes loading images (without latent caching).", type=int)


def _prior_flags(f: _FlagAdder) -> None:
    """Prior preservation and class-image generation."""
    f.switch("with_prior_preservation", "Add the prior-preservation loss on class images.")
    f("prior_loss_weight", "Weight of the prior-preservation loss.", type=float)
    f("num_class_images", "Class images wanted per class folder; missing ones are generated.", type=int)
    f("sample_batch_size", "Batch size for generating class images.", type=int)
    f("prior_generation_precision", "Precision for generating class images.", type=str,
      choices=["no", "fp32", "fp16", "bf16"])


def _optimizer_flags(f: _FlagAdder) -> None:
    """Optimizer, schedule, precision and loss options."""
    f("seed", "Seed for reproducible training; -1 draws one (logged and saved in args.json; resuming "
      "with -1 takes the checkpoint's).", type=int)
    f.switch("train_text_encoder", "Train the text encoder too.")
    f("train_batch_size", "Batch size per device.", type=int)
    f("num_train_epochs", "Epochs (used when --max_train_steps is not given).", type=int)
    f("max_train_steps", "Total optimizer steps; overrides --num_train_epochs.", type=int)
    f("gradient_accumulation_steps", "Micro-batches per optimizer step.", type=int)
    f.switch("gradient_checkpointing", "Trade compute for memory.")
    f("learning_rate", "Learning rate (after warmup).", type=float)
    f.switch("scale_lr", "Scale the learning rate by GPUs, accumulation steps and batch size.")
    f("lr_scheduler", "Learning-rate schedule.", type=str, choices=LR_SCHEDULERS)
    f("lr_warmup_steps", "Warmup steps.", type=int)
    f("lr_num_cycles", "Hard restarts for cosine_with_restarts.", type=int)
    f("lr_power", "Power of the polynomial schedule.", type=float)
    f("lr_step_rules", "piecewise_constant rules, e.g. '1:10,0.1:20,0.01:30,0.005' (multiplier 1 "
      "until step 10, 0.1 until 20, ..., 0.005 after).", type=str)
    f.switch("use_8bit_adam", "8-bit AdamW from bitsandbytes (falls back to AdamW when it cannot run).")
    f.switch("use_adafactor", "Adafactor (transformers) at --learning_rate instead of AdamW: factored "
             "second moments, about 0.1 floats of state per weight; what fits an SDXL full fine-tune in 24 GB.")
    f("adam_beta1", "Adam beta1.", type=float)
    f("adam_beta2", "Adam beta2.", type=float)
    f("adam_weight_decay", "Weight decay.", type=float)
    f("adam_epsilon", "Adam epsilon.", type=float)
    f("max_grad_norm", "Gradient clipping norm.", type=float)
    f("mixed_precision", "no, fp16 or bf16 (default: accelerate's config; fp16 needs CUDA).", type=str,
      choices=["no", "fp16", "bf16"])
    f.switch("allow_tf32", "Allow TF32 matmuls on Ampere+ GPUs (faster).")
    f.switch("enable_xformers_memory_efficient_attention", "Use xformers attention (must be installed).")
    f.switch("set_grads_to_none", "Accepted for compatibility: gradients are always freed "
             "(set to None) after each step, which is faster and uses less memory.")
    f("snr_gamma", "Min-SNR loss weighting gamma (5.0 is recommended).", type=float)
    f.switch("offset_noise", "Fine-tune with offset noise.")
    f("offset_noise_strength", "Strength of the offset noise.", type=float)
    f.switch("use_ema", "Keep an EMA of the UNet; saved weights are the EMA weights.")
    f("ema_decay", "EMA decay.", type=float)
    f.switch("use_lora", "Train LoRA adapters (peft) instead of all weights: low memory.")
    f("lora_rank", "LoRA rank.", type=int)
    f("max_nonfinite_steps", "Abort after this many non-finite losses in a row (each is skipped).", type=int)


WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
"""diffusers' flow-matching weighting schemes (`dbtools.train.losses` applies them)."""
QUANTIZE_BASE = ("none", *QUANTIZATIONS)


def _flow_matching_flags(f: _FlagAdder) -> None:
    """Flow-matching transformers (Flux.1): how sigmas are drawn and weighted, the guidance
    embedding, the T5 prompt length and a quantized frozen base."""
    f("weighting_scheme", "How training sigmas are drawn and the loss weighted: logit_normal and mode draw "
      "more sigmas from the middle, sigma_sqrt and cosmap weight the loss, none draws uniformly.", type=str,
      choices=WEIGHTING_SCHEMES)
    f("logit_mean", "Mean of the logit-normal draw (--weighting_scheme logit_normal; above 0 favours less "
      "noise, as in diffusers).", type=float)
    f("logit_std", "Spread of the logit-normal draw.", type=float)
    f("mode_scale", "How strongly --weighting_scheme mode favours the middle sigmas.", type=float)
    f("guidance_scale", "Value fed to the guidance embedding while training a guidance-distilled model "
      "(Flux.1 [dev]); 1.0 trains the LoRA to work at every guidance.", type=float)
    f("max_sequence_length", f"Longest T5 prompt in tokens (at most {MAX_SEQUENCE_LENGTH}); longer captions "
      "are cut.", type=int)
    f("quantize_base", "Quantize the frozen transformer (bitsandbytes nf4 or int8; LoRA adapters stay "
      "float32): Flux.1 [dev] in nf4 trains on a 16 GB GPU.", type=str, choices=QUANTIZE_BASE)


def _output_flags(f: _FlagAdder) -> None:
    """Saved weights, samples, checkpoints and logs."""
    f("output_dir", "Where weights, checkpoints and logs go.", type=str)
    f.switch("overwrite_output_dir", "Start a new run in an output folder that holds another run: its "
             "folders are moved aside to <output_dir>-previous-<time> (never deleted).")
    f("save_interval", "Save weights every N steps.", type=int)
    f("save_min_steps", "Start saving weights after N steps.", type=int)
    f("save_sample_prompt", "Prompt for sample images saved with the weights.", type=str)
    f("save_sample_negative_prompt", "Negative prompt for samples.", type=str)
    f("n_save_sample", "Sample images per save.", type=int)
    f("save_guidance_scale", "CFG scale for samples.", type=float)
    f("save_infer_steps", "Inference steps for samples.", type=int)
    f.switch("save_single_file", f"Also export the final weights as <step>/{SINGLE_FILE_NAME} "
             "(original SD layout for AUTOMATIC1111/ComfyUI). A LoRA run needs no flag: every step folder "
             "holds <output name>-<step>-lora.safetensors, the LoRA file they load.")
    f("output_name", "Name of a LoRA run's files for the web UIs (<name>-<step>-lora.safetensors, and their "
      "ss_output_name); default: the output folder's name.", type=str)
    f("training_comment", "A note stored in each LoRA file's metadata (ss_training_comment), as kohya's "
      "scripts do.", type=str)
    f("checkpointing_steps", "Save accelerate state for resuming every N steps (default: never, as "
      "in Shivam's script).", type=int)
    f("checkpoints_total_limit", "Keep at most this many checkpoint-<step> folders.", type=int)
    f("resume_from_checkpoint", "A checkpoint folder, or 'latest'.", type=str)
    f.switch("resume_with_changes", "Resume although the model, data, resolution, batch size, seed or what is "
             "trained differ from the checkpoint's args.json (refused without it: the run would not continue "
             "the interrupted one exactly).")
    f("validation_prompt", "Prompt for validation images.", type=str)
    f("num_validation_images", "Validation images per run.", type=int)
    f("validation_steps", "Validate every N steps.", type=int)
    f("validation_scheduler", "Scheduler for validation images (e.g. DPMSolverMultistepScheduler, "
      "dpm++, ddim; default: the model's).", type=str)
    f("output_layout", "shivam: final weights in <output_dir>/<step>/ (default); diffusers: the final "
      "pipeline in <output_dir> itself, as diffusers' script.", type=str, choices=OUTPUT_LAYOUTS)
    f.switch("skip_save_text_encoder", "Do not save the text encoder with the final weights when it "
             "was not trained (the pipeline then needs the base model's).")
    f("validation_images", "DeepFloyd IF only: not supported here.", nargs="+")
    f("class_labels_conditioning", "DeepFloyd IF only: not supported here.", type=str)
    f.switch("verbose", "Show every third-party warning and log line.")
    f("logging_dir", "TensorBoard folder, under <output_dir>/0/ (default: <output_dir>/0/logs, Shivam's layout).",
      type=str)
    f("log_interval", "Show the mean loss every N steps.", type=int)
    f("report_to", "tensorboard, wandb, all or none.", type=str)


def _evaluation_flags(f: _FlagAdder) -> None:
    """Held-out validation loss and the scores that suggest the best step."""
    f("validation_data_dir", "Held-out images (with caption files, read like instance data): their "
      "diffusion loss is logged every --validation_steps to the trackers and <output_dir>/metrics.jsonl.",
      type=str)
    f("validation_split", "Or keep this share of the instance images out of training for the validation "
      "loss, e.g. 0.1 (chosen by file name and --seed).", type=float)
    f.switch("score_saves", "Score each weights save: likeness of the samples to the instance images "
             "(--likeness_model) and prompt fidelity of --eval_prompts images (--clip_model); writes "
             "metrics.jsonl, metrics-summary.json (suggested best step) and metrics.png.")
    f("eval_prompts", "'New context' prompts for prompt fidelity (default: the sample prompt on a beach, "
      "in a snowy forest, in a city street at night, as an oil painting).", nargs="+", metavar="PROMPT")
    f("eval_num_samples", "Images per eval prompt at each save, on the same seeds every time.", type=int)
    f("likeness_model", "DINOv2 model for likeness (Hub id or folder).", type=str)
    f("clip_model", "CLIP model for prompt fidelity (Hub id or folder).", type=str)
    f("best_step_tolerance", "How far prompt fidelity may fall below the first save's and still be "
      "suggested.", type=float)
    f("drift_tolerance", "With a class prompt, --score_saves also measures class drift (how much images of "
      "the class prompt alone look like the instance images); a save whose drift rose more than this "
      "above the first save's is not suggested.", type=float)


def _hub_flags(f: _FlagAdder) -> None:
    """Hub upload and the launcher."""
    f.switch("push_to_hub", "Upload the final weights to the Hub (token from HF_TOKEN or huggingface-cli login).")
    f("hub_token", "Hub token (prefer HF_TOKEN or `huggingface-cli login`; never written to disk).", type=str)
    f("hub_model_id", "Hub repo id for --push_to_hub (default: the output folder's name).", type=str)
    f("local_rank", "Set by the launcher.", type=int)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse training flags (`sys.argv[1:]` when `argv` is None); `LOCAL_RANK` wins if set."""
    args = build_parser().parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    return args



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
    """Flag combinations that cannot work, each with its fix."""
    problems = []
    if not cfg.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required (a Hub id, a diffusers folder or a "
                        ".safetensors/.ckpt file).")
    if not cfg.concepts_list and not cfg.instance_data_dir:
        problems.append("No training data: give --instance_data_dir (and --instance_prompt) or "
                        "--concepts_list.")
    if cfg.resolution is not None and (cfg.resolution < 8 or cfg.resolution % 8 or cfg.resolution > MAX_RESOLUTION):
        problems.append(f"--resolution {cfg.resolution} must be a multiple of 8 from 8 to {MAX_RESOLUTION} "
                        f"({RESOLUTION_ADVICE}).")
    for name in ("train_batch_size", "gradient_accumulation_steps", "n_save_sample", "save_interval",
                 "max_nonfinite_steps", "lora_rank", "sample_batch_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be at least 1.")
    if cfg.seed is not None and not (cfg.seed == -1 or 0 <= cfg.seed <= MAX_SEED):
        problems.append(f"--seed {cfg.seed}: use a seed from 0 to {MAX_SEED}, or -1 to draw one (it is logged "
                        "and saved in args.json, so the run can be repeated).")
    problems += number_problems(cfg)
    if cfg.checkpointing_steps is not None and cfg.checkpointing_steps < 1:
        problems.append("--checkpointing_steps must be at least 1 (or leave it out: no resume checkpoints).")
    problems += _diffusers_flag_problems(cfg)
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        problems.append("--max_train_steps must be at least 1.")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        problems.append("--checkpoints_total_limit must be at least 1 (or leave it out to keep all).")
    if not 0.0 <= cfg.caption_dropout <= 1.0:
        problems.append("--caption_dropout is a probability: give a value from 0 to 1.")
    if cfg.keep_tokens < 0:
        problems.append("--keep_tokens cannot be negative.")
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
    return problems


# flag: (lowest, highest); "(" / ")" in `open` mark a bound the value may not equal.
_NUMBER_RANGES: dict[str, tuple[float, float | None, str]] = {
    "learning_rate": (0.0, None, "("), "adam_beta1": (0.0, 1.0, ")"), "adam_beta2": (0.0, 1.0, ")"),
    "adam_weight_decay": (0.0, None, ""), "adam_epsilon": (0.0, None, ""), "max_grad_norm": (0.0, None, ""),
    "prior_loss_weight": (0.0, None, ""), "ema_decay": (0.0, 1.0, ""), "save_guidance_scale": (0.0, None, ""),
    "lr_power": (0.0, None, "("), "offset_noise_strength": (0.0, None, ""), "snr_gamma": (0.0, None, "("),
    "logit_std": (0.0, None, "("), "mode_scale": (0.0, None, ""),
    "guidance_scale": (0.0, None, ""), "max_sequence_length": (1, MAX_SEQUENCE_LENGTH, ""),
}
_NONNEGATIVE_INTS = ("lr_warmup_steps", "num_class_images", "save_min_steps", "save_infer_steps",
                     "num_train_epochs", "lr_num_cycles", "dataloader_num_workers", "num_validation_images")


def number_problems(cfg: TrainConfig) -> list[str]:
    """Numeric flags that are not finite or out of range (`--learning_rate -1`, `nan`)."""
    import math

    problems = []
    for name, (low, high, open_) in _NUMBER_RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        above = value > low if "(" in open_ else value >= low
        below = high is None or (value < high if ")" in open_ else value <= high)
        if not (math.isfinite(value) and above and below):
            bound = f"{'above' if '(' in open_ else 'at least'} {low:g}"
            if high is not None:
                bound += f" and {'below' if ')' in open_ else 'at most'} {high:g}"
            problems.append(f"--{name} {value}: must be a finite number {bound}.")
    for name in _NONNEGATIVE_INTS:
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} {getattr(cfg, name)}: cannot be negative.")
    if cfg.log_interval < 1 or cfg.validation_steps < 1:
        problems.append("--log_interval and --validation_steps must be at least 1.")
    return problems + _evaluation_problems(cfg) + _flow_matching_problems(cfg)


def _flow_matching_problems(cfg: TrainConfig) -> list[str]:
    """The flow-matching flags given without the parser (notebook, tests)."""
    import math

    problems = []
    if not math.isfinite(cfg.logit_mean):
        problems.append(f"--logit_mean {cfg.logit_mean}: must be a finite number (0 is typical).")
    for name, choices in (("weighting_scheme", WEIGHTING_SCHEMES), ("quantize_base", QUANTIZE_BASE)):
        if getattr(cfg, name) not in choices:
            problems.append(f"--{name} {getattr(cfg, name)}: choose one of {', '.join(choices)}.")
    return problems


def _evaluation_problems(cfg: TrainConfig) -> list[str]:
    """The held-out share and the scoring flags."""
    import math

    problems = []
    if not (math.isfinite(cfg.validation_split) and 0 <= cfg.validation_split < 1):
        problems.append(f"--validation_split {cfg.validation_split}: give a share from 0 up to (not "
                        "including) 1, e.g. 0.1.")
    for flag in ("best_step_tolerance", "drift_tolerance"):
        value = getattr(cfg, flag)
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"--{flag} {value}: must be 0 or more (0.05 is typical).")
    if cfg.eval_num_samples < 1:
        problems.append("--eval_num_samples must be at least 1.")
    if cfg.score_saves and not (cfg.eval_prompts or cfg.save_sample_prompt or cfg.instance_prompt):
        problems.append("--score_saves needs a prompt to score: give --save_sample_prompt (the samples are "
                        "scored for likeness) or --eval_prompts.")
    if cfg.score_saves:
        from dbtools.after.evaluate import EvaluateError, check_score_model_name

        for flag, name in (("--likeness_model", cfg.likeness_model), ("--clip_model", cfg.clip_model)):
            try:
                check_score_model_name(name, flag)
            except EvaluateError as exc:
                problems.append(str(exc))
    return problems


def _diffusers_flag_problems(cfg: TrainConfig) -> list[str]:
    """diffusers-only flags given in a way this project cannot honour."""
    problems = [f"--{name} is for DeepFloyd IF upscaler training, which this project does not do "
                "(Stable Diffusion 1.x/2.x only). Drop the flag." for name in DEEPFLOYD_ONLY
                if getattr(cfg, name)]
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"--lr_scheduler {cfg.lr_scheduler}: choose one of {', '.join(LR_SCHEDULERS)}.")
    if cfg.lr_scheduler == "piecewise_constant" and not cfg.lr_step_rules:
        problems.append("--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. "
                        "'1:100,0.1:200,0.01' (multiplier:until_step, ..., final multiplier).")
    if cfg.output_layout not in OUTPUT_LAYOUTS:
        problems.append(f"--output_layout {cfg.output_layout}: choose shivam or diffusers.")
    return problems


def report_trackers(report_to: str | None) -> list[str]:
    """The trackers `--report_to` names: [] for none, both for "all"."""
    if not report_to or report_to == "none":
        return []
    return ["tensorboard", "wandb"] if report_to == "all" else [report_to]

