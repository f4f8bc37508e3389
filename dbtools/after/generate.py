"""Inference: generate images with a trained model, save them with their settings, and a
Gradio UI over the same function.

Each image gets its own seed, so image `i` of a call is reproduced by `seed=seed+i,
num_images=1`; saved PNGs carry their settings in text metadata (AUTOMATIC1111's
`parameters`, a `dbtools` JSON chunk and one key per setting). `reproduce` makes an image
again from the settings in its PNG; training draws its samples through `generate` too, so a
sample and `python -m dbtools generate --from_png SAMPLE` are the same computation.
Importing this module has no side effects; torch, diffusers and gradio are imported on use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbtools.core import env
from dbtools.core.atomic import atomic_save_image
from dbtools.core.errors import UserError, reports_user_errors
from dbtools.core.redact import public_settings
from dbtools.families import models as family_models
from dbtools.families.models import (
    A1111_SAMPLERS,
    SCHEDULERS,
    is_checkpoint_folder,
    is_lora_weights_folder,
    make_scheduler,
    pipeline_family,
    prompt_kwargs,
    scheduler_key,
)
from dbtools.families.quantize import quantization_of

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

logger = logging.getLogger(__name__)

@dataclass
class Generated:
    """One generated image with the settings that reproduce it."""

    image: Image.Image
    settings: dict[str, Any]
    path: Path | None = None


MAX_SIDE = 4096
"""The largest width or height generated (as training's largest `--resolution`)."""
MAX_PROMPT_CHARS = 10_000
"""The longest prompt taken: the text encoders read only the first 77 tokens (about 300
characters); anything far longer is a pasted file, not a prompt."""
MAX_SEED = 2**64 - 1
"""The largest seed a torch generator takes."""


def check_generation_args(num_images: int, steps: int, guidance_scale: float,
                          height: int | None, width: int | None, *, seed: int | None = None,
                          prompts: dict[str, str | None] | None = None) -> None:
    """Raise one clear `UserError` (a `ValueError`) for settings the pipeline cannot use: the
    same ranges for flags, the Gradio form and settings read from a PNG. `prompts` maps a
    setting's name (`prompt`, `negative_prompt`) to its text."""
    import math

    problems = []
    if int(num_images) < 1:
        problems.append(f"num_images={num_images}: generate at least 1 image.")
    if int(steps) < 1:
        problems.append(f"steps={steps}: use at least 1 inference step (20-50 is typical).")
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        problems.append(f"guidance_scale={guidance_scale}: use a finite number, 0 or more (7.5 is typical).")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (int(v) < 8 or int(v) % 8 or int(v) > MAX_SIDE):
            problems.append(f"{name}={v}: use a multiple of 8 from 8 to {MAX_SIDE} (e.g. 512 or 768).")
    if seed is not None and int(seed) + int(num_images) - 1 > MAX_SEED:
        problems.append(f"seed={seed}: use a seed from 0 to {MAX_SEED} (image i takes seed+i), or -1 for a "
                        "random one.")
    for name, text in (prompts or {}).items():
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            problems.append(f"{name} of {len(text):,} characters: at most {MAX_PROMPT_CHARS:,} are taken (the text "
                            "encoder reads only its first 77 tokens, about 300 characters). Shorten it.")
    if problems:
        raise UserError(" ".join(problems))


def load_inference_pipeline(pipe_or_path, scheduler: str | None = None, quantize_base: str | None = None):
    """A pipeline ready to generate: `pipe_or_path` as is, or loaded on the best device (its
    denoiser quantized with `quantize_base` "nf4" or "int8")."""
    if not isinstance(pipe_or_path, (str, os.PathLike)):
        return pipe_or_path

    device = family_models.pick_device()
    dtype = family_models.model_inference_dtype(pipe_or_path, device)
    pipe = family_models.load_pipeline(os.fspath(pipe_or_path), device=device, torch_dtype=dtype,
                         scheduler=scheduler, quantize=None if quantize_base in (None, "none") else quantize_base)
    pipe.set_progress_bar_config(leave=False, desc="generating")
    return pipe


def generation_settings(pipe, prompt: str, negative_prompt: str, seed: int, steps: int,
                        guidance_scale: float, width: int, height: int, scheduler: str | None) -> dict:
    """The settings recorded with a generated image. `scheduler` is the name `--scheduler`
    takes (the pipeline's own scheduler's name when none was chosen)."""
    used = scheduler or type(pipe.scheduler).__name__
    quantized = quantization_of(getattr(pipe, "transformer", None) or getattr(pipe, "unet", None))
    return dict(prompt=prompt, negative_prompt=negative_prompt, seed=int(seed), steps=int(steps),
                guidance_scale=float(guidance_scale), scheduler=scheduler_key(used) or used,
                width=int(width), height=int(height), model=str(getattr(pipe, "name_or_path", "") or ""),
                **({"quantize_base": quantized} if quantized else {}))


def sampler_name(scheduler: str) -> str:
    """AUTOMATIC1111's name for a scheduler ("Euler a", "DPM++ 2M", "DDIM"); unknown names as given."""
    return A1111_SAMPLERS.get(scheduler_key(scheduler) or "", scheduler)


def a1111_parameters(s: dict) -> str:
    """Settings in AUTOMATIC1111's `parameters` text, which its PNG Info tab reads."""
    lines = [s["prompt"]]
    if s["negative_prompt"]:
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    lines.append(f"Steps: {s['steps']}, Sampler: {sampler_name(s['scheduler'])}, CFG scale: {s['guidance_scale']}, "
                 f"Seed: {s['seed']}, Size: {s['width']}x{s['height']}, Model: {s['model']}")
    return "\n".join(lines)


PNG_SETTING_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler")
"""Settings also stored as separate PNG text keys; each value is what `generate`'s flag of
the same name takes."""
OPTIONAL_PNG_KEYS = ("quantize_base",)
"""Settings stored only when they apply: the quantized base ("nf4", "int8") a sample was made on."""


def png_metadata(settings: dict):
    """PNG text chunks: `parameters` (AUTOMATIC1111 style), `dbtools` (JSON) and one key
    per entry of `PNG_SETTING_KEYS`; a token pasted into a prompt is not shared with the image."""
    from PIL.PngImagePlugin import PngInfo

    settings = public_settings(settings)
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(settings))
    info.add_text("dbtools", json.dumps(settings, ensure_ascii=False))
    for key in PNG_SETTING_KEYS + tuple(k for k in OPTIONAL_PNG_KEYS if k in settings):
        info.add_itxt(key, str(settings[key]))
    return info


def _next_index(out_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def generate(
    pipe_or_path,
    prompt: str,
    negative_prompt: str = "",
    num_images: int = 1,
    guidance_scale: float = 7.5,
    steps: int = 30,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    scheduler: str | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 4,
    quantize_base: str | None = None,
) -> list[Generated]:
    """Generate images; each gets its own seed (`seed`, `seed+1`, ...), so image `i` is
    reproduced by `seed=seed+i, num_images=1`. A `None` or negative seed draws a random one.

    With `out_dir`, each image is saved atomically as `<n>-<seed>.png` (never replacing a
    file) with its settings in PNG text metadata. Returns images, settings and paths.
    `quantize_base` quantizes the denoiser of a model loaded from a path.
    """
    import torch

    check_generation_args(num_images, steps, guidance_scale, height, width, seed=seed,
                          prompts={"prompt": prompt, "negative_prompt": negative_prompt})
    pipe = load_inference_pipeline(pipe_or_path, scheduler, quantize_base)
    first = secrets.randbelow(2**31) if seed is None or int(seed) < 0 else int(seed)
    seeds = [first + i for i in range(int(num_images))]
    results: list[Generated] = []
    # A pipeline loaded from a path already has the scheduler; a given one is changed for this call only.
    with _scheduler(pipe, scheduler if pipe is pipe_or_path else None):
        # A stochastic sampler draws its per-step noise from one generator for the whole
        # batch, so only one image per call keeps image i reproducible by its seed alone.
        size = 1 if _stochastic(pipe.scheduler) else max(1, batch_size)
        for start in range(0, len(seeds), size):
            chunk = seeds[start:start + size]
            images = pipe(**prompt_kwargs(pipe, prompt, negative_prompt), num_images_per_prompt=len(chunk),
                          guidance_scale=guidance_scale, num_inference_steps=int(steps), height=height,
                          width=width, generator=[torch.Generator("cpu").manual_seed(s) for s in chunk]).images
            for s, img in zip(chunk, images):
                settings = generation_settings(pipe, prompt, negative_prompt, s, steps, guidance_scale,
                                               img.width, img.height, scheduler)
                results.append(Generated(img, settings))
    if out_dir is not None:
        _save_generated(results, Path(out_dir))
    return results


def _stochastic(scheduler) -> bool:
    """True for samplers that add fresh noise at each step (Euler a, DPM++ SDE, DDPM, ...)."""
    name = type(scheduler).__name__
    return "Ancestral" in name or "SDE" in name or name == "DDPMScheduler" \
        or getattr(scheduler.config, "algorithm_type", "").startswith("sde")


@contextlib.contextmanager
def _scheduler(pipe, name: str | None):
    """Use scheduler `name` (None: the pipeline's own) for the duration; the caller's
    pipeline gets its original scheduler back afterwards, even after an error."""
    if not name:
        yield
        return

    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


def _save_generated(results: list[Generated], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    n = _next_index(out_dir)
    for g in results:
        path = out_dir / f"{n:05d}-{g.settings['seed']}.png"
        while path.exists():
            n += 1
            path = out_dir / f"{n:05d}-{g.settings['seed']}.png"
        save_image(g, path)
        n += 1
    logger.info("saved %d image(s) to %s", len(results), out_dir)


def generate_images(pipe_or_path, prompt: str, *args, **kwargs) -> list:
    """`generate` (same arguments), returning what a caller keeps: the saved PNG paths
    when `out_dir` is given, else the PIL images."""
    return [g.image if g.path is None else g.path for g in generate(pipe_or_path, prompt, *args, **kwargs)]


def read_png_settings(path: str | os.PathLike) -> dict:
    """The settings `generate` stored in a PNG (empty when it has none)."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.info.get("dbtools")
    return json.loads(text) if text else {}


_SETTING_TYPES = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance_scale": float,
                  "width": int, "height": int, "scheduler": str, "quantize_base": str}


def settings_from_png(path: str | os.PathLike) -> dict:
    """The `generate` arguments stored in a PNG (`PNG_SETTING_KEYS`, typed as its flags take
    them), so `generate(model, **settings_from_png(png))` makes that image again.

    Reads the separate PNG keys, else the `dbtools` JSON chunk. A file that is not a PNG
    with these settings raises `UserError` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            info = dict(img.info)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{path}: cannot read this image ({exc}); give a PNG saved by generate or training.") from None
    stored = {**(_json_settings(info.get("dbtools"))), **{k: info[k] for k in PNG_SETTING_KEYS if k in info}}
    missing = [k for k in PNG_SETTING_KEYS if k not in stored]
    if missing:
        raise UserError(f"{path}: no stored {', '.join(missing)}; only PNGs saved by generate or by training "
                        "(samples/) carry their settings.")
    try:
        return {k: _SETTING_TYPES[k](stored[k]) for k in PNG_SETTING_KEYS + OPTIONAL_PNG_KEYS if k in stored}
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: a stored setting is not readable ({exc}).") from None


def _json_settings(text) -> dict:
    try:
        settings = json.loads(text) if text else {}
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}


def reproduce(pipe_or_path, png: str | os.PathLike) -> Generated:
    """The image in `png` made again with `pipe_or_path` from the settings stored in it:
    one image, its own seed, its scheduler by name. On the same weights, on a CPU in
    float32, the pixels are identical; half precision on a GPU differs slightly."""
    return generate(pipe_or_path, num_images=1, batch_size=1, **settings_from_png(png))[0]


def save_image(result: Generated, path: str | os.PathLike) -> Path:
    """Save one generated image atomically at `path` with its settings in the PNG's text."""
    result.path = atomic_save_image(result.image, Path(path), pnginfo=png_metadata(result.settings))
    return result.path


DEFAULT_SCHEDULER = "model default"


def scheduler_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for a scheduler menu: one per scheduler, AUTOMATIC1111's names."""
    return [(DEFAULT_SCHEDULER, DEFAULT_SCHEDULER)] + [(f"{A1111_SAMPLERS[k]} ({k})", k) for k in SCHEDULERS]


def build_gradio_app(pipe_or_path, out_dir: str | os.PathLike | None = None, *,
                     defaults: dict[str, Any] | None = None, check: Callable[[], None] | None = None):
    """A `gradio.Blocks` app for generating images with one model.

    Fields: prompt, negative prompt, number of images, guidance, steps, width, height
    (0 = the model's size), seed (-1 = random) and scheduler, starting from `defaults`
    (`generate_images`' argument names). The gallery serves the saved PNGs, settings
    included, named `<index>-<seed>.png` (in `out_dir`, or a temporary folder when it is
    None). `check()` runs before each generation and may raise `UserError` (e.g. the
    model was retrained). Wrong values come back to the page as their message. The API
    name of the generate action is `/generate`. Launch with `launch_gradio(app)`.
    """
    import gradio as gr

    pipe = load_inference_pipeline(pipe_or_path)
    run = _gradio_action(pipe, out_dir, check)
    size = pipeline_family(pipe).pipeline_size(pipe)
    d = {"prompt": "", "negative_prompt": "", "num_images": 1, "guidance_scale": 7.5, "steps": 30, "width": 0,
         "height": 0, "seed": -1, "scheduler": DEFAULT_SCHEDULER, **(defaults or {})}

    with gr.Blocks(title="dbtools: generate") as app:
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(value=d["prompt"], label="Prompt", lines=2)
                negative = gr.Textbox(value=d["negative_prompt"], label="Negative prompt", lines=1)
                with gr.Row():
                    n = gr.Slider(1, 8, value=min(max(int(d["num_images"]), 1), 8), step=1, label="Images")
                    guidance = gr.Slider(0, 20, value=d["guidance_scale"], step=0.5, label="Guidance scale")
                    steps = gr.Slider(1, 150, value=d["steps"], step=1, label="Steps")
                with gr.Row():
                    width = gr.Number(value=d["width"] or 0, precision=0, label=f"Width (multiple of 8; 0 = {size})")
                    height = gr.Number(value=d["height"] or 0, precision=0, label=f"Height (multiple of 8; 0 = {size})")
                with gr.Row():
                    seed = gr.Number(value=d["seed"], precision=0, label="Seed (-1 = random)")
                    scheduler = gr.Dropdown(scheduler_choices(), value=d["scheduler"] or DEFAULT_SCHEDULER,
                                            label="Scheduler")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Images")
                saved = gr.Textbox(label="Saved files", lines=2)
        button.click(run, [prompt, negative, n, guidance, steps, width, height, seed, scheduler],
                     [gallery, saved], api_name="generate")
    return app


def _gradio_action(pipe, out_dir: str | os.PathLike | None, check: Callable[[], None] | None = None):
    """The app's generate action: UI values in, (saved PNG paths with captions, saved paths
    text) out; a user's mistake (or `check()`'s `UserError`) becomes `gr.Error` with its
    message. A size of 0 (or empty) is the model's own."""
    import tempfile

    import gradio as gr

    lock = threading.Lock()
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dbtools-gradio-"))

    def run(prompt, negative, n, guidance, steps, width, height, seed, scheduler):
        try:
            if check is not None:
                check()
            with lock:  # one pipeline, one request at a time
                results = generate(pipe, prompt, negative or "", int(n), float(guidance), int(steps),
                                   int(height or 0) or None, int(width or 0) or None,
                                   None if seed is None else int(seed),
                                   None if scheduler in (None, "", DEFAULT_SCHEDULER) else scheduler, folder)
        except (ValueError, UserError) as exc:
            raise gr.Error(str(exc)) from None
        gallery = [(str(g.path), f"seed {g.settings['seed']}") for g in results]
        saved = "\n".join(str(g.path) for g in results) if out_dir is not None \
            else "(not kept: no output folder; download from the gallery)"
        return gallery, saved

    return run


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`"user:password"` -> `("user", "password")`; empty -> None; `UserError` otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("Gradio login: write it as user:password (in the form field or $GRADIO_AUTH).")
    return user, password


def launch_gradio(app, share: bool | None = None, auth: str | None = None, height: int = 800,
                  **launch_kwargs):
    """Launch the app; `share` (a public link) defaults to True in Colab, False elsewhere.

    `auth` ("user:password", else `$GRADIO_AUTH`) asks for a login; a public link is
    announced as public. `$GRADIO_SHARE=true` asks for one outside Colab; Gradio's own
    lines (which point at `launch()` code the notebook's user never sees) are replaced by
    one of ours. `height` is the notebook frame's, tall enough for the whole form.
    """
    if share is None:
        share = env.in_colab() or os.environ.get("GRADIO_SHARE", "").strip().lower() in ("1", "true")
    login = parse_auth(auth if auth is not None and auth.strip() else os.environ.get("GRADIO_AUTH"))
    if share:
        logger.warning("The Gradio UI gets a PUBLIC gradio.live link: anyone who has the link can use it%s.",
                       " after logging in" if login else " (set a user:password login to restrict it)")
    launched = app.launch(share=share, auth=login, height=height, quiet=True, **launch_kwargs)
    if not env.in_colab():
        logger.info("The UI runs at %s on this machine%s.", getattr(app, "local_url", None), "" if share else (
            "; for a public link (anyone who has it can use the UI) set the environment variable "
            "GRADIO_SHARE=true and run this cell again"))
    return launched


# --------------------------------------------------------------------------- command line


FLAG_DEFAULTS = {"negative_prompt": "", "num_images": 1, "steps": 30, "guidance_scale": 7.5, "width": None,
                 "height": None, "seed": -1, "scheduler": None, "quantize_base": None}
"""The command's defaults; with `--from_png` the PNG's settings come before them."""


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m dbtools generate", allow_abbrev=False, description=(
        "Generate images with a trained model; PNGs are saved with their settings."))
    p.add_argument("--model", required=True,
                   help="a weights folder (e.g. <output_dir>/2000), a checkpoint-<step> folder, a Hub id "
                        "or a .safetensors/.ckpt file")
    p.add_argument("--from_png", default=None, metavar="PNG",
                   help="take prompt, negative prompt, seed, steps, guidance, size and scheduler from a PNG "
                        "saved by generate or training (e.g. <output_dir>/2000/samples/0.png); flags given "
                        "as well win")
    p.add_argument("--prompt", default=None, help="required unless --from_png gives it")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_images", type=int, default=None, help="default 1")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default 30)")
    p.add_argument("--guidance_scale", type=float, default=None, help="default 7.5")
    p.add_argument("--width", type=int, default=None, help="default: the model's size")
    p.add_argument("--height", type=int, default=None, help="default: the model's size")
    p.add_argument("--seed", type=int, default=None, help="image i gets seed+i; -1 (default) picks a random seed")
    p.add_argument("--scheduler", default=None,
                   help="ddim, ddpm, pndm, lms, euler, euler_a, heun, dpm++, dpm++_sde, unipc (or "
                        "AUTOMATIC1111's names such as 'Euler a', 'DPM++ 2M'); default: the model's")
    p.add_argument("--quantize_base", default=None, choices=["none", "nf4", "int8"],
                   help="quantize the model's transformer (bitsandbytes), as a run on a quantized base made its "
                        "samples (default: what --from_png's PNG says, else none)")
    p.add_argument("--out_dir", default="generated", help="where the PNGs go (default: ./generated)")
    return p


def command_settings(args) -> dict:
    """The settings of one command: flags given, else the `--from_png` PNG's, else the defaults."""
    stored = settings_from_png(args.from_png) if args.from_png else {}
    settings = {k: v if (v := getattr(args, k)) is not None else stored.get(k, default)
                for k, default in FLAG_DEFAULTS.items()}
    settings["prompt"] = args.prompt if args.prompt is not None else stored.get("prompt")
    if settings["prompt"] is None:
        raise UserError("give --prompt (or --from_png with a PNG saved by generate or training).")
    return settings


def _check_command_settings(s: dict, from_png: str | None) -> None:
    """`check_generation_args` on a command's settings; the message names the PNG they were read from."""
    try:
        check_generation_args(s["num_images"], s["steps"], s["guidance_scale"], s["height"], s["width"],
                              seed=s["seed"], prompts={k: s[k] for k in ("prompt", "negative_prompt")})
    except UserError as exc:
        if not from_png:
            raise
        raise UserError(f"--from_png {from_png}: settings out of range (edited?): {exc} Fix them in the PNG, or "
                         "give the flag of the same name, which wins over the PNG.") from None


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools generate ...`; settings problems exit 2 with one message."""
    args = build_parser().parse_args(argv)
    s = command_settings(args)
    _check_command_settings(s, args.from_png)
    if s["scheduler"] and scheduler_key(s["scheduler"]) is None:
        raise UserError(f"--scheduler {s['scheduler']}: unknown; see --help for the names.")
    if not (is_checkpoint_folder(args.model) or is_lora_weights_folder(args.model)):
        family_models.check_model_path(args.model)  # a checkpoint or LoRA weights folder is checked as it loads
    # One image per pipeline call, as training draws its samples, so a PNG is reproduced exactly.
    results = generate(args.model, s["prompt"], s["negative_prompt"], s["num_images"], s["guidance_scale"],
                       s["steps"], s["height"], s["width"], s["seed"], s["scheduler"], args.out_dir,
                       batch_size=1 if args.from_png else 4, quantize_base=s["quantize_base"])
    for g in results:
        print(g.path)
    return 0
