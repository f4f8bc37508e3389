"""Class (regularization) images for prior preservation.

For every class folder that holds fewer than `num_class_images` valid images, generate
the missing ones with the base model from the concept's `class_prompt`. What we promise:

- Only images that open count: caption files, OS junk, truncated files and `.tmp-*`
  leftovers do not. Several concepts sharing one class folder fill it once.
- Each image is written atomically as `<index>-<sha1 of its pixels>.jpg` (the name
  Shivam's script uses), so an interrupted run never leaves a partial image.
- With a seed the output is reproducible: image `index` of a class prompt always comes
  from the same generator seed, so a re-run after an interruption makes exactly the
  images the uninterrupted run would have made, and adds only the missing ones.
- The pipeline is loaded (through the loader you pass) only when something is missing.
- A class folder given as an empty string is an error, never the current folder; a
  missing folder is created when its parent exists.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dbtools.core.atomic import atomic_save_image
from dbtools.core.errors import UserError
from dbtools.core.seeds import derived_seed
from dbtools.dataset.concepts import Concept, read_concepts
from dbtools.dataset.images import list_images
from dbtools.families import models as family_models
from dbtools.families.models import inference_dtype, pipeline_family, prompt_kwargs
from dbtools.train.config import view

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95


class ClassGenError(UserError):
    """Class images cannot be generated because of a setting the user can fix."""


@dataclass
class ClassGenConfig:
    """How class images are generated (defaults follow Shivam's train_dreambooth.py)."""

    num_class_images: int = 100
    sample_batch_size: int = 4
    seed: int | None = None
    num_inference_steps: int = 50
    class_guidance_scale: float | None = None
    """Classifier-free guidance; None: the model family's own (7.5 for SD, 3.5 for Flux.1).
    Named apart from training's `--guidance_scale`, which is what a guidance-distilled model's
    embedding is fed while it trains."""
    negative_prompt: str | None = None
    height: int | None = None
    """Image height; None uses the model's native resolution."""
    width: int | None = None
    precision: str | None = None
    """"fp16", "bf16", "fp32" or None (fp16 on CUDA, else fp32); used by `pipeline_loader_for`."""
    show_progress: bool = True


# --------------------------------------------------------------------------- pure rules


def image_seed(seed: int, class_prompt: str, index: int) -> int:
    """The generator seed of image `index` for `class_prompt` (stable across runs and batch sizes)."""
    return derived_seed(seed, class_prompt, index, sep="\0", byteorder="big")


def image_index(path: str | os.PathLike) -> int | None:
    """The index in a `<index>-<sha1>.jpg` name, or None for other names."""
    match = re.match(r"(\d+)-", os.path.basename(os.fspath(path)))
    return int(match.group(1)) if match else None


def free_indices(used: Iterable[int], count: int) -> list[int]:
    """The `count` smallest non-negative integers not in `used`."""
    used, out, i = set(used), [], 0
    while len(out) < count:
        if i not in used:
            out.append(i)
        i += 1
    return out


def batches(items: list, size: int) -> list[list]:
    """`items` in consecutive chunks of at most `size`."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def class_image_name(index: int, image) -> str:
    """Shivam's class image name: `<index>-<sha1 of the RGB pixels>.jpg`."""
    return f"{index}-{hashlib.sha1(image.tobytes()).hexdigest()}.jpg"


def config_problems(cfg: ClassGenConfig) -> list[str]:
    """Settings in `cfg` that cannot work, as messages naming the flag and the fix."""
    problems = []
    if cfg.num_class_images < 0:
        problems.append(f"--num_class_images must be 0 or more, got {cfg.num_class_images}.")
    if cfg.sample_batch_size < 1:
        problems.append(f"--sample_batch_size must be at least 1, got {cfg.sample_batch_size}.")
    if cfg.num_inference_steps < 1:
        problems.append(f"the number of inference steps must be at least 1, got {cfg.num_inference_steps}.")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value is not None and (value < 8 or value % 8):
            problems.append(f"{name} must be a multiple of 8 (e.g. 512), got {value}.")
    return problems


# --------------------------------------------------------------------------- folders


def is_valid_image(path: str | os.PathLike) -> bool:
    """True when `path` decodes completely as an image (truncated or corrupt files do not)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # Pillow raises many types for broken files; all mean "not usable"
        return False


def valid_class_images(folder: str | os.PathLike) -> list[Path]:
    """The images directly in `folder` that open; others are logged as unusable."""
    images = list_images(Path(folder).expanduser())
    valid = [p for p in images if is_valid_image(p)]
    broken = sorted(set(images) - set(valid))
    if broken:
        logger.warning("%s: %d image(s) cannot be opened and are not counted: %s. Remove them; "
                       "training refuses unreadable images.", folder, len(broken),
                       ", ".join(p.name for p in broken[:5]) + (" ..." if len(broken) > 5 else ""))
    return valid


def count_valid_class_images(folder: str | os.PathLike) -> int:
    """How many images directly in `folder` open (a missing folder counts 0)."""
    return len(valid_class_images(folder)) if Path(folder).expanduser().is_dir() else 0


def class_dir_problems(concepts: list[Concept]) -> list[str]:
    """Class folders and prompts that cannot be used, as messages with the fix."""
    problems = []
    for i, concept in enumerate(concepts):
        where = f"concept {i + 1}"
        folder = concept.class_data_dir
        if not isinstance(folder, str) or not folder.strip():
            problems.append(f"{where}: 'class_data_dir' is empty. Set it to the folder for class "
                            "images (an empty path is never taken as the current folder).")
        elif Path(folder).expanduser().is_file():
            problems.append(f"{where}: class_data_dir {folder} is a file, not a folder. Fix the path.")
        elif not Path(folder).expanduser().absolute().parent.is_dir():
            problems.append(f"{where}: class_data_dir {folder}: its parent folder does not exist. "
                            "Fix the path (is Google Drive mounted?) or create the parent folder.")
        if not isinstance(concept.class_prompt, str):
            problems.append(f"{where}: 'class_prompt' must be a string, got {concept.class_prompt!r}.")
    return problems


EMPTY_CLASS_PROMPT_WARNING = (
    "class images: %s needs %d more image(s) and its class prompt is empty, so they are generated "
    "from an empty prompt (the model's unconditional images, as the original notebook's Method 1 "
    "does). For images of your class give a class prompt, e.g. --class_prompt 'a photo of a dog'.")


def _dir_key(folder: str) -> str:
    return os.path.normcase(os.path.realpath(os.path.expanduser(folder)))


def missing_per_concept(concepts: list[Concept], num_class_images: int) -> list[tuple[Concept, int]]:
    """For each distinct class folder, its first concept and how many images it lacks.

    Concepts sharing a class folder are counted once (the folder needs `num_class_images`
    in all, made with the first concept's class prompt).
    """
    seen: dict[str, Concept] = {}
    out = []
    for concept in concepts:
        key = _dir_key(concept.class_data_dir)
        if key in seen:
            if seen[key].class_prompt != concept.class_prompt:
                logger.warning("%s is the class folder of several concepts with different class "
                               "prompts; images are generated for %r", concept.class_data_dir,
                               seen[key].class_prompt)
            continue
        seen[key] = concept
        have = count_valid_class_images(concept.class_data_dir)
        out.append((concept, max(0, num_class_images - have)))
    return out


# --------------------------------------------------------------------------- generation


def plan_class_images(concepts: list[Concept], cfg: ClassGenConfig) -> list[tuple[Concept, list[int]]]:
    """For each distinct class folder, its first concept and the indices of the images it lacks.

    Checks every folder and prompt first (one `ClassGenError` listing all problems) and
    creates missing folders; loads no model and writes no image.
    """
    problems = config_problems(cfg) + class_dir_problems(concepts)
    if problems:
        raise ClassGenError("\n".join(["Cannot generate class images:", *problems]))
    for concept in concepts:
        Path(concept.class_data_dir).expanduser().mkdir(exist_ok=True)
    plan = []
    for concept, missing in missing_per_concept(concepts, cfg.num_class_images):
        used = {image_index(p) for p in valid_class_images(concept.class_data_dir)} - {None} if missing else set()
        plan.append((concept, free_indices(used, missing)))
    return plan


def rank_share(indices: list[int], rank: int, world: int) -> list[int]:
    """The part of `indices` that process `rank` of `world` generates (every index exactly once)."""
    return indices[rank::world]


def ensure_class_images(
    concepts: list[Concept],
    cfg: ClassGenConfig,
    pipeline_loader: Callable[[], object],
    *,
    plan: list[tuple[Concept, list[int]]] | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, int]:
    """Fill every concept's class folder up to `cfg.num_class_images` valid images.

    Checks every folder and prompt first (one `ClassGenError` listing all problems), then
    calls `pipeline_loader()` only if some folder lacks images. With `world` processes,
    process `rank` makes only its share of the missing indices of `plan` (which every
    process must have made before any wrote); together they make what one process would.
    Returns, per class folder, how many images this call generated (0 when it was full).
    """
    plan = plan_class_images(concepts, cfg) if plan is None else plan
    todo = [(concept, rank_share(indices, rank, world)) for concept, indices in plan]
    if rank == 0:  # one warning, not one per process
        for concept, indices in plan:
            if indices and not concept.class_prompt.strip():
                logger.warning(EMPTY_CLASS_PROMPT_WARNING, concept.class_data_dir, len(indices))
    generated = {c.class_data_dir: 0 for c, _ in todo}
    total = sum(len(indices) for _, indices in todo)
    if total == 0:
        logger.info("class images: every class folder already has %d images", cfg.num_class_images)
        return generated
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(31)
    if cfg.seed is None:
        logger.info("class images: no seed given, using seed %d", seed)
    pipe = pipeline_loader()
    _quiet(pipe)
    from tqdm.auto import tqdm

    for concept, indices in todo:  # said before the bar starts, so no line is glued to it
        if indices:
            logger.info("class images: generating %d for %s in %s", len(indices),
                        repr(concept.class_prompt) if concept.class_prompt else "the empty prompt",
                        Path(concept.class_data_dir).expanduser())
    with tqdm(total=total, desc="class images", unit="img", disable=not cfg.show_progress) as bar:
        for concept, indices in todo:
            if indices:
                generated[concept.class_data_dir] = _fill_folder(pipe, concept, indices, seed, cfg, bar)
    del pipe
    _free_accelerator_memory()
    return generated


def _fill_folder(pipe, concept: Concept, indices: list[int], seed: int, cfg: ClassGenConfig, bar) -> int:
    folder = Path(concept.class_data_dir).expanduser()
    written = 0
    for chunk in batches(indices, cfg.sample_batch_size):
        for index, image in zip(chunk, _generate(pipe, concept.class_prompt, chunk, seed, cfg)):
            image = image.convert("RGB")
            atomic_save_image(image, folder / class_image_name(index, image), quality=JPEG_QUALITY)
            written += 1
        bar.update(len(chunk))
    return written


def _generate(pipe, prompt: str, indices: list[int], seed: int, cfg: ClassGenConfig) -> list:
    """One pipeline call for `indices`; each image has its own generator, so batching never
    changes which latents an index starts from."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(image_seed(seed, prompt, i)) for i in indices]
    height, width = _size(pipe, cfg)
    negative = [cfg.negative_prompt] * len(indices) if cfg.negative_prompt else None
    with torch.inference_mode():
        out = pipe(**prompt_kwargs(pipe, [prompt] * len(indices), negative), height=height, width=width,
                   generator=generators, num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=_guidance(pipe, cfg), output_type="pil")
    return out.images


def _guidance(pipe, cfg: ClassGenConfig) -> float:
    """The guidance asked for, else that of the family whose pipeline `pipe` is."""
    if cfg.class_guidance_scale is not None:
        return cfg.class_guidance_scale
    return pipeline_family(pipe).guidance_scale


def _size(pipe, cfg: ClassGenConfig) -> tuple[int, int]:
    """(height, width): the ones asked for, else the pipeline's native size."""
    if cfg.height and cfg.width:
        return cfg.height, cfg.width
    native = pipeline_family(pipe).pipeline_size(pipe)
    return cfg.height or native, cfg.width or native


def _quiet(pipe) -> None:
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- models


PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "no": "float32"}


def precision_dtype(precision: str | None, device: str, model: str | None = None):
    """The torch dtype for generating on `device`: `precision`, or on CUDA the half precision of
    `model`'s family (fp16 by default) / fp32 elsewhere.

    Half precision off CUDA falls back to fp32 with a warning (CPUs cannot run it usefully);
    bf16 on a GPU that only emulates it falls back to fp16 with a warning.
    """
    import torch


    if precision is None:
        return family_models.model_inference_dtype(model, device) if model else inference_dtype(device)
    if precision not in PRECISIONS:
        raise ClassGenError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    dtype = getattr(torch, PRECISIONS[precision])
    if dtype != torch.float32 and not str(device).startswith("cuda"):
        logger.warning("%s needs a CUDA GPU; generating class images in fp32 on %s", precision, device)
        return torch.float32
    if dtype == torch.bfloat16 and not native_bf16():
        logger.warning("this GPU runs bf16 only through slow emulation; generating class images in fp16")
        return torch.float16
    return dtype


def native_bf16() -> bool:
    """Whether the CUDA GPU runs bf16 natively (Ampere or newer).

    Emulated bf16 (a T4) is slow and does not count. With `including_emulation=False`
    torch only reads the device properties and allocates nothing, so asking does not put
    a CUDA context on GPU 0 in a process that accelerate will give another GPU.
    """
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def pipeline_loader_for(
    model_name_or_path: str,
    cfg: ClassGenConfig | None = None,
    *,
    device: str | None = None,
    **load_kwargs,
) -> Callable[[], object]:
    """A loader for `ensure_class_images`: loads the pipeline when called, not before.

    It runs on `device` (default: the best one here) in `cfg.precision`; `load_kwargs`
    (`vae_name_or_path`, `revision`, `variant`, `scheduler`, `config`, ...) go to
    `dbtools.families.models.load_pipeline` as they are.
    """
    def load():
        where = device or family_models.pick_device()
        dtype = precision_dtype(cfg.precision if cfg else None, where, model_name_or_path)
        pipe = family_models.load_pipeline(model_name_or_path, torch_dtype=dtype, device=where, **load_kwargs)
        pipe.vae.enable_slicing()  # a batch is decoded one image at a time: SDXL's 1024 px decode is large
        return pipe

    return load


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m dbtools classgen", description=(
        "Generate the missing class images for prior preservation (only what is missing)."))
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Hub id, diffusers folder or .safetensors/.ckpt file")
    p.add_argument("--concepts_list", help="concepts_list.json; every concept's class folder is filled")
    p.add_argument("--class_data_dir", help="class image folder (instead of --concepts_list)")
    p.add_argument("--class_prompt", help="class prompt, e.g. 'a photo of a dog'")
    p.add_argument("--num_class_images", type=int, default=100)
    p.add_argument("--sample_batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num_inference_steps", "--infer_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance; default the model family's (7.5 SD, 3.5 Flux.1)")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--resolution", type=int, default=None, help="square size; default the model's")
    p.add_argument("--revision", default=None, help="'fp16' selects the fp16 variant on the Hub")
    p.add_argument("--variant", default=None)
    p.add_argument("--pretrained_vae_name_or_path", default=None)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None)
    p.add_argument("--scheduler", default=None, help="sampler: ddim, dpm++, euler, euler_a, pndm, unipc")
    p.add_argument("--config", default=None,
                   help="diffusers folder with the configs of a single-file model (offline)")
    return p


def concepts_from_args(args: argparse.Namespace) -> list[Concept]:
    """The concepts named on the command line (a concepts list, or one class folder + prompt)."""
    if args.concepts_list:
        if args.class_data_dir or args.class_prompt:
            raise ClassGenError("give either --concepts_list or --class_data_dir/--class_prompt, not both.")
        return read_concepts(args.concepts_list)
    if args.class_data_dir is None and args.class_prompt is None:
        raise ClassGenError("give --concepts_list, or --class_data_dir and --class_prompt.")
    return [Concept(instance_data_dir="", class_data_dir=args.class_data_dir or "",
                    class_prompt=args.class_prompt or "")]


def _half(mixed_precision: str | None) -> str | None:
    return mixed_precision if mixed_precision in ("fp16", "bf16") else None


def _skipped(args: argparse.Namespace) -> tuple[str, ...]:
    """Components the model folder need not hold: the VAE when another one is given."""
    return ("vae",) if args.pretrained_vae_name_or_path else ()


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools classgen ...`: fill class folders; user errors rise as `UserError`."""
    args = build_parser().parse_args(argv)
    cfg = view(ClassGenConfig, args, height=args.resolution, width=args.resolution,
               class_guidance_scale=args.guidance_scale,
               precision=args.prior_generation_precision or _half(args.mixed_precision))
    concepts = concepts_from_args(args)
    family_models.check_model_path(args.pretrained_model_name_or_path, skip=_skipped(args))
    loader = pipeline_loader_for(args.pretrained_model_name_or_path, cfg,
                                 vae_name_or_path=args.pretrained_vae_name_or_path,
                                 revision=args.revision, variant=args.variant,
                                 scheduler=args.scheduler, config=args.config)
    made = ensure_class_images(concepts, cfg, loader)
    for folder, n in made.items():
        print(f"{folder}: {n} class image(s) generated, {count_valid_class_images(folder)} in total")
    return 0
