"""`python -m dbtools demo`: the whole journey, offline, on tiny random models.

It makes a small image set, builds tiny models, auto-captions the images into their
file names, turns the names into caption files and `concepts_list.json`, generates
class images, trains a few steps (samples, a checkpoint, single-file export), and
draws the preview grid. The models are tiny and random: the images and captions are
noise. The point is to show every stage running and where its output goes.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dbtools import tiny
from dbtools.after.preview import run_preview
from dbtools.caption import autocaption
from dbtools.caption.autocaption import CaptionConfig, run_caption
from dbtools.core.atomic import atomic_save_image, atomic_write_text
from dbtools.core.errors import UserError
from dbtools.dataset.concepts import Concept
from dbtools.dataset.extract import ExtractConfig, run_extract

logger = logging.getLogger(__name__)

# (file name, size, colour): names like a camera's, shapes that need bucketing.
SAMPLE_IMAGES = (
    ("IMG_0001.jpg", (96, 64), (220, 40, 40)),
    ("IMG_0002.jpg", (64, 96), (40, 160, 60)),
    ("IMG_0003.png", (80, 80), (40, 70, 200)),
    ("IMG_0004.png", (96, 64), (230, 200, 40)),
    ("IMG_0005.webp", (64, 64), (150, 60, 170)),
    ("IMG_0006.JPG", (72, 96), (250, 140, 30)),
)


DEMO_MARKER = "dbtools-demo.txt"
"""Written first into the demo's folder: a later demo may write there again."""


@dataclass
class DemoConfig:
    """Where the demo writes, and how long it trains."""

    out: str = "dbtools-demo"
    steps: int = 6
    resolution: int = 64
    seed: int = 1337


def sample_image(size: tuple[int, int], color: tuple[int, int, int], seed: int) -> Image.Image:
    """A gradient with a coloured disc and a little noise: varied, deterministic pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, 128)], axis=2)
    disc = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (min(w, h) / 3) ** 2
    base[disc] = color
    base += rng.normal(0, 8, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def make_dataset(folder: Path, seed: int) -> list[Path]:
    """Write the sample images (skipping any already there); return their paths."""
    paths = []
    for i, (name, size, color) in enumerate(SAMPLE_IMAGES):
        path = folder / name
        if not path.exists():
            atomic_save_image(sample_image(size, color, seed + i), path)
        paths.append(path)
    return paths


def run_demo(cfg: DemoConfig) -> dict[str, Path]:
    """Run every stage into `cfg.out`; return the main outputs by name.

    Raises `UserError` for a step count below 1, or for an `out` folder that is not empty
    and not an earlier demo's, before anything is written.
    """
    if cfg.steps < 1:
        raise UserError(f"--steps {cfg.steps}: the demo trains, saves and previews at least one "
                        "step; use --steps 1 or more (default 6).")
    out = Path(cfg.out).resolve()
    _check_out(out)
    atomic_write_text(out / DEMO_MARKER, "Written by `python -m dbtools demo`: tiny random models and their outputs.\n")
    started = time.time()
    say = _announcer(started)
    raw, instance, klass = out / "dataset" / "raw", out / "dataset" / "instance", out / "dataset" / "class"
    say(f"1/7 sample images -> {raw}")
    make_dataset(raw, cfg.seed)
    models = _tiny_models(out / "models", say)
    _caption(raw, instance, models["blip"], say)
    concepts_list = _extract(instance, klass, out / "concepts_list.json", say)
    result = _train(cfg, models["sd"], concepts_list, out / "output", say)
    grid = _preview(out / "output", say)
    outputs = {"images": raw, "captioned": instance, "concepts_list": concepts_list,
               "class_images": klass, "weights": result.weights_dir,
               "single_file": result.single_file, "preview": grid}
    say("done. The models are tiny and random, so images and captions are noise; "
        "the stages, files and folders are the real ones.")
    return outputs


def _check_out(out: Path) -> None:
    """Refuse a folder the demo would write into that is not its own: a file, or a folder
    holding anything but an earlier demo's output (a project's `concepts_list.json`...)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file. Give a new folder (or an earlier demo's folder).")
    if not out.is_dir() or _is_earlier_demo(out):
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        raise UserError(f"--out {out} is not empty and holds no earlier demo ({', '.join(entries[:5])}"
                        f"{', ...' if len(entries) > 5 else ''}); the demo would write over files there "
                        "(concepts_list.json, dataset/, output/). Give a new or empty folder.")


def _is_earlier_demo(out: Path) -> bool:
    """The marker, or (a demo from before the marker) its own layout and nothing else."""
    if (out / DEMO_MARKER).is_file():
        return True
    own = {"dataset", "models", "output", "concepts_list.json"}
    names = {p.name for p in out.iterdir()}
    return ((out / "dataset" / "raw" / SAMPLE_IMAGES[0][0]).is_file() and (out / "models" / "sd").is_dir()
            and all(n in own or n.startswith("output-previous-") for n in names))


def _announcer(started: float):
    def say(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    return say


def _tiny_models(folder: Path, say) -> dict[str, Path]:
    say(f"2/7 tiny random models (SD, BLIP) -> {folder}")
    sd = folder / "sd"
    blip = folder / "blip"
    if not (sd / "model_index.json").exists():
        tiny.build_tiny_sd(sd, "sd1")
    if not (blip / "config.json").exists():
        tiny.build_tiny_blip(blip)
    return {"sd": sd, "blip": blip}


def _caption(raw: Path, instance: Path, blip: Path, say) -> None:
    say(f"3/7 auto-caption with BLIP into file names: {raw} -> {instance}")
    cfg = CaptionConfig(img_dir=raw, out_dir=instance, format="filename", model=str(blip),
                        num_beams=2, min_length=3, max_length=8, batch_size=4, num_workers=0)
    summary = run_caption(cfg, autocaption.load_captioner(str(blip)))
    for item in summary.written:
        say(f"    {item.source.name} -> {item.output.name}")
    if summary.failed:
        raise RuntimeError(f"captioning failed for {summary.failed}")


def _extract(instance: Path, klass: Path, concepts_list: Path, say) -> Path:
    say(f"4/7 Omnitool: file names -> caption files, {concepts_list.name}")
    klass.mkdir(parents=True, exist_ok=True)
    concept = Concept(instance_data_dir=str(instance), instance_prompt="sks style",
                      class_prompt="a painting", class_data_dir=str(klass))
    summary = run_extract([concept], ExtractConfig(write_concepts_list=str(concepts_list),
                                                   progress=False))
    for line in summary.describe().splitlines():
        say(f"    {line}")
    return concepts_list


def _train(cfg: DemoConfig, sd: Path, concepts_list: Path, output_dir: Path, say):
    from dbtools.train.loop import TrainConfig, train

    say(f"5/7 class images, then {cfg.steps} training steps -> {output_dir}")
    every = max(1, cfg.steps // 2)
    tcfg = TrainConfig(
        pretrained_model_name_or_path=str(sd), output_dir=str(output_dir),
        concepts_list=str(concepts_list), read_prompts_from_txts=True,
        with_prior_preservation=True, num_class_images=4, sample_batch_size=2,
        resolution=cfg.resolution, train_batch_size=1, train_text_encoder=True,
        learning_rate=1e-4, lr_warmup_steps=0, max_train_steps=cfg.steps, seed=cfg.seed,
        save_interval=every, checkpointing_steps=every, checkpoints_total_limit=1,
        save_sample_prompt="sks style, a castle", n_save_sample=2, save_infer_steps=2,
        save_single_file=True, report_to="tensorboard",
        overwrite_output_dir=True,  # running the demo again moves its earlier run aside
    )
    result = train(tcfg)
    say(f"6/7 weights: {result.weights_dir}; single file: {result.single_file}")
    return result


def _preview(output_dir: Path, say) -> Path:
    grid = run_preview(output_dir)
    say(f"7/7 preview grid of samples across steps: {grid} (its samples are noise: they come from tiny "
        "random models, made to show every stage running, not to draw anything)")
    return grid


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools demo [--out DIR]`: every stage, offline, on tiny models."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m dbtools demo", description=main.__doc__)
    parser.add_argument("--out", default=DemoConfig.out, help="folder for everything the demo writes")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    args = parser.parse_args(argv)
    outputs = run_demo(DemoConfig(out=args.out, steps=args.steps, seed=args.seed))
    print("\nResults:")
    for name, path in outputs.items():
        print(f"  {name:<14} {path}")
    return 0
