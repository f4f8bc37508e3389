"""Auto-captioning with BLIP / BLIP-2, Florence-2, WD14-style taggers or instruction
VLMs, batched, and losing nothing.

`python -m dbtools caption --img_dir DIR [--out_dir DIR] [--format F] ...` takes
EveryDream's `auto_caption.py` flags with the same meaning. From Python::

    cfg = CaptionConfig(img_dir="photos", format="sidecar")
    summary = run_caption(cfg, load_captioner(cfg.model))

Where captions go (`--format`):

- `filename`: the image as `<caption>_<i><ext>`; `mrwho`/`joepenna`: `<i:05>@<caption><ext>`.
  `i` is the image's position in the naturally sorted listing; a name already taken
  gets a new index (`i` + number of images, then upwards), so no file is overwritten.
- `txt`/`text`: `<stem>.txt`; `caption`: `<stem>.caption`; `sidecar`: `<image file
  name>.txt` (`a.png.txt`, what `--read_prompts_from_txts` training reads).

Safety rules:

- Originals are never modified or deleted. As in EveryDream, the defaults are
  `--img_dir input --out_dir output`: images are copied to `--out_dir` unchanged
  (caption-file formats copy the image next to its caption, so `--out_dir` is a
  complete dataset). Only when `--out_dir` is the image folder itself do filename
  formats rename in place; every rename is appended to
  `<out_dir>/.dbtools/renames-<UTC time>.jsonl` before it happens, and
  `--undo that-file` renames everything back, refusing if a name it needs is now taken.
- Names from captions go through `safe_filename_stem` (no separators, `..`, control or
  Windows-illegal characters; at most 255 bytes with the extension).
- Re-runs skip images that already have their output unless `--overwrite`. Caption
  files are found by name. Filename formats are found through the manifest
  `<out_dir>/.dbtools/captions.jsonl` (one JSON line per output written): an image is
  done when it is a recorded output (after a rename in place) or when its recorded
  output still exists (after a copy). A caption file found on disk, whoever wrote it,
  is kept unless `--overwrite`.
- A file that cannot be decoded is reported and skipped; the run goes on, the summary
  lists every failure and the command exits with status 1.

Captions are generated in batches: a `torch.utils.data.DataLoader` decodes
(`dbtools.dataset.images.load_rgb`, EXIF-aware) and preprocesses the next images in worker
processes while the model generates. Like EveryDream, BLIP is prompted with
"a picture of" and the prompt is removed from the caption; BLIP-2 has no prompt.
The family comes from the model's files (`dbtools.caption.captioners.detect_family`):
Florence-2 takes a task token as `--prompt` (default `<DETAILED_CAPTION>`), a VLM an
instruction; a tagger writes "tag, tag, ..." (`--threshold`, `--character_threshold`,
`--include_ratings`, `--exclude_tags`), and `--tags_with MODEL` puts a caption from
another family first. Flags that do not apply to a family are accepted and ignored,
with one note, so one command line works across families.
`--min_length`/`--max_length` count the caption's own tokens (the prompt not included);
left out, they are the family's (`LENGTHS`: BLIP's are EveryDream's 22 and 48, Florence-2
and VLMs have no minimum and room for a detailed description).

EveryDream's flag forms work: `--torch_device` is `--device`, `--nucleus` takes an
optional bool (`--nucleus`, `--nucleus True`, `--nucleus false`), with `--nucleus` a
`--q_factor` above 1 means no top-p cut, and a `--max_length` below the default
minimum (22) lowers the minimum with it.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dbtools.caption import captioners as cap
from dbtools.caption.captioners import (
    FLORENCE2_MODEL,
    FLORENCE2_TASKS,
    TAGGER_MODEL,
    VLM_MODEL,
    PixelValues,
    detect_family,
)
from dbtools.caption.config import (
    DEFAULT_MODEL,
    CaptionConfig,
    CaptionError,
    generation_kwargs,
    length_limits,
)
from dbtools.core.atomic import atomic_write, atomic_write_text
from dbtools.dataset.captions import FILENAME_FORMATS, caption_file_name, caption_image_name, clean_caption
from dbtools.dataset.images import list_images, load_rgb
from dbtools.families import models as family_models

logger = logging.getLogger(__name__)

BLIP2_MODEL = "Salesforce/blip2-opt-2.7b"
FORMATS = ("filename", "mrwho", "joepenna", "txt", "text", "caption", "sidecar")
STATE_DIR = ".dbtools"
MANIFEST_NAME = "captions.jsonl"
BLIP_PROMPT = "a picture of"
TRUE_WORDS = frozenset({"true", "yes", "y", "1", "on"})
FALSE_WORDS = frozenset({"false", "no", "n", "0", "off"})


@dataclass
class CaptionResult:
    """One output written: `action` is `renamed`, `copied`, `wrote` or `unchanged`."""

    source: Path
    output: Path
    caption: str
    action: str


@dataclass
class CaptionSummary:
    """What a run did. `failed` holds (image, reason) for every image that was skipped
    because it could not be read or written."""

    written: list[CaptionResult] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    out_dir: Path | None = None
    manifest: Path | None = None
    renames_log: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


# ----------------------------------------------------------------------------- pure rules


def config_problems(cfg: CaptionConfig) -> list[str]:
    """Every problem with `cfg`'s values (no file-system access); empty when fine."""
    problems = []
    if cfg.format not in FORMATS:
        problems.append(f"--format {cfg.format!r} is not one of: {', '.join(FORMATS)}")
    if cfg.nucleus and cfg.q_factor <= 0:
        problems.append(f"--q_factor {cfg.q_factor} is top_p with --nucleus: use a value in (0, 1], "
                        "e.g. 0.9 (above 1: no top-p cut)")
    if not cfg.nucleus and cfg.q_factor <= 0:
        problems.append(f"--q_factor {cfg.q_factor} is the repetition penalty: use a value > 0 (1.0 = none)")
    low, high = length_limits(cfg)
    if low < 0 or high < 1 or low > high:
        problems.append(f"--min_length {low} / --max_length {high}: "
                        "need 0 <= min_length <= max_length and max_length >= 1")
    if cfg.num_beams < 1:
        problems.append(f"--num_beams {cfg.num_beams}: use 1 or more")
    if cfg.batch_size < 1:
        problems.append(f"--batch_size {cfg.batch_size}: use 1 or more")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        problems.append(f"--num_workers {cfg.num_workers}: use 0 or more")
    for flag in ("threshold", "character_threshold"):
        if not 0.0 <= getattr(cfg, flag) <= 1.0:
            problems.append(f"--{flag} {getattr(cfg, flag)}: a tag probability, use a value in [0, 1]")
    if cfg.quantize not in (None, "4bit", "8bit"):
        problems.append(f"--quantize {cfg.quantize!r}: use 4bit or 8bit")
    return problems





def family_problems(cfg: CaptionConfig, family: str) -> list[str]:
    """Problems with `cfg` for captioner `family` (the one whose caption `--prompt` steers)."""
    label, prompts = PROMPTS.get(family, (family, None))
    if prompts is not None and cfg.prompt not in (None, *prompts):
        return [f"--prompt {cfg.prompt!r}: {label} takes a task token, one of {', '.join(prompts)}"]
    return []


GENERATION_FLAGS = ("min_length", "max_length", "num_beams", "nucleus", "q_factor", "prompt")
TAG_FLAGS = ("threshold", "character_threshold", "include_ratings", "exclude_tags")
FLAGS_READ = {"tagger": TAG_FLAGS}
"""The flags each captioner family reads; every other family reads the generation flags."""
PROMPTS = {"florence2": ("Florence-2", FLORENCE2_TASKS)}
"""The `--prompt` values a family takes where it takes only some (Florence-2's task tokens)."""


def config_notes(cfg: CaptionConfig, family: str | None = None) -> list[str]:
    """Things worth saying once about how `cfg`'s flags are read for captioner `family`
    (not problems): flags another family uses are accepted and ignored."""
    notes = []
    if cfg.nucleus and cfg.q_factor > 1.0:
        notes.append(f"--nucleus with --q_factor {cfg.q_factor}: top_p above 1 means no top-p cut "
                     "(sampling from the whole distribution), as in EveryDream")
    default = CaptionConfig()
    changed = [f for f in (*GENERATION_FLAGS, *TAG_FLAGS) if getattr(cfg, f) != getattr(default, f)]
    if family is None or cfg.tags_with:
        unused = []  # a tagger plus a captioner uses both sets of flags
    else:
        unused = [f for f in changed if f not in FLAGS_READ.get(family, GENERATION_FLAGS)]
    if unused:
        flags = ", ".join("--" + f for f in unused)
        notes.append(f"{flags}: not used by the {family} captioner; accepted and ignored")
    return notes


def parse_bool(text: str) -> bool:
    """EveryDream-style optional bool: true/false, yes/no, 1/0, on/off (any case)."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value (use true or false)")


def full_caption(cfg: CaptionConfig, text: str) -> str:
    """The caption as written: `prefix + text + suffix` (literal), cleaned to one line."""
    return clean_caption(f"{cfg.prefix}{text}{cfg.suffix}")


def candidate_indices(index: int, total: int) -> Iterator[int]:
    """The image's own index, then indices no image of this run uses: total, total+1, ..."""
    yield index
    yield from _count(max(total, index + 1))


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


def default_num_workers() -> int:
    """Decoding workers: one per spare CPU core, at most 4 (0 on a single core)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------- the model


class Captioner:
    """A loaded BLIP or BLIP-2 model with its processor; `kind` is `blip` or `blip2`."""

    def __init__(self, model, processor, kind: str, device, dtype):
        self.model, self.processor, self.kind = model, processor, kind
        self.device, self.dtype = device, dtype
        self._prompts: dict[str, dict] = {}

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def preprocess(self):
        """Picklable image -> pixel_values, run in the decoding workers."""
        return PixelValues(self.image_processor)

    def caption_batch(self, pixel_values, cfg: CaptionConfig) -> list[str]:
        """Captions for one batch with `cfg`'s prompt and generation flags."""
        return self.generate(pixel_values, cfg.prompt, **generation_kwargs(cfg, self.kind))

    def default_prompt(self) -> str:
        return BLIP_PROMPT if self.kind == "blip" else ""

    def prompt_inputs(self, prompt: str, batch: int) -> dict:
        """Token ids for `prompt`, repeated `batch` times (BLIP-2: image tokens first)."""
        if prompt not in self._prompts:
            if self.kind == "blip2":
                # The processor inserts the image tokens only when it is given an image.
                from PIL import Image

                dummy = [Image.new("RGB", (8, 8))]
                enc = self.processor(images=dummy, text=[prompt], return_tensors="pt")
            else:
                enc = self.processor.tokenizer([prompt], return_tensors="pt")
            self._prompts[prompt] = {k: enc[k] for k in ("input_ids", "attention_mask")}
        # Fresh tensors per call: BLIP's generate writes into its input_ids.
        return {k: v.repeat(batch, 1).to(self.device) for k, v in self._prompts[prompt].items()}

    def prompt_length(self, input_ids) -> int:
        """How many leading tokens of `generate`'s output are the prompt."""
        # BLIP's decoder replaces [CLS] with its start token and drops the final [SEP].
        return input_ids.shape[1] - 1 if self.kind == "blip" else input_ids.shape[1]

    def generate(self, pixel_values, prompt: str | None = None, **gen_kwargs) -> list[str]:
        """Captions (prompt removed, cleaned) for a batch of preprocessed images."""
        import torch

        prompt = self.default_prompt() if prompt is None else prompt
        inputs = self.prompt_inputs(prompt, pixel_values.shape[0])
        skip = self.prompt_length(inputs["input_ids"])
        pixels = pixel_values.to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels, **inputs, **gen_kwargs)
        texts = self.processor.batch_decode(out[:, skip:], skip_special_tokens=True)
        return [clean_caption(t) for t in texts]

    def caption(self, images, prompt: str | None = None, **gen_kwargs) -> list[str]:
        """Captions for PIL images (or paths) in one call, without batching or error
        handling; generation settings default to `generation_kwargs(CaptionConfig())`."""
        gen_kwargs = gen_kwargs or generation_kwargs(CaptionConfig())
        images = [load_rgb(i) if isinstance(i, (str, os.PathLike)) else i for i in images]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.generate(pixels, prompt, **gen_kwargs)


def load_captioner(model: str = DEFAULT_MODEL, device=None, dtype=None, tags_with: str | None = None,
                   quantize: str | None = None):
    """Load a captioner of any family from a Hub id or a local folder.

    The family comes from the model's files (`dbtools.caption.captioners.detect_family`).
    `tags_with` (with a tagger as `model`) adds a captioner of another family whose
    caption goes before the tags; `quantize` ("4bit"/"8bit", CUDA) applies to VLMs.
    Default placement: CUDA in float16, else MPS, else CPU, both in float32.
    Raises `CaptionError` when the model cannot be found or is not a captioner.
    """
    import torch

    family = cap.detect_family(model)
    device = torch.device(family_models.pick_device(device))
    if tags_with:
        if family != "tagger":
            raise CaptionError(f"--tags_with {tags_with}: --model must then be a tagger "
                               f"(e.g. {cap.TAGGER_MODEL}), but {model!r} is {family}.")
        return cap.TagsWithCaption(cap.load_tagger(model, device),
                                   load_captioner(tags_with, device, dtype, quantize=quantize))
    loaders = {"tagger": lambda: cap.load_tagger(model, device),
               "florence2": lambda: cap.load_florence2(model, device, dtype),
               "vlm": lambda: cap.load_vlm(model, device, dtype, quantize)}
    return loaders.get(family, lambda: load_blip(model, family, device, dtype))()


def load_for_config(cfg: CaptionConfig, device=None):
    """The captioner `cfg` asks for: `cfg.model`, with `cfg.tags_with` and `cfg.quantize`."""
    return load_captioner(cfg.model, device=device, tags_with=cfg.tags_with, quantize=cfg.quantize)


def load_blip(model: str, kind: str, device, dtype=None) -> Captioner:
    """Load BLIP (`kind="blip"`) or BLIP-2 (`"blip2"`) with its processor on `device`."""
    import torch
    from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, BlipForConditionalGeneration

    cls = Blip2ForConditionalGeneration if kind == "blip2" else BlipForConditionalGeneration
    config = AutoConfig.from_pretrained(model)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    net = cls.from_pretrained(model, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model)
    if kind == "blip2" and getattr(processor, "num_query_tokens", None) is None:
        # Older processor files lack it; the processor then would not insert image tokens.
        processor.num_query_tokens = config.num_query_tokens
    logger.info("loaded %s captioner %s on %s (%s)", kind, model, device, dtype)
    return Captioner(net, processor, kind, device, dtype)


# ----------------------------------------------------------------------------- batching


class ImageFiles:
    """Dataset of image files -> (index, preprocessed item or None, error or None).

    `preprocess` is the captioner's (RGB PIL image -> tensor, array, image or a pair).
    Decoding errors are returned, not raised, so one bad file never stops a batch.
    """

    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_rgb(self.paths[i])), None
        except Exception as exc:  # any per-file problem is reported and skipped, not fatal
            message = str(exc) or type(exc).__name__
            return i, None, message.removeprefix(f"{self.paths[i]}: ")


def collate_images(items):
    """Stack the readable images of a batch; keep the errors of the others."""
    good = [(i, px) for i, px, err in items if err is None]
    return {
        "index": [i for i, _ in good],
        "pixel_values": stack_items([px for _, px in good]) if good else None,
        "errors": [(i, err) for i, _, err in items if err is not None],
    }


def stack_items(items: list):
    """One batch from preprocessed items: tensors and arrays stacked, pairs stacked
    pairwise, anything else (PIL images) kept as a list."""
    import numpy as np
    import torch

    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, np.ndarray):
        return np.stack(items)
    if isinstance(first, tuple):
        return tuple(stack_items(list(part)) for part in zip(*items))
    return list(items)


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # workers decode; the model keeps the cores for generation


def caption_files(captioner, paths: list[Path], cfg: CaptionConfig
                  ) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield `(index into paths, caption, error)` per image, batch by batch.

    A `DataLoader` with `cfg.num_workers` workers decodes and preprocesses the next
    batches while the model generates. Exactly one of caption/error is None.
    """
    import torch
    from torch.utils.data import DataLoader

    if not paths:
        return
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    loader = DataLoader(
        ImageFiles(paths, captioner.preprocess), batch_size=cfg.batch_size,
        num_workers=workers, collate_fn=collate_images, worker_init_fn=_worker_init,
        pin_memory=captioner.device.type == "cuda", shuffle=False,
    )
    if cfg.nucleus:
        torch.manual_seed(cfg.seed)
    for batch in loader:
        for i, err in batch["errors"]:
            yield i, None, err
        if batch["pixel_values"] is None:
            continue
        captions = captioner.caption_batch(batch["pixel_values"], cfg)
        for i, text in zip(batch["index"], captions):
            if text:
                yield i, text, None
            elif captioner.kind == "tagger":
                yield i, None, "no tag reached --threshold; lower it or add --tags_with MODEL"
            else:
                yield i, None, "the model returned an empty caption; try --nucleus or another --model"


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Job:
    """One image to caption: where it is, its folder relative to img_dir, its index."""

    source: Path
    rel_dir: Path
    index: int


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (interrupted write) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict)]


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def manifest_path(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_DIR / MANIFEST_NAME


def live_records(out_dir: Path) -> list[dict]:
    """Manifest records of outputs, without those whose renames were undone."""
    records = read_jsonl(manifest_path(out_dir))
    undone = {r["undone"] for r in records if "undone" in r}
    return [r for r in records if "output" in r and r.get("renames_log") not in undone]


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def list_sources(cfg: CaptionConfig) -> list[Path]:
    """The images to consider, leaving out anything inside a nested `out_dir`."""
    images = list_images(cfg.image_dir, recursive=cfg.recursive)
    out = cfg.output_dir
    if cfg.in_place or not cfg.recursive:
        return images
    out_abs = os.path.abspath(out)
    return [p for p in images if not os.path.abspath(p).startswith(out_abs + os.sep)]


def plan_jobs(cfg: CaptionConfig) -> tuple[list[Job], list[Path]]:
    """Split the images into jobs to caption and images already done (see module doc)."""
    sources = list_sources(cfg)
    out = cfg.output_dir
    filename_fmt = cfg.format in FILENAME_FORMATS
    records = [r for r in live_records(out) if r.get("format") in FILENAME_FORMATS]
    outputs = {r["output"] for r in records}
    latest = {r["source"]: r["output"] for r in records}
    jobs, skipped = [], []
    for index, src in enumerate(sources):
        rel_dir = Path(os.path.relpath(src.parent, cfg.image_dir))
        if not cfg.overwrite and _already_done(cfg, src, rel_dir, filename_fmt, outputs, latest):
            skipped.append(src)
        else:
            jobs.append(Job(src, rel_dir, index))
    return jobs, skipped


def _already_done(cfg, src: Path, rel_dir: Path, filename_fmt: bool, outputs, latest) -> bool:
    out = cfg.output_dir
    if not filename_fmt:
        return (out / rel_dir / caption_file_name(src.name, cfg.format)).exists()
    if cfg.in_place and _rel(src, out) in outputs:
        return True
    previous = latest.get(os.path.abspath(src))
    return previous is not None and (out / previous).exists()


class OutputWriter:
    """Writes one run's outputs, never overwriting an image, recording everything."""

    def __init__(self, cfg: CaptionConfig, total: int):
        self.cfg, self.total = cfg, total
        # In place, use the image folder's own spelling so target == source compares work.
        self.out = cfg.image_dir if cfg.in_place else cfg.output_dir
        self.manifest = manifest_path(self.out)
        self.renames_log: Path | None = None
        records = [r for r in live_records(self.out) if r.get("format") in FILENAME_FORMATS]
        self.latest = {r["source"]: r["output"] for r in records}
        self.caption_files: dict[Path, Path] = {}  # caption file -> image, this run

    def write(self, job: Job, caption: str) -> CaptionResult:
        """Write `job`'s output for `caption` and record it in the manifest."""
        if self.cfg.format in FILENAME_FORMATS:
            result = self._write_image(job, caption)
        else:
            result = self._write_caption_file(job, caption)
        record = {"source": os.path.abspath(job.source), "output": _rel(result.output, self.out),
                  "format": self.cfg.format, "caption": caption, "action": result.action}
        if result.action == "renamed":
            record["renames_log"] = self.renames_log.name
        append_jsonl(self.manifest, record)
        return result

    def _previous_copy(self, job: Job) -> Path | None:
        """This image's earlier copy in out_dir (from the manifest), if still identical."""
        previous = self.latest.get(os.path.abspath(job.source))
        old = self.out / previous if previous and not self.cfg.in_place else None
        if old and old.is_file() and filecmp.cmp(old, job.source, shallow=False):
            return old
        return None

    def _free_image_name(self, job: Job, caption: str, own: set[Path]) -> Path:
        """The first name for `caption` that is free or already this image's own file."""
        folder = self.out / job.rel_dir
        ext = job.source.suffix
        for i in candidate_indices(job.index, self.total):
            target = folder / caption_image_name(caption, self.cfg.format, i, ext)
            if target in own or not target.exists():
                return target
        raise AssertionError("unreachable")

    def _write_image(self, job: Job, caption: str) -> CaptionResult:
        previous = self._previous_copy(job)
        own = {job.source} | ({previous} if previous else set())
        target = self._free_image_name(job, caption, own)
        if target in own:
            return CaptionResult(job.source, target, caption, "unchanged")
        if self.cfg.in_place:
            self._rename(job.source, target)
            return CaptionResult(job.source, target, caption, "renamed")
        _copy_file(job.source, target)
        if previous is not None:
            # --overwrite gave this image a new caption: drop our earlier identical copy.
            previous.unlink()
        return CaptionResult(job.source, target, caption, "copied")

    def _rename(self, src: Path, dst: Path) -> None:
        if self.renames_log is None:
            self.renames_log = new_renames_log(self.out)
        # Logged before renaming: undo treats a logged rename that never happened as done.
        append_jsonl(self.renames_log, {"from": _rel(src, self.out), "to": _rel(dst, self.out)})
        os.rename(src, dst)

    def _write_caption_file(self, job: Job, caption: str) -> CaptionResult:
        folder = self.out / job.rel_dir
        target = folder / caption_file_name(job.source.name, self.cfg.format)
        if target in self.caption_files:  # a.png and a.jpg both want a.txt
            raise CaptionError(f"{target.name} already holds the caption of "
                             f"{self.caption_files[target].name}; use --format sidecar to keep both")
        self.caption_files[target] = job.source
        if not self.cfg.in_place:
            image_copy = folder / job.source.name
            if not image_copy.exists():
                _copy_file(job.source, image_copy)
        atomic_write_text(target, caption)
        return CaptionResult(job.source, target, caption, "wrote")


def _copy_file(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def new_renames_log(out_dir: Path) -> Path:
    """A fresh `<out_dir>/.dbtools/renames-<UTC timestamp>.jsonl` path (not created)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(out_dir) / STATE_DIR
    path = folder / f"renames-{stamp}.jsonl"
    n = 1
    while path.exists():
        path = folder / f"renames-{stamp}-{n}.jsonl"
        n += 1
    return path


# ----------------------------------------------------------------------------- stages


def check_inputs(cfg: CaptionConfig) -> None:
    """Raise `CaptionError` listing every problem with flags and folders (no model)."""
    problems = config_problems(cfg)
    if not cfg.image_dir.is_dir():
        problems.append(f"--img_dir {cfg.image_dir}: not a folder. Check the path "
                        "(is Google Drive mounted?).")
    elif not list_sources(cfg):
        problems.append(f"--img_dir {cfg.image_dir}: no images found (extensions: jpg jpeg "
                        "png webp gif bmp tif tiff tga; use --recursive for sub-folders).")
    if cfg.output_dir.exists() and not cfg.output_dir.is_dir():
        problems.append(f"--out_dir {cfg.output_dir}: exists and is not a folder.")
    if problems:
        raise CaptionError("cannot caption:\n  " + "\n  ".join(problems))


def run_caption(cfg: CaptionConfig, captioner, progress: bool = True) -> CaptionSummary:
    """Caption every image in `cfg.img_dir` that has no output yet; write the outputs.

    Never modifies or deletes an original and never overwrites an image (see the
    module doc). Unreadable images and failed writes are listed in `summary.failed`
    and do not stop the run. Raises `CaptionError` for bad flags or folders.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    check_inputs(cfg)
    for problem in family_problems(cfg, captioner.kind.split("+")[-1]):
        raise CaptionError(problem)
    for note in config_notes(cfg, captioner.kind.split("+")[0]):
        logger.warning("%s", note)
    jobs, skipped = plan_jobs(cfg)
    summary = CaptionSummary(skipped=skipped, out_dir=cfg.output_dir)
    if skipped:
        logger.info("%d image(s) already captioned, skipped (use --overwrite to redo them)", len(skipped))
    writer = OutputWriter(cfg, total=len(jobs) + len(skipped))
    bar = tqdm(total=len(jobs), unit="img", desc="captioning", disable=not progress)
    with bar, logging_redirect_tqdm():  # warnings print above the bar, not through it
        for i, text, error in caption_files(captioner, [j.source for j in jobs], cfg):
            job = jobs[i]
            if error is None:
                error = _write_one(writer, job, full_caption(cfg, text), summary)
            if error is not None:
                summary.failed.append((job.source, error))
                logger.warning("%s: skipped: %s", job.source, error)
            bar.update(1)
    summary.manifest = writer.manifest if summary.written else None
    summary.renames_log = writer.renames_log
    return summary


def _write_one(writer: OutputWriter, job: Job, caption: str, summary: CaptionSummary) -> str | None:
    try:
        result = writer.write(job, caption)
    except (OSError, ValueError) as exc:
        return f"cannot write the output ({exc})"
    summary.written.append(result)
    logger.debug("%s %s -> %s", result.action, job.source, result.output)
    return None


def undo_renames(log: str | Path) -> list[tuple[Path, Path]]:
    """Reverse the renames recorded in `log`; return the (now, restored) pairs done.

    Checks every step first and raises `CaptionError` naming each blocking file (a
    name that is now taken, or a renamed file that has gone) before touching anything.
    Only our own logs (`<out_dir>/.dbtools/renames-*.jsonl`, every line a rename) are
    accepted, and only names inside `<out_dir>` are touched: nothing is renamed or
    written outside it.
    """
    log = Path(log)
    if not log.is_file():
        raise CaptionError(f"{log}: no such renames log. Logs are in <out_dir>/{STATE_DIR}/.")
    root = log.parent.parent
    steps = [(_inside(root, r["to"], log), _inside(root, r["from"], log)) for r in _read_renames_log(log)]
    todo, problems = _check_undo(list(reversed(steps)))
    if problems:
        raise CaptionError(f"cannot undo {log}; nothing was changed:\n  " + "\n  ".join(problems))
    for now, before in todo:
        os.rename(now, before)
    append_jsonl(manifest_path(root), {"undone": log.name})
    return todo


def _read_renames_log(log: Path) -> list[dict]:
    """The records of one of our renames logs; `CaptionError` for any other file."""
    not_ours = (f"{log}: not a dbtools renames log (those are <out_dir>/{STATE_DIR}/renames-*.jsonl, "
                "written by a caption run that renamed files). Give the path the run printed.")
    if log.parent.name != STATE_DIR or not (log.name.startswith("renames-") and log.suffix == ".jsonl"):
        raise CaptionError(not_ours)
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CaptionError(f"{not_ours} ({exc})") from exc
    records = []
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:
                continue  # a torn last line: the run was interrupted while logging
            raise CaptionError(not_ours) from None
        if not (isinstance(record, dict) and set(record) == {"from", "to"}
                and all(isinstance(v, str) for v in record.values())):
            raise CaptionError(not_ours)
        records.append(record)
    return records


def _inside(root: Path, name: str, log: Path) -> Path:
    """`root / name`, refused unless it names a file inside `root` (no `..`, no absolute
    path, not inside a linked folder that leads elsewhere, not our state folder)."""
    parts = Path(name).parts
    if (not parts or Path(name).is_absolute() or ".." in parts or STATE_DIR in parts
            or "\x00" in name):
        raise CaptionError(f"{log}: entry {name!r} points outside {root}; undo only renames files "
                           "inside the folder the log belongs to. Nothing was changed.")
    path = root / name
    real_root = root.resolve()
    if path.parent.resolve() != real_root and real_root not in path.parent.resolve().parents:
        raise CaptionError(f"{log}: entry {name!r} leads outside {root} through a link. Nothing "
                           "was changed.")
    return path


def _check_undo(steps: list[tuple[Path, Path]]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Simulate undoing `steps` in order; the renames to do and what blocks them."""
    present: dict[Path, bool] = {}

    def exists(p: Path) -> bool:
        return present.get(p, p.exists())

    todo, problems = [], []
    for now, before in steps:
        if not exists(now) and exists(before):
            continue  # logged but never renamed (interrupted run) or already back
        if not exists(now):
            problems.append(f"{now}: not found (moved or deleted since the run); "
                            f"cannot restore {before.name}")
        elif exists(before):
            problems.append(f"{before}: exists now, so {now.name} cannot get its old name back; "
                            "move that file away and undo again")
        else:
            todo.append((now, before))
            present[now], present[before] = False, True
    return todo, problems


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m dbtools caption",
        description="Caption images with BLIP / BLIP-2, Florence-2, a WD14-style tagger or an "
                    "instruction VLM (EveryDream auto_caption.py flags). The family is read from "
                    "the model's files.")
    d = CaptionConfig()
    p.add_argument("--img_dir", default=d.img_dir, help="folder of images (default: input)")
    p.add_argument("--out_dir", default=d.out_dir,
                   help="where outputs go (default: output); the same folder as --img_dir "
                        "renames / writes in place, with an undo log")
    p.add_argument("--format", default=d.format, choices=FORMATS,
                   help="filename: <caption>_<i>.ext; mrwho/joepenna: <i:05>@<caption>.ext; "
                        "txt/text: <stem>.txt; caption: <stem>.caption; sidecar: <image>.txt")
    p.add_argument("--model", default=d.model,
                   help=f"Hub id or folder: BLIP (default), BLIP-2 ({BLIP2_MODEL}), Florence-2 "
                        f"({FLORENCE2_MODEL}, photos), a WD14 tagger ({TAGGER_MODEL}, illustration "
                        f"and anime), an instruction VLM ({VLM_MODEL}, custom needs)")
    p.add_argument("--nucleus", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="nucleus sampling (top_p=q_factor) instead of beam search; "
                        "--nucleus, --nucleus true or --nucleus false")
    p.add_argument("--q_factor", type=float, default=d.q_factor,
                   help="repetition penalty for beam search, top_p with --nucleus (default 1.0)")
    p.add_argument("--min_length", type=int, default=None,
                   help="minimum caption tokens (BLIP: 22, or --max_length when that is smaller; "
                        "Florence-2, VLM: 0)")
    p.add_argument("--max_length", type=int, default=None,
                   help="maximum caption tokens (BLIP: 48; Florence-2: 256; VLM: 160)")
    p.add_argument("--num_beams", type=int, default=d.num_beams, help="beams for beam search (16)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="images per generate call (8)")
    p.add_argument("--num_workers", type=int, default=None,
                   help=f"decoding worker processes (default {default_num_workers()} here; 0 = none)")
    p.add_argument("--prompt", default=None,
                   help=f'BLIP: text the caption starts from ("{BLIP_PROMPT}"); Florence-2: task token '
                        f'({" ".join(FLORENCE2_TASKS)}; default <DETAILED_CAPTION>); VLM: the instruction')
    p.add_argument("--threshold", type=float, default=d.threshold, help="tagger: general tag threshold (0.35)")
    p.add_argument("--character_threshold", type=float, default=d.character_threshold,
                   help="tagger: character tag threshold (0.85)")
    p.add_argument("--include_ratings", action="store_true", help="tagger: add the most likely rating tag")
    p.add_argument("--exclude_tags", default=d.exclude_tags, help='tagger: tags to leave out, "a, b"')
    p.add_argument("--tags_with", metavar="CAPTIONER_MODEL", default=None,
                   help='tagger: put a caption from this model first: "caption, tag, tag"')
    p.add_argument("--quantize", choices=("4bit", "8bit"), default=None,
                   help="VLM: load in 4 or 8 bits with bitsandbytes (CUDA only)")
    p.add_argument("--prefix", default=d.prefix, help="text put before every caption, as is")
    p.add_argument("--suffix", default=d.suffix, help="text put after every caption, as is")
    p.add_argument("--recursive", action="store_true", help="include sub-folders (mirrored in --out_dir)")
    p.add_argument("--overwrite", action="store_true", help="caption again images that have output")
    p.add_argument("--device", "--torch_device", dest="device", default=None,
                   help="cuda, mps or cpu (default: best available); --torch_device is the same")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for --nucleus sampling")
    p.add_argument("--undo", metavar="LOG", default=None,
                   help="reverse the renames in LOG (<out_dir>/.dbtools/renames-*.jsonl) and exit")
    return p


def config_from_args(args: argparse.Namespace) -> CaptionConfig:
    names = CaptionConfig.__dataclass_fields__
    return CaptionConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools caption ...`: 0 when every image was captioned, 1 otherwise; user
    errors rise as `CaptionError` (the entry point reports them and exits 2)."""
    args = build_parser().parse_args(argv)
    if args.undo:
        done = undo_renames(args.undo)
        print(f"restored {len(done)} file name(s) from {args.undo}")
        return 0
    cfg = config_from_args(args)
    check_inputs(cfg)

    problems = family_problems(cfg, detect_family(cfg.tags_with or cfg.model))
    if problems:  # before any weights load
        raise CaptionError("cannot caption:\n  " + "\n  ".join(problems))
    summary = run_caption(cfg, load_for_config(cfg, device=args.device))
    print(format_summary(summary))
    return 0 if summary.ok else 1


def format_summary(summary: CaptionSummary, show: int = 10) -> str:
    """A short report: counts, the first `show` outputs, every failure, how to undo."""
    lines = [f"captioned {len(summary.written)} image(s), skipped {len(summary.skipped)} already "
             f"done, {len(summary.failed)} failed; outputs in {summary.out_dir}"]
    lines += [f"  {r.action} {r.output.name}  <-  {r.source.name}" for r in summary.written[:show]]
    if len(summary.written) > show:
        lines.append(f"  ... and {len(summary.written) - show} more (all listed in {summary.manifest})")
    lines += [f"  FAILED {path}: {why}" for path, why in summary.failed]
    if summary.renames_log:
        lines.append(f"renames recorded in {summary.renames_log}; to reverse them:\n"
                     f"  python -m dbtools caption --undo \"{summary.renames_log}\"")
    return "\n".join(lines)
