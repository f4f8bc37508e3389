"""Training data: per-image prompts, aspect-ratio buckets, deterministic batches, caches.

What training reads, and how:

- Only real images (`dbtools.dataset.images.list_images`) are read; a concept's prompt for each
  image is its caption file (`<image file>.txt`, else `<stem>.txt` / `<stem>.caption`)
  when `read_prompts_from_txts` is on, optionally combined with the concept's prompts
  through a template; class images use the concept's class prompt.
- Images keep their shape with aspect-ratio buckets (resize to cover the bucket, crop
  the overflow), or are square-cropped at `resolution` as in the original script.
- Which images make up batch `i` is a pure function of `(seed, i)`, and so is every
  random choice made for it (flip, caption dropout/shuffle, crop). A run resumed at
  step `k` therefore sees exactly the batches an uninterrupted run would have seen.
- VAE latents are cached as the distribution (mean, std) and sampled per step; the
  cache can live on disk so a restarted session does not encode again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dbtools.core.atomic import atomic_write
from dbtools.core.seeds import derived_seed
from dbtools.core.textio import CaptionEncodingError, read_caption_file
from dbtools.dataset.captions import apply_template, caption_candidates, clean_caption, template_problems
from dbtools.dataset.concepts import Concept, concept_problems, resolved_against
from dbtools.dataset.images import ImageError, is_skipped_dir, list_images, load_rgb
from dbtools.dataset.split import ValidationSplitError, validation_split
from dbtools.families.detect import add_time_ids
from dbtools.train.checkpoints import training_runs_under

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) in pixels


# --------------------------------------------------------------------------- prompts


def find_caption_file(image: Path) -> Path | None:
    """The first existing caption file of `image` (`dbtools.dataset.captions.caption_candidates`), else None."""
    image = Path(image)
    return next((p for p in map(image.with_name, caption_candidates(image.name)) if _is_file(p)), None)


def _is_file(path: Path) -> bool:
    # `<image name>.txt` of an image whose name is near the 255-byte limit is too long to
    # exist (ENAMETOOLONG): then it is simply not there, and `<stem>.txt` is looked for.
    try:
        return path.is_file()
    except OSError:
        return False


def build_prompt(caption: str, concept: Concept, template: str | None) -> str:
    """The training prompt for one caption: the template filled in, or the caption itself.

    Caption files written by the Omnitool already hold the final prompt, so the
    concept's instance/class prompts are only added when a template is given.
    """
    if not template:
        return caption
    return apply_template(template, caption, concept.instance_prompt, concept.class_prompt)


@dataclass(frozen=True)
class Example:
    """One training image and its prompt; `is_class` marks a prior-preservation image."""

    path: Path
    prompt: str
    is_class: bool = False


@dataclass
class DataPlan:
    """Every example training will use, found and checked before any model loads.

    `validation` holds the held-out images: they never reach a training batch; only the
    validation loss reads them."""

    instance: list[Example]
    classes: list[Example]
    validation: list[Example] = field(default_factory=list)


def concept_instance_examples(concept: Concept, read_prompts_from_txts: bool, template: str | None,
                              exclude_dirs: Sequence[str | os.PathLike] = ()) -> tuple[list[Example], list[str]]:
    """Instance examples of one concept, and a message for every image that cannot be used.

    Images inside any of `exclude_dirs` (class folders, the training output) are never
    instance images, even when those folders lie inside the instance folder.
    """
    examples, problems = [], []
    for path in instance_images(concept.instance_data_dir, exclude_dirs):
        if not read_prompts_from_txts:
            examples.append(Example(path, concept.instance_prompt))
            continue
        caption_file = find_caption_file(path)
        if caption_file is None:
            problems.append(_no_caption_message(path))
            continue
        try:
            caption = clean_caption(read_caption_file(caption_file))
        except CaptionEncodingError as exc:
            problems.append(str(exc))
            continue
        if not caption:
            problems.append(f"{caption_file}: caption file is empty. Write the caption into it or "
                            "remove the image.")
            continue
        examples.append(Example(path, build_prompt(caption, concept, template)))
    return examples, problems


def _no_caption_message(image: Path) -> str:
    """Why `image` has no caption: a caption name taken by a folder, or no caption file at all."""
    folder = next((p for p in map(image.with_name, caption_candidates(image.name)) if p.is_dir()), None)
    if folder is not None:
        return (f"{folder} is a folder, not a caption file. Rename or move that folder and write the caption "
                f"of {image.name} into a file of that name (python -m dbtools extract), or remove the image.")
    return (f"{image}: no caption file (looked for {image.name}.txt, {image.stem}.txt, {image.stem}.caption). "
            "Write one (python -m dbtools extract) or remove the image.")


def with_validation(plan: DataPlan, concepts: Sequence[Concept], *, validation_data_dir: str | None = None,
                    validation_split: float = 0.0, seed: int = 0, read_prompts_from_txts: bool = False,
                    prompt_template: str | None = None) -> tuple[DataPlan, list[str]]:
    """`plan` with its held-out images, and a message for each problem.

    `validation_data_dir` is read like an instance folder (captions with
    `read_prompts_from_txts`, else the first concept's instance prompt); or
    `validation_split` moves a deterministic share of the instance images out of training
    (`dbtools.dataset.split.validation_split`: by file name and `seed`). Giving both is a problem.
    """
    if validation_data_dir and validation_split:
        return plan, ["--validation_data_dir and --validation_split both given: held-out images come "
                      "from one of them. Drop one."]
    if validation_split:
        return _split_off(plan, validation_split, seed)
    if not validation_data_dir:
        return plan, []
    folder = Path(validation_data_dir)
    if not folder.is_dir():
        return plan, [f"--validation_data_dir {folder}: not a folder. Give the folder of held-out images "
                      "(with their caption files), or drop the flag."]
    first = concepts[0] if concepts else Concept("", "")
    concept = Concept(instance_data_dir=str(folder), instance_prompt=first.instance_prompt)
    examples, problems = concept_instance_examples(concept, read_prompts_from_txts,
                                                   prompt_template or first.prompt_template)
    if not examples and not problems:
        problems = [f"--validation_data_dir {folder}: no images there (.jpg .png .webp ...)."]
    problems += unreadable_images([e.path for e in examples])
    return DataPlan(plan.instance, plan.classes, examples), problems


def _split_off(plan: DataPlan, share: float, seed: int) -> tuple[DataPlan, list[str]]:
    try:
        _, held = validation_split([e.path for e in plan.instance], share, seed)
    except ValidationSplitError as exc:
        return plan, [str(exc)]
    held_set = set(held)
    train = [e for e in plan.instance if e.path not in held_set]
    return DataPlan(train, plan.classes, [e for e in plan.instance if e.path in held_set]), []


def instance_images(folder: str | os.PathLike, exclude_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Images under `folder` (recursively), without those inside any of `exclude_dirs` or
    inside a folder holding a training run (`training_runs_under`), wherever it sits.

    The skipped sub-folders are logged, one line each.
    """
    root = Path(folder)
    runs = training_runs_under(root, is_skipped_dir)  # an earlier run's samples are not training images
    inside = list(dict.fromkeys(_subfolders_inside(root, [*exclude_dirs, *runs])))
    images = list_images(root, recursive=True)
    if not inside:
        return images
    kept = [p for p in images if not any(p.relative_to(root).parts[:len(sub)] == sub for sub in inside)]
    for sub in inside:
        logger.info("%s: skipped sub-folder %s (class images or training output are never instance images)",
                    root, os.path.join(*sub))
    return kept


def _subfolders_inside(root: Path, folders: Sequence[str | os.PathLike]) -> list[tuple[str, ...]]:
    """The relative parts of each of `folders` that lies strictly inside `root` (links resolved)."""
    real_root = os.path.realpath(root)
    out = []
    for folder in folders:
        if not os.fspath(folder).strip():
            continue
        rel = os.path.relpath(os.path.realpath(folder), real_root)
        if rel != os.curdir and not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            out.append(Path(rel).parts)
    return out


def same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` name the same folder (links and `..` resolved)."""
    return os.path.realpath(a) == os.path.realpath(b)


def concept_class_examples(concept: Concept, read_prompts_from_txts: bool = False) -> list[Example]:
    """Class (regularization) examples of one concept; a missing folder has none yet.

    Each image's prompt is the class prompt (which may be empty: the original notebook's
    Method 1); with `read_prompts_from_txts`, an image that has a caption file uses it,
    read by the one caption reader (`dbtools.core.textio`) as instance captions are: a file in
    another encoding raises `CaptionEncodingError` (`scan_concepts` lists each one).
    """
    examples, problems = checked_class_examples(concept, read_prompts_from_txts)
    if problems:
        raise CaptionEncodingError("\n".join(problems))
    return examples


def checked_class_examples(concept: Concept, read_prompts_from_txts: bool = False
                           ) -> tuple[list[Example], list[str]]:
    """`concept_class_examples`, and a message for each class caption file that is not
    readable text (`dbtools.core.textio`: named with how to re-save it, never guessed)."""
    folder = Path(concept.class_data_dir)
    if not concept.class_data_dir.strip() or not folder.is_dir():
        return [], []
    examples, problems = [], []
    for path in list_images(folder):
        try:
            examples.append(Example(path, _class_prompt_of(path, concept, read_prompts_from_txts), is_class=True))
        except CaptionEncodingError as exc:
            problems.append(str(exc))
    return examples, problems


def _class_prompt_of(path: Path, concept: Concept, read_prompts_from_txts: bool) -> str:
    caption_file = find_caption_file(path) if read_prompts_from_txts else None
    if caption_file is not None:
        caption = clean_caption(read_caption_file(caption_file))
        if caption:
            return caption
    return concept.class_prompt


def scan_concepts(concepts: Sequence[Concept], *, read_prompts_from_txts: bool = False,
                  prompt_template: str | None = None, with_prior_preservation: bool = False,
                  check_images: bool = True, output_dir: str | os.PathLike | None = None
                  ) -> tuple[DataPlan, list[str]]:
    """Find every example and everything wrong with the data, without loading a model.

    Problems (each naming the file and the fix): wrongly typed concept fields, missing/empty
    instance folders, missing, empty or undecodable caption files, prompts that are empty,
    bad templates, images that do not open (`load_rgb`), an empty class folder path, a
    class folder (with prior preservation) or `output_dir` equal to an instance folder.
    Class folders may be missing or short of images: class images are generated before
    training. Instance images are never taken from inside a class folder or `output_dir`.
    """
    instance, classes, problems = [], [], []
    exclude = [c.class_data_dir for c in concepts if isinstance(c.class_data_dir, str) and c.class_data_dir.strip()]
    exclude += [output_dir] if output_dir else []
    for i, concept in enumerate(concepts):
        where = f"concept {i + 1}"
        if not _well_typed(concept):
            problems += concept_problems(concept, i)
            continue
        template = prompt_template or concept.prompt_template
        bad_template = [f"{where}: {p}" for p in template_problems(template)] if template else []
        problems += bad_template
        folder = Path(concept.instance_data_dir or "")
        if not concept.instance_data_dir.strip() or not folder.is_dir():
            problems.append(f"{where}: instance_data_dir {concept.instance_data_dir!r}"
                            f"{resolved_against(concept.instance_data_dir)} is not a folder. "
                            "Fix the path (is Google Drive mounted?).")
            continue
        mixed = _mixing_problems(concept, where, with_prior_preservation, output_dir)
        problems += mixed
        if bad_template or mixed:
            continue
        found, bad = concept_instance_examples(concept, read_prompts_from_txts, template, exclude)
        problems += bad
        if not found and not bad:
            problems.append(f"{where}: {folder} contains no images (.jpg .png .webp ...). Put the "
                            "training images there or fix the path.")
        if not read_prompts_from_txts and not concept.instance_prompt.strip():
            problems.append(f"{where}: no instance_prompt. Set --instance_prompt (or the concept's "
                            "instance_prompt), or use --read_prompts_from_txts with caption files.")
        instance += found
        if with_prior_preservation:
            problems += _class_problems(concept, where)
            found_classes, bad_captions = checked_class_examples(concept, read_prompts_from_txts)
            classes += found_classes
            problems += bad_captions
    if check_images:
        problems += unreadable_images([e.path for e in instance + classes])
    return DataPlan(instance, classes), problems


def _well_typed(concept: Concept) -> bool:
    fields = (concept.instance_data_dir, concept.instance_prompt, concept.class_prompt, concept.class_data_dir)
    return all(isinstance(v, str) for v in fields) and isinstance(concept.prompt_template, (str, type(None)))


def _mixing_problems(concept: Concept, where: str, with_prior_preservation: bool,
                     output_dir: str | os.PathLike | None) -> list[str]:
    """Folders that would mix class images or training output into the instance images."""
    problems = []
    inst = concept.instance_data_dir
    if with_prior_preservation and concept.class_data_dir.strip() and same_folder(concept.class_data_dir, inst):
        problems.append(f"{where}: class_data_dir and instance_data_dir are the same folder ({inst}): generated "
                        "class images would be written into your training images. Give the class images a "
                        "folder of their own (e.g. a 'class' folder next to the instance folder).")
    if output_dir and same_folder(output_dir, inst):
        problems.append(f"{where}: --output_dir is the instance folder ({inst}): saved samples would become "
                        "training images. Choose another --output_dir.")
    return problems


def _class_problems(concept: Concept, where: str) -> list[str]:
    problems = []
    if not concept.class_data_dir.strip():
        problems.append(f"{where}: prior preservation needs a class_data_dir (a folder for class "
                        "images; it is created and filled if needed). Set --class_data_dir.")
    elif Path(concept.class_data_dir).exists() and not Path(concept.class_data_dir).is_dir():
        problems.append(f"{where}: class_data_dir {concept.class_data_dir} is a file, not a folder. "
                        "Fix the path.")
    return problems


def unreadable_images(paths: Sequence[Path], workers: int = 8) -> list[str]:
    """A message for each image in `paths` that `load_rgb` cannot open (checked in parallel)."""

    def check(path: Path) -> str | None:
        try:
            load_rgb(path)
        except ImageError as exc:
            return str(exc)
        return None

    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
        return [msg for msg in pool.map(check, paths) if msg]


# --------------------------------------------------------------------------- captions per step


def transform_caption(prompt: str, rng: random.Random, *, dropout: float = 0.0,
                      shuffle: bool = False, keep_tokens: int = 0) -> str:
    """Caption dropout (empty prompt with probability `dropout`) and tag shuffling.

    Shuffling reorders the comma-separated parts after the first `keep_tokens` parts,
    which stay in front (e.g. the instance token).
    """
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return prompt
    parts = [p.strip() for p in prompt.split(",") if p.strip()]
    head, tail = parts[:keep_tokens], parts[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


# --------------------------------------------------------------------------- buckets


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[Size]:
    """Bucket sizes of about `resolution`² pixels, sides multiples of `step`, aspect <= `max_ratio`.

    Always includes the square `(resolution, resolution)` (rounded down to `step`).
    """
    side = max(step, resolution // step * step)
    area = resolution * resolution
    buckets = {(side, side)}
    for w in range(step, int(resolution * max_ratio) + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is closest to `width/height` (log scale; ties: larger area)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def cover_crop_box(src: Size, dst: Size, rng: random.Random | None = None) -> tuple[Size, tuple[int, int]]:
    """How to fit an image of size `src` into `dst`: resize to cover it, then crop.

    Returns `(resized_size, (left, top))`; the crop is centred, or random when `rng` is given.
    """
    scale = max(dst[0] / src[0], dst[1] / src[1])
    resized = (max(dst[0], round(src[0] * scale)), max(dst[1], round(src[1] * scale)))
    spare_x, spare_y = resized[0] - dst[0], resized[1] - dst[1]
    if rng is None:
        return resized, (spare_x // 2, spare_y // 2)
    return resized, (rng.randint(0, spare_x), rng.randint(0, spare_y))


def image_to_array(img: Image.Image, dst: Size, box: tuple[Size, tuple[int, int]], flip: bool) -> np.ndarray:
    """Resize/crop/flip an RGB image to `dst`; float32 CHW in [-1, 1]."""
    resized, (left, top) = box
    if img.size != resized:
        img = img.resize(resized, Image.Resampling.BICUBIC)
    img = img.crop((left, top, left + dst[0], top + dst[1]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# --------------------------------------------------------------------------- deterministic batches


def step_seed(seed: int, index: int, salt: str = "") -> int:
    """A 63-bit seed for the random choices of micro-batch `index` (stable across runs)."""
    return derived_seed(seed, index, salt)


class BatchStream:
    """Batches of example indices, grouped by bucket, reshuffled every pass.

    `batch(i)` is a pure function of `(seed, i)`: pass `i // len(self)` uses its own
    shuffle, so any position can be reached without replaying the ones before it.
    """

    def __init__(self, sizes: Sequence[Size], batch_size: int, seed: int):
        if not sizes:
            raise ValueError("BatchStream needs at least one example")
        self.groups: dict[Size, list[int]] = {}
        for i, size in enumerate(sizes):
            self.groups.setdefault(size, []).append(i)
        self.batch_size, self.seed = batch_size, seed
        self._len = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())
        self._cycles: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return self._len

    def batch(self, i: int) -> list[int]:
        cycle, j = divmod(i, self._len)
        return self._cycle(cycle)[j]

    def _cycle(self, cycle: int) -> list[list[int]]:
        if cycle not in self._cycles:
            if len(self._cycles) >= 2:  # only the current and the previous pass are ever needed
                self._cycles.pop(min(self._cycles))
            self._cycles[cycle] = self._shuffle(cycle)
        return self._cycles[cycle]

    def _shuffle(self, cycle: int) -> list[list[int]]:
        rng = random.Random(step_seed(self.seed, cycle, "cycle"))
        batches = []
        for size in sorted(self.groups):
            idx = self.groups[size][:]
            rng.shuffle(idx)
            batches += [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return batches


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class Item:
    """An example placed in its bucket, with the crop used when its latents are cached."""

    example: Example
    size: Size
    box: tuple[Size, tuple[int, int]]
    original: Size = (0, 0)
    """The image's upright (width, height) before any resizing."""


@dataclass
class DataConfig:
    """How images become batches (a subset of the training config)."""

    resolution: int = 512
    bucket_step: int = 64
    aspect_ratio_bucketing: bool = False
    center_crop: bool = False
    hflip: bool = False
    train_batch_size: int = 1
    caption_dropout: float = 0.0
    shuffle_captions: bool = False
    keep_tokens: int = 0
    seed: int = 0


def place_items(examples: Sequence[Example], cfg: DataConfig) -> list[Item]:
    """Give every example its bucket (or the square) and a fixed crop box."""
    buckets = make_buckets(cfg.resolution, cfg.bucket_step) if cfg.aspect_ratio_bucketing else \
        [(cfg.resolution, cfg.resolution)]
    items = []
    for ex in examples:
        with Image.open(ex.path) as img:  # header only: the size, EXIF rotation applied below
            w, h = _upright_size(img)
        size = nearest_bucket(w, h, buckets)
        # Seeded by the file name, not the full path: the same dataset crops the same
        # wherever it lies (Drive, a local copy, another machine).
        rng = None if cfg.center_crop or cfg.aspect_ratio_bucketing else \
            random.Random(step_seed(cfg.seed, 0, f"crop:{ex.path.name}"))
        items.append(Item(ex, size, cover_crop_box((w, h), size, rng), (w, h)))
    return items


def item_time_ids(item: Item, flip: bool) -> list[int]:
    """SDXL's `add_time_ids` for what was done to `item`: its original (height, width), the
    (top, left) of the crop in the resized image and the (height, width) trained on. A
    flipped item's crop is mirrored: flipping after the crop equals cropping the flipped
    image on the other side."""
    (resized_w, _), (left, top) = item.box
    width, height = item.size
    if flip:
        left = resized_w - left - width
    return add_time_ids((item.original[1], item.original[0]), (top, left), (height, width))


def _upright_size(img: Image.Image) -> Size:
    orientation = img.getexif().get(0x0112, 1)
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class DreamBoothData:
    """Micro-batch `i` of instance (and class) examples: prompts plus pixels or cached latents.

    Epoch length follows the original script: with prior preservation it is the longer of
    the instance and class streams; the shorter one wraps around.
    """

    def __init__(self, plan: DataPlan, cfg: DataConfig, latent_cache: LatentCache | None = None):
        self.cfg = cfg
        self.instance = place_items(plan.instance, cfg)
        self.classes = place_items(plan.classes, cfg)
        self.cache = latent_cache
        self.instance_stream = BatchStream([it.size for it in self.instance], cfg.train_batch_size, cfg.seed)
        self.class_stream = BatchStream([it.size for it in self.classes], cfg.train_batch_size,
                                        cfg.seed + 1) if self.classes else None

    @property
    def batches_per_epoch(self) -> int:
        return max(len(self.instance_stream), len(self.class_stream or ()))

    def all_items(self) -> list[Item]:
        return self.instance + self.classes

    def micro_batch(self, i: int) -> dict:
        """Batch `i`: `{"instance": part, "class": part | None}`, each part a dict with
        `prompts`, `time_ids` (SDXL's micro-conditioning per image, `item_time_ids`) and
        either `latent_mean`/`latent_std` (cached) or `pixels` (float32 NCHW)."""
        rng = random.Random(step_seed(self.cfg.seed, i, "batch"))
        inst = self._part([self.instance[k] for k in self.instance_stream.batch(i)], rng, captions=True)
        cls = None
        if self.class_stream is not None:
            cls = self._part([self.classes[k] for k in self.class_stream.batch(i)], rng, captions=False)
        return {"instance": inst, "class": cls}

    def _part(self, items: list[Item], rng: random.Random, captions: bool) -> dict:
        c = self.cfg
        flips = [c.hflip and rng.random() < 0.5 for _ in items]
        prompts = [transform_caption(it.example.prompt, rng, dropout=c.caption_dropout,
                                     shuffle=c.shuffle_captions, keep_tokens=c.keep_tokens)
                   if captions else it.example.prompt for it in items]
        part = {"prompts": prompts,
                "time_ids": np.array([item_time_ids(it, f) for it, f in zip(items, flips)], dtype=np.float32)}
        if self.cache is not None:
            stats = [self.cache.get(it, f) for it, f in zip(items, flips)]
            part["latent_mean"] = np.stack([s[0] for s in stats])
            part["latent_std"] = np.stack([s[1] for s in stats])
        else:
            part["pixels"] = np.stack([load_item(it, f) for it, f in zip(items, flips)])
        return part


def load_item(item: Item, flip: bool) -> np.ndarray:
    """Pixels of one item, ready for the VAE."""
    return image_to_array(load_rgb(item.example.path), item.size, item.box, flip)


# --------------------------------------------------------------------------- latent cache


def file_fingerprint(path: str | os.PathLike, head_bytes: int = 1 << 20) -> list:
    """What identifies a weight file's contents cheaply: name, size, mtime and a digest of
    its first `head_bytes` (the safetensors header and the first tensors)."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(head_bytes)).hexdigest()
    return [os.path.basename(path), st.st_size, st.st_mtime_ns, head]


def weights_key(weight_files: Sequence[str | os.PathLike], config: dict, *names) -> str:
    """The latent-cache key of a VAE: its weight files' fingerprints, its config, and `names`
    (model ids, revision, variant). Swapping the weights at the same path changes the key."""
    parts = [[file_fingerprint(f) for f in sorted(map(os.fspath, weight_files))],
             json.dumps(dict(config), sort_keys=True, default=str), [str(n) for n in names]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def latent_key(model_key: str, item: Item, flip: bool) -> str:
    """Cache key: model, file (path, mtime, size), bucket, crop and flip."""
    st = os.stat(item.example.path)
    parts = [model_key, str(Path(item.example.path).resolve()), st.st_mtime_ns, st.st_size,
             list(item.size), [list(item.box[0]), list(item.box[1])], flip]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class LatentCache:
    """VAE latent distributions (mean, std) per item and flip; in memory, optionally on disk.

    `encode` is a callable `pixels (N,3,H,W) float32 -> (mean, std)` numpy arrays; it is
    only called for entries found neither in memory nor under `cache_dir`.
    """

    def __init__(self, model_key: str, cache_dir: str | os.PathLike | None = None):
        self.model_key = model_key
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.entries: dict[tuple[Item, bool], tuple[np.ndarray, np.ndarray]] = {}
        self.encoded = 0
        self.read_from_disk = 0
        self._encoded_keys: list[tuple[Item, bool]] = []

    def get(self, item: Item, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        return self.entries[(item, flip)]

    def fill(self, items: Sequence[Item], flips: Sequence[bool], encode: Callable,
             batch_size: int = 4, progress: bool = True, rank: int = 0, world: int = 1) -> None:
        """Make sure every `(item, flip)` is cached, encoding same-size items in batches.

        With `world` processes, this one (`rank`) encodes only every `world`-th entry that
        is neither in memory nor on disk; `add_shared` takes in what the others encoded.
        """
        from tqdm.auto import tqdm

        todo = [(it, f) for it in items for f in flips if (it, f) not in self.entries]
        todo = [k for k in todo if not self._load_disk(k)][rank::world]
        by_size: dict[Size, list] = {}
        for key in todo:
            by_size.setdefault(key[0].size, []).append(key)
        with tqdm(total=len(todo), desc="caching latents", disable=not progress or not todo) as bar:
            for keys in by_size.values():
                for k in range(0, len(keys), batch_size):
                    chunk = keys[k:k + batch_size]
                    mean, std = encode(np.stack([load_item(it, f) for it, f in chunk]))
                    for j, key in enumerate(chunk):
                        self._store(key, mean[j], std[j])
                    bar.update(len(chunk))

    def own_share(self) -> list[tuple[tuple[Item, bool], np.ndarray, np.ndarray]]:
        """What this process encoded, for `add_shared` on the other processes."""
        return [(key, *self.entries[key]) for key in self._encoded_keys]

    def add_shared(self, shared: Sequence[tuple[tuple[Item, bool], np.ndarray, np.ndarray]]) -> None:
        """Entries the other processes encoded (this process's own are already here)."""
        for key, mean, std in shared:
            self.entries.setdefault(key, (mean, std))

    def _path(self, key: tuple[Item, bool]) -> Path | None:
        if self.cache_dir is None:
            return None
        name = latent_key(self.model_key, *key)
        return self.cache_dir / name[:2] / f"{name}.safetensors"

    def _load_disk(self, key) -> bool:
        path = self._path(key)
        if path is None or not path.is_file():
            return False
        from safetensors.numpy import load_file

        try:
            data = load_file(str(path))
        except Exception:  # a damaged cache file is re-encoded, never trusted
            logger.warning("latent cache file %s is unreadable; encoding again", path)
            return False
        self.entries[key] = (data["mean"], data["std"])
        self.read_from_disk += 1
        return True

    def _store(self, key, mean: np.ndarray, std: np.ndarray) -> None:
        mean, std = np.ascontiguousarray(mean), np.ascontiguousarray(std)
        self.entries[key] = (mean, std)
        self.encoded += 1
        self._encoded_keys.append(key)
        path = self._path(key)
        if path is not None:
            from safetensors.numpy import save_file

            atomic_write(path, lambda tmp: save_file({"mean": mean, "std": std}, tmp))
