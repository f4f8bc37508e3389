"""Which saved step is the good one: scores per step, validation loss, a suggested best step.

- `likeness`: how close samples of the instance prompt are to the instance images: the
  mean over samples of the best cosine similarity between image embeddings of a
  self-supervised vision model (DINOv2 through transformers). 1.0 means every sample has
  an identical twin among the instance images.
- `prompt_fidelity`: CLIP text-image cosine similarity of samples made from "new
  context" prompts (the instance prompt placed in other scenes). It falls when the model
  overfits and every prompt returns the training photos.
- `class_drift`: language drift, DreamBooth's known failure: the likeness of images of the
  class prompt alone ("a dog", "a painting", without the instance token) to the instance
  images. It rises when the class itself starts to look like the subject. Measured only
  when the run has a class prompt; the reference is the base model's value when known,
  else the first scored step's.
- `validation_loss`: the diffusion loss on held-out images at a fixed grid of timesteps
  with fixed noise, so it is comparable across steps and runs (`validation_loss`,
  `dbtools.dataset.split.validation_split` are ready for the training loop).
- `best_step`: a pure rule over the per-step records (see its docstring).

Files: `<output_dir>/metrics.jsonl` gets one line per scored step, and
`<output_dir>/metrics-summary.json` and `<output_dir>/metrics.png` (the curves, best
step marked) are rewritten atomically. `python -m dbtools evaluate --output_dir OUT`
scores every complete `<step>/` weights folder from its samples, generating the rest on
fixed seeds. Importing this module has no side effects; torch and transformers are
imported on use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbtools.after import generate as generation
from dbtools.core.atomic import atomic_save_image, atomic_write_text
from dbtools.core.errors import UserError
from dbtools.dataset import images
from dbtools.dataset.concepts import read_concepts
from dbtools.dataset.images import default_font, list_images, sample_files
from dbtools.families import models as family_models
from dbtools.families.base import Conditioning, ModelFamily, midpoint_grid
from dbtools.train.checkpoints import list_weights
from dbtools.train.config import score_model_problem
from dbtools.train.metrics import append_metrics, read_metrics

logger = logging.getLogger(__name__)

DEFAULT_LIKENESS_MODEL = "facebook/dinov2-small"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
SUMMARY_FILE = "metrics-summary.json"
PLOT_FILE = "metrics.png"
METRICS = ("likeness", "prompt_fidelity", "class_drift", "validation_loss")
CONTEXTS = ("on a beach", "in a snowy forest", "in a city street at night", "as an oil painting")
"""Scenes the default "new context" prompts place the instance prompt in."""


class EvaluateError(UserError):
    """A problem with the evaluation's inputs; the message names the flag or file and the fix."""


# --------------------------------------------------------------------------- models


@dataclass
class ScoreModel:
    """A model and its processor (image processor for DINOv2, full processor for CLIP)."""

    model: Any
    processor: Any
    name: str


def load_likeness_model(name: str = DEFAULT_LIKENESS_MODEL) -> ScoreModel:
    """Load a self-supervised vision model (DINOv2 by default) and its image processor,
    on the CPU in float32, in eval mode. `name` is a Hub id or a local folder."""
    from transformers import AutoImageProcessor, AutoModel

    _check_name(name, "--likeness_model")
    model = _load(lambda: AutoModel.from_pretrained(name), name, "--likeness_model")
    processor = _load(lambda: AutoImageProcessor.from_pretrained(name), name, "--likeness_model")
    return ScoreModel(model.eval(), processor, name)


def load_clip_model(name: str = DEFAULT_CLIP_MODEL) -> ScoreModel:
    """Load a `CLIPModel` and its processor (tokenizer + image processor), on the CPU in
    float32, in eval mode. `name` is a Hub id or a local folder."""
    from transformers import AutoProcessor, CLIPModel

    _check_name(name, "--clip_model")
    model = _load(lambda: CLIPModel.from_pretrained(name), name, "--clip_model")
    processor = _load(lambda: AutoProcessor.from_pretrained(name), name, "--clip_model")
    return ScoreModel(model.eval(), processor, name)


def _check_name(name: str, flag: str) -> None:
    if problem := score_model_problem(name, flag):
        raise EvaluateError(problem)


def _load(load, name: str, flag: str):
    try:
        return load()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvaluateError(f"{flag} {name}: cannot load it ({first}). Check the name, or log in / "
                            "go online once so it is cached.") from exc


# --------------------------------------------------------------------------- scores


@contextlib.contextmanager
def scoring_on(device, *scorers: ScoreModel | None):
    """Move the score models to `device` for the duration, then back to the CPU, so they
    hold no accelerator memory between saves."""
    models = [s.model for s in scorers if s is not None]
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m in models:
            m.to("cpu")


def _device_of(model):
    return next(model.parameters()).device


def image_embeddings(scorer: ScoreModel, images: Sequence, batch_size: int = 16):
    """Unit-length embeddings (one row per PIL image), computed in batches.

    DINOv2 (and any `AutoModel` with a pooled output) gives its pooled CLS token; a
    `CLIPModel` gives its projected image features.
    """
    import torch

    rows = []
    image_processor = getattr(scorer.processor, "image_processor", scorer.processor)
    device = _device_of(scorer.model)
    for start in range(0, len(images), max(1, batch_size)):
        chunk = [im.convert("RGB") for im in images[start:start + max(1, batch_size)]]
        pixels = image_processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
        with torch.inference_mode():
            if hasattr(scorer.model, "get_image_features"):
                out = scorer.model.get_image_features(pixel_values=pixels)
            else:
                out = scorer.model(pixel_values=pixels)
        rows.append(_pooled(out).float())
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1).cpu()


def text_embeddings(scorer: ScoreModel, texts: Sequence[str], batch_size: int = 16):
    """Unit-length CLIP text embeddings, one row per text (truncated to CLIP's length)."""
    import torch

    rows = []
    device = _device_of(scorer.model)
    tokenizer = getattr(scorer.processor, "tokenizer", scorer.processor)
    for start in range(0, len(texts), max(1, batch_size)):
        chunk = list(texts[start:start + max(1, batch_size)])
        tokens = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = scorer.model.get_text_features(input_ids=tokens["input_ids"],
                                                 attention_mask=tokens.get("attention_mask"))
        rows.append(_pooled(out).float())
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1).cpu()


def _pooled(out):
    """The pooled vector of a model output (tensor as is; else `pooler_output`)."""
    return out if hasattr(out, "dim") else out.pooler_output


def likeness(scorer: ScoreModel, samples: Sequence, references, batch_size: int = 16) -> float:
    """Mean over `samples` of the best cosine similarity to any of `references`, with
    `scorer`'s image embeddings. In [-1, 1]; 1.0 when every sample is identical to some
    reference. `references` are PIL images, or their `image_embeddings` computed once
    and reused across saves."""
    if not len(samples) or references is None or not len(references):
        raise EvaluateError("likeness needs at least one sample and one reference image.")
    if not hasattr(references, "dim"):
        references = image_embeddings(scorer, references, batch_size)
    sims = image_embeddings(scorer, samples, batch_size) @ references.T
    return float(sims.max(dim=1).values.mean())


def prompt_fidelity(scorer: ScoreModel, images: Sequence, prompts: Sequence[str], batch_size: int = 16) -> float:
    """Mean CLIP cosine similarity between each image and the prompt it was made from
    (`images[i]` with `prompts[i]`). Higher means the images follow their prompts."""
    if len(images) != len(prompts) or not images:
        raise EvaluateError(f"prompt_fidelity needs one prompt per image (got {len(images)} images "
                            f"and {len(prompts)} prompts).")
    img = image_embeddings(scorer, images, batch_size)
    txt = text_embeddings(scorer, prompts, batch_size)
    return float((img * txt).sum(dim=1).mean())


def default_eval_prompts(instance_prompt: str) -> list[str]:
    """"New context" prompts: the instance prompt placed in a few other scenes."""
    base = instance_prompt.strip().rstrip(",.")
    return [f"{base} {where}" for where in CONTEXTS]


# --------------------------------------------------------------------------- validation


def validation_timesteps(num_train_timesteps: int, count: int = 4) -> list[int]:
    """A fixed grid of `count` timesteps: the midpoints of equal slices of the schedule."""
    if count < 1:
        raise EvaluateError(f"validation timesteps: use at least 1 (got {count}).")
    return midpoint_grid(num_train_timesteps, count)


def validation_loss(denoiser, latents, cond: Conditioning, noise_scheduler, *, family: ModelFamily,
                    seed: int = 0, num_timesteps: int = 4) -> float:
    """The diffusion loss of `denoiser` on `latents` (as the denoiser sees them) under `cond`,
    averaged over the family's fixed grid of timesteps (`ModelFamily.validation_timesteps`)
    with fixed noise.

    The noise comes from its own generator seeded with `seed`, so the global random state
    (and with it the training run) is untouched, and two calls with the same inputs and
    seed give the same number. Noisy input, target and the model call are the family's.
    """
    import torch
    import torch.nn.functional as F

    if num_timesteps < 1:
        raise EvaluateError(f"validation timesteps: use at least 1 (got {num_timesteps}).")
    gen = torch.Generator("cpu").manual_seed(int(seed))
    losses = []
    with torch.no_grad():
        for t in family.validation_timesteps(noise_scheduler, num_timesteps):
            noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32)
            noise = noise.to(latents.device, latents.dtype)
            timesteps = torch.full((latents.shape[0],), t, device=latents.device)
            noisy = family.noisy(noise_scheduler, latents, noise, timesteps)
            target = family.target(noise_scheduler, latents, noise, timesteps)
            pred = family.predict(denoiser, noisy, timesteps, cond)
            losses.append(F.mse_loss(pred.float(), target.float()).item())
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- best step


def best_step_rule(tolerance: float, loss_tolerance: float, drift_tolerance: float = 0.05) -> str:
    """The rule `best_step` applies, in words (stored in the summary)."""
    return (f"highest likeness among steps whose prompt_fidelity is at least the reference's minus "
            f"{tolerance:g}, whose class_drift is at most the reference's plus {drift_tolerance:g} "
            f"(references: the base model's when known, else the first scored step's) and "
            f"whose validation_loss is at most {1 + loss_tolerance:g} x the lowest validation_loss up to "
            f"that step; a missing score does not exclude a step; ties go to the earliest step")


def best_step(per_step: Sequence[dict], tolerance: float = 0.05, base_fidelity: float | None = None,
              loss_tolerance: float = 0.01, drift_tolerance: float = 0.05,
              base_drift: float | None = None) -> int | None:
    """Suggest the best saved step from per-step records (`step` and any of `likeness`,
    `prompt_fidelity`, `class_drift`, `validation_loss`).

    A step is eligible when (a) its prompt fidelity has not fallen more than `tolerance`
    below the reference fidelity (`base_fidelity`, else the earliest step's), (b) its class
    drift has not risen more than `drift_tolerance` above the reference drift (`base_drift`,
    else the earliest step's), and (c) its validation loss has not risen: at most
    `(1 + loss_tolerance)` times the lowest loss of any step up to it. A step missing a
    score is not excluded by that score.
    Among eligible steps the highest likeness wins (steps without likeness rank below
    those with it); ties go to the earliest step, the one least likely to be overfit.
    Returns None when no step is eligible or there are no records.
    """
    rows = sorted((r for r in per_step if r.get("step") is not None), key=lambda r: int(r["step"]))
    reference = base_fidelity if base_fidelity is not None else _first(rows, "prompt_fidelity")
    drift_reference = base_drift if base_drift is not None else _first(rows, "class_drift")
    eligible, lowest = [], math.inf
    for r in rows:
        loss = r.get("validation_loss")
        if loss is not None:
            lowest = min(lowest, loss)
        fid = r.get("prompt_fidelity")
        fid_ok = fid is None or reference is None or fid >= reference - tolerance
        loss_ok = loss is None or loss <= lowest * (1 + loss_tolerance) + 1e-12
        drift = r.get("class_drift")
        drift_ok = drift is None or drift_reference is None or drift <= drift_reference + drift_tolerance
        if fid_ok and loss_ok and drift_ok:
            eligible.append(r)
    if not eligible:
        return None
    # max() keeps the first of equal keys, and `eligible` is in step order: earliest wins ties.
    best = max(eligible, key=lambda r: (r.get("likeness") is not None, r.get("likeness") or 0.0))
    return int(best["step"])


def _first(rows: Sequence[dict], key: str):
    return next((r[key] for r in rows if r.get(key) is not None), None)


# --------------------------------------------------------------------------- files


def summarize(per_step: Sequence[dict], tolerance: float = 0.05, base_fidelity: float | None = None,
              loss_tolerance: float = 0.01, drift_tolerance: float = 0.05, base_drift: float | None = None) -> dict:
    """The summary written to `metrics-summary.json`: best step, the rule, the records."""
    summary = {"best_step": best_step(per_step, tolerance, base_fidelity, loss_tolerance, drift_tolerance,
                                      base_drift),
               "rule": best_step_rule(tolerance, loss_tolerance, drift_tolerance),
               "tolerance": tolerance, "base_fidelity": base_fidelity,
               "drift_tolerance": drift_tolerance, "base_drift": base_drift, "per_step": list(per_step)}
    return summary


def suggested_step(output_dir: str | os.PathLike) -> int | None:
    """The `best_step` of `<output_dir>/metrics-summary.json`; None when there is no summary,
    it suggests none, or it cannot be read (then with a warning naming the file)."""
    path = Path(output_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text(encoding="utf-8")).get("best_step")
        return None if best is None else int(best)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("%s: unreadable (%s); no suggested step", path, exc)
        return None


def write_summary(output_dir: str | os.PathLike, summary: dict) -> Path:
    """Write `<output_dir>/metrics-summary.json` atomically."""
    return atomic_write_text(Path(output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


# --------------------------------------------------------------------------- plot

PLOT_WIDTH, PANEL_HEIGHT, MARGIN = 720, 170, 56
COLORS = {"likeness": (40, 110, 200), "prompt_fidelity": (40, 150, 70), "class_drift": (150, 60, 170),
          "validation_loss": (200, 80, 40)}
BEST_COLOR = (210, 30, 30)


def plot_curves(per_step: Sequence[dict], best: int | None = None):
    """A PIL image: one panel per score (likeness, prompt fidelity, class drift, validation loss)
    against the step, each with its own scale, the best step marked by a red line."""
    from PIL import Image, ImageDraw


    height = len(METRICS) * PANEL_HEIGHT + 44
    img = Image.new("RGB", (PLOT_WIDTH, height), "white")
    draw = ImageDraw.Draw(img)
    font = default_font(13)
    steps = [int(r["step"]) for r in per_step] or [0]
    lo, hi = min(steps), max(steps)
    x_of = _scale(lo, hi, MARGIN + 10, PLOT_WIDTH - 20)
    for i, key in enumerate(METRICS):
        _draw_panel(draw, font, per_step, key, i * PANEL_HEIGHT + 10, x_of, best)
    axis = len(METRICS) * PANEL_HEIGHT - 24  # the last panel's bottom edge
    for step in step_ticks(steps):
        x = x_of(step)
        draw.line((x, axis, x, axis + 4), fill=(90, 90, 90))
        draw.text((x - 3 * len(str(step)), axis + 5), str(step), fill=(90, 90, 90), font=font)
    title = f"best step: {best}" if best is not None else "best step: none suggested"
    draw.text((MARGIN, height - 18), f"step;  {title}", fill=(0, 0, 0), font=font)
    return img


def step_ticks(steps: Sequence[int], most: int = 8) -> list[int]:
    """The saved steps to label on the step axis: all of them, or `most` spread evenly
    (first and last included)."""
    steps = sorted(set(steps))
    if len(steps) <= most:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (most - 1))] for i in range(most)})


def axis_labels(lo: float, hi: float) -> tuple[str, str | None]:
    """Labels for the top (`hi`) and bottom (`lo`) of a value axis, with as many digits as it
    takes to tell them apart; `(label, None)` when the values are equal (one label, mid-axis)."""
    for digits in range(3, 9):
        top, bottom = f"{hi:.{digits}g}", f"{lo:.{digits}g}"
        if top != bottom:
            return top, bottom
    return top, None


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    mid = (out_lo + out_hi) / 2
    return (lambda v: mid) if hi == lo else (lambda v: out_lo + (v - lo) / span * (out_hi - out_lo))


def _draw_panel(draw, font, per_step, key: str, top: int, x_of, best: int | None) -> None:
    bottom = top + PANEL_HEIGHT - 34
    left, right = MARGIN, PLOT_WIDTH - 10
    draw.rectangle((left, top + 18, right, bottom), outline=(160, 160, 160))
    points = [(int(r["step"]), float(r[key])) for r in per_step if r.get(key) is not None]
    label = key.replace("_", " ")
    if not points:
        draw.text((left, top), f"{label}: not measured", fill=(110, 110, 110), font=font)
        return
    values = [v for _, v in points]
    y_of = _scale(min(values), max(values), bottom - 8, top + 26)
    draw.text((left, top), f"{label}  (min {min(values):.4g}, max {max(values):.4g})",
              fill=COLORS[key], font=font)
    high, low = axis_labels(min(values), max(values))
    if low is None:
        draw.text((4, (top + 18 + bottom) // 2 - 7), high, fill=(90, 90, 90), font=font)
    else:
        draw.text((4, top + 18), high, fill=(90, 90, 90), font=font)
        draw.text((4, bottom - 14), low, fill=(90, 90, 90), font=font)
    if best is not None:
        bx = x_of(best)
        draw.line((bx, top + 18, bx, bottom), fill=BEST_COLOR, width=2)
    xy = [(x_of(s), y_of(v)) for s, v in points]
    if len(xy) > 1:
        draw.line(xy, fill=COLORS[key], width=2)
    for x, y in xy:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLORS[key])


def save_plot(output_dir: str | os.PathLike, per_step: Sequence[dict], best: int | None) -> Path:
    """Write the curves to `<output_dir>/metrics.png` atomically."""
    return atomic_save_image(plot_curves(per_step, best), Path(output_dir) / PLOT_FILE)


# --------------------------------------------------------------------------- the command


@dataclass
class EvalConfig:
    """What `python -m dbtools evaluate` does; the notebook and tests build the same object."""

    output_dir: str
    eval_prompts: list[str] = field(default_factory=list)
    instance_prompt: str | None = None
    instance_data_dir: str | None = None
    likeness_model: str = DEFAULT_LIKENESS_MODEL
    clip_model: str = DEFAULT_CLIP_MODEL
    num_samples: int = 4
    seed: int = 1337
    steps: list[int] | None = None
    tolerance: float = 0.05
    base_fidelity: float | None = None
    rescore: bool = False
    batch_size: int = 16
    class_prompts: list[str] = field(default_factory=list)
    drift_tolerance: float = 0.05
    base_drift: float | None = None


@dataclass
class EvalPlan:
    """Inputs resolved before any model loads."""

    weights: list[tuple[int, Path]]
    instance_prompt: str
    eval_prompts: list[str]
    references: list[Path]
    settings: dict
    class_prompts: list[str] = field(default_factory=list)
    """Class prompts whose images measure `class_drift` (none: not measured)."""


def plan_evaluation(cfg: EvalConfig) -> EvalPlan:
    """Check the inputs and find what to score; raises `EvaluateError` before any model loads."""
    out = Path(cfg.output_dir)
    if not out.is_dir():
        raise EvaluateError(f"--output_dir {out}: no such folder. Give the folder training wrote "
                            "its <step>/ weights folders to.")
    weights = list_weights(out)
    if cfg.steps:
        weights = [(s, p) for s, p in weights if s in set(cfg.steps)]
    if not weights:
        raise EvaluateError(f"--output_dir {out}: no complete <step>/ weights folder"
                            f"{' for --steps ' + str(cfg.steps) if cfg.steps else ''}. Train first, "
                            "or check the path.")
    args = _read_args(weights[-1][1])
    prompt = cfg.instance_prompt or args.get("save_sample_prompt") or args.get("instance_prompt") or ""
    eval_prompts = list(cfg.eval_prompts) or (default_eval_prompts(prompt) if prompt else [])
    if not eval_prompts:
        raise EvaluateError(f"{weights[-1][1] / 'args.json'} names no instance prompt: give "
                            "--instance_prompt or --eval_prompts.")
    settings = {"steps": int(args.get("save_infer_steps") or 20),
                "guidance_scale": float(args.get("save_guidance_scale") or 7.5),
                "size": int(args.get("resolution") or 512)}
    return EvalPlan(weights, prompt, eval_prompts, _references(cfg, args), settings,
                    list(cfg.class_prompts) or _class_prompts(args))


def _read_args(folder: Path) -> dict:
    path = folder / "args.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, OSError):
        logger.warning("%s: unreadable; using the defaults", path)
        return {}


def _from_concepts(args: dict, key: str) -> list:
    """`key` of each concept of the run's `args.json`: from its concepts list when it has one
    (readable), else its single `key` flag."""
    if args.get("concepts_list"):
        try:
            return [getattr(c, key) for c in read_concepts(args["concepts_list"])]
        except UserError as exc:
            logger.warning("%s", exc)
    return [args.get(key)]


def _class_prompts(args: dict) -> list[str]:
    """The run's class prompts from its `args.json` (its concepts list, else `class_prompt`)."""
    return unique_prompts(_from_concepts(args, "class_prompt"))


def unique_prompts(prompts: Sequence[str | None]) -> list[str]:
    """The non-empty prompts, each once, in order."""
    return list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))


def _references(cfg: EvalConfig, args: dict) -> list[Path]:
    """The instance images likeness compares against ([] when none can be found)."""
    if cfg.instance_data_dir:
        folder = Path(cfg.instance_data_dir)
        if not folder.is_dir() or not list_images(folder):
            raise EvaluateError(f"--instance_data_dir {folder}: no images there. Give the folder of "
                                "the images the model was trained on.")
        return list_images(folder)
    folders = _from_concepts(args, "instance_data_dir")
    found = [p for f in folders if f and Path(f).is_dir() for p in list_images(f)]
    if not found:
        logger.warning("no instance images found (args.json); likeness is not measured. "
                       "Give --instance_data_dir to measure it.")
    return found


def reference_embeddings(scorer: ScoreModel, plan: EvalPlan, batch_size: int = 16):
    """The instance images' likeness embeddings, computed once for all saves (None without
    instance images)."""
    if not plan.references:
        return None
    return image_embeddings(scorer, [images.load_rgb(p) for p in plan.references], batch_size)


def score_step(folder: Path, plan: EvalPlan, cfg: EvalConfig, likeness_model: ScoreModel | None,
               clip: ScoreModel, references=None) -> dict:
    """Scores of one weights folder: its saved samples (or generated ones) against the
    instance images (`references`: their embeddings, else loaded from `plan`), and images
    of the eval prompts on fixed seeds against their prompts."""
    samples = [images.load_rgb(p) for p in sample_files(folder)[:cfg.num_samples]]
    pipe = generation.load_inference_pipeline(folder)
    return score_pipeline(pipe, samples, plan, cfg, likeness_model, clip, references)


ONE_IMAGE_PER_CALL_FROM = 1024
"""From this size on, score images are generated one per pipeline call: a batch of SDXL-size
images would need several times the memory of training."""


def score_pipeline(pipe, samples: Sequence, plan: EvalPlan, cfg: EvalConfig, likeness_model: ScoreModel | None,
                   clip: ScoreModel, references=None) -> dict:
    """Scores of the model in `pipe`: `samples` (images of the instance prompt; generated on
    fixed seeds when empty) against the instance images, and `cfg.num_samples` images per
    eval prompt, on the seeds `cfg.seed`, `cfg.seed + 1`, ... at every call, against their
    prompts. Returns `{"likeness": ..., "prompt_fidelity": ...}` (likeness only with a
    likeness model and instance images)."""
    if hasattr(pipe, "set_progress_bar_config"):  # one unlabelled bar per prompt otherwise
        pipe.set_progress_bar_config(disable=True)
    size = plan.settings["size"]
    gen = dict(steps=plan.settings["steps"], guidance_scale=plan.settings["guidance_scale"], height=size, width=size,
               batch_size=1 if size >= ONE_IMAGE_PER_CALL_FROM else cfg.batch_size)
    record: dict = {}
    if likeness_model is not None and plan.references:
        samples = list(samples)
        if not samples and plan.instance_prompt:
            samples = [g.image for g in generation.generate(pipe, plan.instance_prompt, num_images=cfg.num_samples,
                                                            seed=cfg.seed, **gen)]
        if references is None:
            references = reference_embeddings(likeness_model, plan, cfg.batch_size)
        if samples:
            record["likeness"] = likeness(likeness_model, samples, references, cfg.batch_size)
        if plan.class_prompts:
            record["class_drift"] = class_drift(pipe, plan, cfg, likeness_model, references, gen)
    images, prompts = [], []
    for prompt in plan.eval_prompts:
        images += [g.image for g in generation.generate(pipe, prompt, num_images=cfg.num_samples, seed=cfg.seed, **gen)]
        prompts += [prompt] * cfg.num_samples
    record["prompt_fidelity"] = prompt_fidelity(clip, images, prompts, cfg.batch_size)
    return record


def class_drift(pipe, plan: EvalPlan, cfg: EvalConfig, likeness_model: ScoreModel, references, gen: dict) -> float:
    """Likeness to the instance images of `cfg.num_samples` images per class prompt, made on
    the same seeds at every call: how much the class itself has come to look like the subject."""
    images = [g.image for prompt in plan.class_prompts
              for g in generation.generate(pipe, prompt, num_images=cfg.num_samples, seed=cfg.seed, **gen)]
    return likeness(likeness_model, images, references, cfg.batch_size)


@dataclass
class SaveScorer:
    """Scores each weights save of a training run, with the models loaded once.

    Between saves the score models wait on the CPU (`scoring_on`), and the instance images
    are embedded once. `score` appends the step's line to `metrics.jsonl` and rewrites the
    summary and the plot.
    """

    cfg: EvalConfig
    plan: EvalPlan
    likeness_model: ScoreModel | None
    clip: ScoreModel
    references: Any = None

    @classmethod
    def load(cls, cfg: EvalConfig, plan: EvalPlan) -> SaveScorer:
        """Load the score models (likeness only when there are instance images) and embed
        the instance images."""
        likeness_model = load_likeness_model(cfg.likeness_model) if plan.references else None
        scorer = cls(cfg, plan, likeness_model, load_clip_model(cfg.clip_model))
        if likeness_model is not None:
            scorer.references = reference_embeddings(likeness_model, plan, cfg.batch_size)
        return scorer

    def score(self, step: int, pipe, samples: Sequence, device) -> dict:
        """Score the model in `pipe` at `step` (its `samples` for likeness), record it and
        return the step's scores."""
        with scoring_on(device, self.likeness_model, self.clip):
            record = score_pipeline(pipe, samples, self.plan, self.cfg, self.likeness_model, self.clip,
                                    self.references)
        append_metrics(self.cfg.output_dir, {"step": step, **record})
        refresh_summary(self.cfg.output_dir, self.cfg.tolerance, self.cfg.base_fidelity, self.cfg.drift_tolerance,
                        self.cfg.base_drift)
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
        return record


def training_plan(instance_prompt: str, eval_prompts: Sequence[str] | None, references: Sequence[Path],
                  steps: int, guidance_scale: float, size: int,
                  class_prompts: Sequence[str | None] = ()) -> EvalPlan:
    """What a training run scores at each save: the eval prompts (default: the instance prompt
    in new contexts), the instance images it trains on, its class prompts (for the drift) and
    its sample settings."""
    prompts = list(eval_prompts or []) or default_eval_prompts(instance_prompt)
    return EvalPlan([], instance_prompt, prompts, list(references),
                    {"steps": int(steps), "guidance_scale": float(guidance_scale), "size": int(size)},
                    unique_prompts(class_prompts))


def refresh_summary(output_dir: str | os.PathLike, tolerance: float = 0.05,
                    base_fidelity: float | None = None, drift_tolerance: float = 0.05,
                    base_drift: float | None = None) -> dict:
    """Rewrite `metrics-summary.json` and `metrics.png` from `metrics.jsonl`; return the summary.

    The best step is chosen among the scored steps (those with a prompt fidelity, i.e. saved
    weights), so a step that only logged a validation loss is never suggested; `per_step`
    and the plot keep every step."""
    records = read_metrics(output_dir)
    summary = summarize([r for r in records if "prompt_fidelity" in r], tolerance, base_fidelity,
                        drift_tolerance=drift_tolerance, base_drift=base_drift)
    summary["per_step"] = records
    write_summary(output_dir, summary)
    save_plot(output_dir, summary["per_step"], summary["best_step"])
    return summary


def evaluate(cfg: EvalConfig, likeness_model: ScoreModel | None = None, clip: ScoreModel | None = None,
             progress: bool = True) -> dict:
    """Score every complete weights folder not yet scored (all with `rescore`), append
    one metrics line per step, write the summary and the plot; return the summary.

    The score models are loaded once (unless passed in) and are on the best device only
    while a step is scored.
    """
    from tqdm.auto import tqdm


    plan = plan_evaluation(cfg)
    done = {r["step"] for r in read_metrics(cfg.output_dir) if "prompt_fidelity" in r}
    todo = [(s, p) for s, p in plan.weights if cfg.rescore or s not in done]
    if todo:
        if plan.references and likeness_model is None:
            likeness_model = load_likeness_model(cfg.likeness_model)
        clip = clip or load_clip_model(cfg.clip_model)
    references = None
    for step, folder in tqdm(todo, desc="evaluate", unit="step", disable=not progress):
        with scoring_on(family_models.pick_device(), likeness_model, clip):
            if references is None and likeness_model is not None:
                references = reference_embeddings(likeness_model, plan, cfg.batch_size)
            record = score_step(folder, plan, cfg, likeness_model, clip, references)
        append_metrics(cfg.output_dir, {"step": step, **record})
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return refresh_summary(cfg.output_dir, cfg.tolerance, cfg.base_fidelity, cfg.drift_tolerance, cfg.base_drift)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dbtools evaluate", allow_abbrev=False,
                                description="Score each saved step (likeness, prompt fidelity), "
                                            "suggest the best one, plot the curves.")
    p.add_argument("--output_dir", required=True, help="training output folder with <step>/ folders")
    p.add_argument("--eval_prompts", nargs="+", default=[], metavar="PROMPT",
                   help="'new context' prompts for prompt fidelity (default: the instance prompt "
                        f"{', '.join(CONTEXTS)})")
    p.add_argument("--instance_prompt", help="prompt of the samples (default: from args.json)")
    p.add_argument("--instance_data_dir", help="instance images for likeness (default: from args.json)")
    p.add_argument("--likeness_model", default=DEFAULT_LIKENESS_MODEL, help="DINOv2 model (Hub id or folder)")
    p.add_argument("--clip_model", default=DEFAULT_CLIP_MODEL, help="CLIP model (Hub id or folder)")
    p.add_argument("--num_samples", type=int, default=4, help="images per prompt (4)")
    p.add_argument("--seed", type=int, default=1337, help="first seed, the same at every step (1337)")
    p.add_argument("--steps", type=int, nargs="+", help="only these saved steps (default: all)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="how far prompt fidelity may fall below the reference (0.05)")
    p.add_argument("--base_fidelity", type=float, help="the base model's prompt fidelity, if measured")
    p.add_argument("--class_prompts", nargs="+", default=[], metavar="PROMPT",
                   help="class prompts for the class drift (default: from args.json; none: not measured)")
    p.add_argument("--drift_tolerance", type=float, default=0.05,
                   help="how far class drift may rise above the reference (0.05)")
    p.add_argument("--base_drift", type=float, help="the base model's class drift, if measured")
    p.add_argument("--rescore", action="store_true", help="score steps already in metrics.jsonl again")
    p.add_argument("--batch_size", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools evaluate --output_dir OUT`: score the saved steps."""
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        raise EvaluateError(f"--num_samples {args.num_samples}: use 1 or more.")
    summary = evaluate(EvalConfig(**vars(args)))  # a UserError rises to the entry point
    print(f"best step: {summary['best_step']}  ({Path(args.output_dir) / SUMMARY_FILE}, "
          f"{Path(args.output_dir) / PLOT_FILE})")
    return 0
