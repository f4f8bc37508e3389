"""The Omnitool: caption files from image file names, and `concepts_list.json`.

For every image under a concept's `instance_data_dir` (sub-folders included) the tool
writes a caption file that training reads with `--read_prompts_from_txts`:

- naming `sidecar` (default): `<image file name>.txt`, e.g. `a red car_3.png.txt`;
- naming `stem`: `<stem>.txt`, e.g. `a red car_3.txt` (kohya / EveryDream2).

The caption comes from the file name (`dbtools.dataset.captions.caption_from_filename`:
`a red car_3.png` -> `a red car`) and is combined with the concept's prompts through a
template with the fields `{caption}`, `{instance_prompt}` and `{class_prompt}`:

- Method 1, no instance or class prompt: `{caption}` -- the caption alone.
- Method 2, an instance and/or class prompt: `{instance_prompt}, {caption}, {class_prompt}`
  (`sks, a red car, a car`); empty parts vanish with their commas.

`--template` picks another one. The caption file holds the *final* prompt, so training
must use it as it is: the concepts we write carry no `prompt_template` (which training
would apply a second time). They record the template used under `caption_template`, a
key training ignores and the next extraction reuses, so a re-run with the written
`concepts_list.json` plans the same text. A concept read from a file that already has a
`prompt_template` (prompts added at training time) gets caption-only files, and it keeps
its `prompt_template`; combining it with `--template` is refused, as the prompts would be
added twice.

Nothing is lost and re-runs are cheap. Per caption file the action is one of:

- `written`   the file was missing (or empty) and now holds the planned text;
- `unchanged` it already holds the planned text (surrounding white space and a UTF-8 BOM
  are ignored) and is not touched, so its modification time stays;
- `kept`      it holds something else (a hand edit) and is left alone; `--overwrite`
  replaces it instead (`replaced`);
- `no caption` the file name gives no text (e.g. `_3.png`) and no caption file exists;
- `failed`    the file could not be read or written (the reason is logged).

Every run writes its per-file actions to `<instance_data_dir>/.dbtools/extract-<UTC
time>.log` (a folder every image listing skips; `ExtractConfig.log_dir` puts the logs
elsewhere; lines in folder order, names in code-point order) and prints them with
`--verbose`. The screen gets a progress bar over all images of all concepts and a summary.

Caption files are written atomically, so a reader never sees half a file: a new file
with `dbtools.core.atomic.atomic_create` (never replaces a file that appeared since the scan),
a replaced one with a temporary file in the same folder and `os.replace`. There is no
fsync per file: flushing 100,000 tiny files one by one would dominate the run, a crash of
the program still leaves each file old or new, and the one thing a power cut can leave
behind, an empty caption file, is treated as missing and rewritten by the next run.

Speed: one `os.scandir` per folder gives both the images and the existing file names,
so only caption files that exist are opened (and only read); nothing else is stat'ed.
"""

from __future__ import annotations

import argparse
import codecs
import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dbtools.core.atomic import TMP_PREFIX, atomic_create, atomic_put, atomic_write_bytes, remove_leftovers
from dbtools.core.textio import CaptionEncodingError, decode_caption
from dbtools.dataset.captions import (
    TEMPLATE_CAPTION_ONLY,
    apply_template,
    caption_file_name,
    caption_from_filename,
    default_template,
    template_problems,
)
from dbtools.dataset.concepts import (
    Concept,
    ConceptError,
    concepts_problems,
    overlap_problems,
    read_concepts,
    write_concepts,
)
from dbtools.dataset.images import is_image_name, is_skipped_dir, natural_key

logger = logging.getLogger(__name__)

NAMINGS = ("sidecar", "stem")
CAPTION_TEMPLATE_KEY = "caption_template"
LOG_FOLDER = ".dbtools"

WRITTEN, REPLACED, UNCHANGED, KEPT, NO_CAPTION, FAILED = (
    "written", "replaced", "unchanged", "kept", "no caption", "failed")
ACTIONS = (WRITTEN, REPLACED, UNCHANGED, KEPT, NO_CAPTION, FAILED)


@dataclass
class ExtractConfig:
    """How to turn file names into caption files (the same for every concept).

    `template`: overrides each concept's template (see the module docstring);
    `naming`: `sidecar` (`<image>.txt`) or `stem` (`<stem>.txt`); `overwrite`: replace
    caption files that differ from the plan; `verbose`: every action on the screen too;
    `recursive`: include sub-folders; `log_dir`: where logs go (default
    `<instance_data_dir>/.dbtools`); `write_concepts_list`: write the processed concepts
    there; `progress`: show a progress bar.
    """

    template: str | None = None
    naming: str = "sidecar"
    overwrite: bool = False
    verbose: bool = False
    recursive: bool = True
    log_dir: str | None = None
    write_concepts_list: str | None = None
    progress: bool = True


@dataclass
class ExtractSummary:
    """What a run did. `counts` has one entry per image for each action in `ACTIONS`."""

    counts: Counter = field(default_factory=Counter)
    kept: list[Path] = field(default_factory=list)
    legacy: list[Path] = field(default_factory=list)
    no_caption: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    disk_full: list[tuple[Path, int]] = field(default_factory=list)
    """Caption files not written because the disk was full, with their sizes in bytes."""
    log_files: list[Path] = field(default_factory=list)
    concepts: list[Concept] = field(default_factory=list)
    concepts_list: Path | None = None

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        """True when every image has a usable caption file."""
        return not self.no_caption and not self.failed and not self.disk_full

    def disk_full_message(self) -> str:
        """One line for every write the full disk stopped: where, how many, space needed."""
        folders = sorted({shown(p.parent) for p, _ in self.disk_full})
        # Each small file takes at least one block (4 KB on most disks) plus its directory entry.
        needed = sum(max(size, 4096) for _, size in self.disk_full)
        where = folders[0] + (f" (and {len(folders) - 1} more folders)" if len(folders) > 1 else "")
        return (f"{where}: the disk is full; {len(self.disk_full)} caption file(s) were not written. "
                f"Free at least {needed / 1024:.0f} KB and run extract again (files already written are kept).")

    def describe(self) -> str:
        """A few lines for the screen: counts, then the files that need attention."""
        parts = ", ".join(f"{self.counts[a]} {a}" for a in ACTIONS)
        lines = [f"{self.images} images in {len(self.concepts)} concept(s): {parts}."]
        if self.kept:
            lines.append(f"{len(self.kept)} caption file(s) differ from their file name and were "
                         "kept (hand edits?); --overwrite replaces them. First: " + shown(self.kept[0]))
        if self.legacy:
            lines.append(f"{len(self.legacy)} kept file(s) use the old 'caption|instance|class' "
                         "format, which training reads literally: re-run with --overwrite.")
        for image in self.no_caption[:5]:
            lines.append(f"{shown(image)}: the file name gives no caption. Rename the image or write "
                         "its caption file by hand.")
        for path, reason in self.failed[:5]:
            lines.append(f"{shown(path)}: {reason}")
        if self.disk_full:
            lines.append(self.disk_full_message())
        hidden = len(self.no_caption[5:]) + len(self.failed[5:])
        if hidden:
            lines.append(f"... and {hidden} more; see the log.")
        lines += [f"log: {shown(p)}" for p in self.log_files]
        if self.concepts_list:
            lines.append(f"concepts list: {self.concepts_list}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- pure rules


def plan_caption(image_name: str, concept: Concept, template: str | None = None) -> str:
    """The text the caption file of `image_name` should hold (no I/O).

    `template=None` means the default for the concept's prompts (method 1 or 2).
    """
    if template is None:
        template = default_template(concept.instance_prompt, concept.class_prompt)
    return apply_template(template, caption_from_filename(image_name),
                          concept.instance_prompt, concept.class_prompt)


def concept_template(concept: Concept, template: str | None = None) -> str:
    """The template whose result goes into this concept's caption files.

    `template` (the `--template` flag) wins; then the `caption_template` recorded by an
    earlier run; then the default for the concept's prompts. A concept with a
    `prompt_template` gets the caption alone: training adds the prompts.
    """
    if concept.prompt_template:
        return TEMPLATE_CAPTION_ONLY
    recorded = concept.extra.get(CAPTION_TEMPLATE_KEY)
    return template or recorded or default_template(concept.instance_prompt, concept.class_prompt)


def decide(existing: bytes | None, planned: bytes, overwrite: bool) -> str:
    """The action for one caption file, given its current bytes (None: no file)."""
    if existing is not None:
        current = existing.removeprefix(codecs.BOM_UTF8).strip()
        if current:
            if current == planned:
                return UNCHANGED
            return REPLACED if overwrite and planned else KEPT
    return WRITTEN if planned else NO_CAPTION


def is_legacy_caption(existing: bytes) -> bool:
    """True for the old tool's `caption|instance|class` files, which training reads literally."""
    return existing.count(b"|") == 2 and b"\n" not in existing.strip()


def extract_problems(concepts: Sequence[Concept], cfg: ExtractConfig) -> list[str]:
    """Everything that stops extraction, as messages that name the concept and the fix."""
    if not concepts:
        return ["No concepts given: set --instance_data_dir or --concepts_list."]
    problems = []
    if cfg.naming not in NAMINGS:
        problems.append(f"naming {cfg.naming!r} is unknown; use one of {', '.join(NAMINGS)}.")
    if cfg.template is not None:
        problems += template_problems(cfg.template)
    problems += concepts_problems(concepts)
    for i, concept in enumerate(concepts):
        where = f"concept {i + 1}"
        recorded = concept.extra.get(CAPTION_TEMPLATE_KEY)
        if recorded is not None:
            if not isinstance(recorded, str):
                problems.append(f"{where}: '{CAPTION_TEMPLATE_KEY}' must be a string.")
            else:
                problems += [f"{where}: {p}" for p in template_problems(recorded)]
        if concept.prompt_template and cfg.template:
            problems.append(f"{where} has a prompt_template, which training applies to every "
                            "caption; --template would add the prompts a second time. Use one.")
    return problems + overlap_problems(concepts, cfg.recursive)


# --------------------------------------------------------------------------- the run


@dataclass
class ScannedFolder:
    """One folder: its path, its image names (sorted), all its file names."""

    path: str
    images: list[str]
    files: set[str]


def scan_folder(root: str | os.PathLike, recursive: bool = True) -> list[ScannedFolder]:
    """`root` and (with `recursive`) its sub-folders, each read by one `os.scandir`.

    Skips hidden and tool folders like `list_images` and does not follow links to
    folders; an unreadable sub-folder is skipped with a warning.
    """
    folders, pending = [], [os.fspath(root)]
    while pending:
        path = pending.pop()
        images, files, subdirs = [], set(), []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    name = entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if recursive and not is_skipped_dir(name):
                            subdirs.append(entry.path)
                        continue
                    files.add(name)
                    if is_image_name(name) and (not entry.is_symlink() or _leads_to_file(entry)):
                        images.append(name)
        except OSError as exc:
            if not folders:
                raise
            logger.warning("skipping %s: %s", path, exc)
            continue
        images.sort()  # code-point order: a natural sort would cost more than the writes
        folders.append(ScannedFolder(path, images, files))
        pending += sorted(subdirs, key=natural_key, reverse=True)
    return folders


def _leads_to_file(entry: os.DirEntry) -> bool:
    """For a link: True when it leads to a file; a loop, a dangling link or a link to a
    folder is skipped with a warning."""
    try:
        if entry.is_file():
            return True
    except OSError:  # a link loop raises ELOOP here
        pass
    logger.warning("skipping %s: a link that loops, leads nowhere or to a folder", entry.path)
    return False


def run_extract(concepts: Sequence[Concept], cfg: ExtractConfig | None = None) -> ExtractSummary:
    """Write the caption files of every concept; return what was done.

    Raises `ConceptError` listing every problem before anything is written. Never
    rewrites a file whose content is already right; keeps differing files unless
    `cfg.overwrite`. Writes one log per concept and, with `cfg.write_concepts_list`,
    the processed concepts (see the module docstring for both).
    """
    cfg = cfg or ExtractConfig()
    concepts = list(concepts)
    problems = extract_problems(concepts, cfg)
    if problems:
        raise ConceptError("\n".join(["Problems with the concepts:", *problems]))
    _warn_about_prompts(concepts, cfg)
    scans = [scan_folder(c.instance_data_dir, cfg.recursive) for c in concepts]
    _remove_leftovers(scans, concepts, cfg)
    total = sum(len(f.images) for folders in scans for f in folders)
    summary = ExtractSummary()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    # With --verbose, log lines go through tqdm so they do not break the bar.
    redirect = logging_redirect_tqdm() if cfg.verbose and cfg.progress else nullcontext()
    with redirect, tqdm(total=total, unit="img", desc="caption files", mininterval=0.5,
                        disable=not cfg.progress) as bar:
        for index, (concept, folders) in enumerate(zip(concepts, scans)):
            template = concept_template(concept, cfg.template)
            lines = _extract_concept(concept, template, folders, cfg, summary, bar)
            _write_log(concept, template, cfg, lines, stamp, index, len(concepts), summary)
            summary.concepts.append(processed_concept(concept, template))
    # With stem naming two images can share a caption file: list each file once.
    summary.kept = list(dict.fromkeys(summary.kept))
    summary.legacy = list(dict.fromkeys(summary.legacy))
    if cfg.write_concepts_list:
        try:
            summary.concepts_list = write_concepts(cfg.write_concepts_list, summary.concepts)
        except OSError as exc:  # the summary must still reach the screen
            _failed(summary, cfg.write_concepts_list, exc, 4096)
    return summary


def _remove_leftovers(scans: list[list[ScannedFolder]], concepts: Sequence[Concept], cfg: ExtractConfig) -> None:
    """Remove what an extract that was killed left in the folders it writes to: temporary
    files named `.tmp-<pid>-<n>`, untouched for a while (`dbtools.core.atomic.remove_leftovers`)."""
    folders = {f.path for found in scans for f in found if any(n.startswith(TMP_PREFIX) for n in f.files)}
    folders |= {cfg.log_dir or os.path.join(c.instance_data_dir, LOG_FOLDER) for c in concepts}
    if cfg.write_concepts_list:
        folders.add(os.path.dirname(os.path.abspath(cfg.write_concepts_list)))
    for folder in sorted(folders):
        remove_leftovers(folder, ("file",), suffixes=("",))


def processed_concept(concept: Concept, template: str) -> Concept:
    """The concept as written to `concepts_list.json`: the caption template recorded."""
    if concept.prompt_template:
        return replace(concept, extra=dict(concept.extra))
    return replace(concept, extra={**concept.extra, CAPTION_TEMPLATE_KEY: template})


def _warn_about_prompts(concepts: Sequence[Concept], cfg: ExtractConfig) -> None:
    for i, concept in enumerate(concepts):
        template = concept_template(concept, cfg.template)
        if "{caption}" not in template:
            logger.warning("concept %d: template %r has no {caption}: every image of %s gets the "
                           "same prompt.", i + 1, template, concept.instance_data_dir)
        if concept.class_prompt.strip() and not concept.class_data_dir.strip():
            logger.warning("concept %d: a class_prompt without a class_data_dir; training with "
                           "prior preservation will need a folder for the class images.", i + 1)


def _extract_concept(concept: Concept, template: str, folders: list[ScannedFolder],
                     cfg: ExtractConfig, summary: ExtractSummary, bar) -> list[str]:
    """Process one concept's folders; return its log lines.

    This loop runs once per image, so the common case (no caption file yet) takes a
    short path: plain string operations and four system calls (`atomic_create`).
    """
    plan = caption_planner(concept, template)
    root = os.fspath(concept.instance_data_dir)
    counts = summary.counts
    stem = cfg.naming == "stem"
    lines: list[str] = []
    for folder in folders:
        rel = os.path.relpath(folder.path, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        base = os.path.join(folder.path, "")
        files = folder.files
        for image in folder.images:
            if not (image.isascii() or _is_utf8(image)):
                counts[FAILED] += 1
                lines.append(_undecodable_name(summary, base, prefix, image))
                bar.update()
                continue
            target = caption_file_name(image, "stem") if stem else image + ".txt"
            text = plan(image)
            action = ""
            if text and target not in files:  # the usual first run: a new file
                try:
                    atomic_create(base + target, text.encode("utf-8"), fsync=False)  # docstring
                    files.add(target)
                    action, note = WRITTEN, ""
                except FileExistsError:  # appeared since the scan: compare it like any other
                    files.add(target)
                except OSError as exc:
                    action, note = _failed(summary, base + target, exc, len(text.encode("utf-8")))
            if not action:
                action, note = _process_file(base, image, target, text.encode("utf-8"), files,
                                             cfg.overwrite, summary)
            counts[action] += 1
            line = f"{action}\t{prefix}{target}\t{text}{note}"
            lines.append(line)
            if cfg.verbose:
                logger.info("%s", line.replace("\t", "  "))
            bar.update()
    return lines


def _failed(summary: ExtractSummary, path: str, exc: OSError, size: int = 0) -> tuple[str, str]:
    name = os.path.basename(path)
    if exc.errno == errno.ENAMETOOLONG:
        reason = (f"the caption file name is {len(os.fsencode(name))} bytes, over the file system's "
                  "limit (usually 255). Use --naming stem (writes <stem>.txt), or shorten the image name.")
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        summary.disk_full.append((Path(path), size))
        return FAILED, "\tdisk full"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = (f"permission denied, cannot write in {os.path.dirname(path)}. Make the folder "
                  "writable, or copy the images to a folder you can write to.")
    else:
        reason = f"cannot read or write the caption file ({exc.strerror or exc})."
    summary.failed.append((Path(path), reason))
    return FAILED, f"\t{reason}"


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes kept as surrogates by os.listdir
        return False
    return True


def shown(path: str | os.PathLike) -> str:
    """`path` printable: bytes that are not UTF-8 are shown as `\\xNN`."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _undecodable_name(summary: ExtractSummary, base: str, prefix: str, image: str) -> str:
    summary.failed.append((Path(shown(base + image)), "the file name is not valid UTF-8, so its caption "
                           "cannot be written or trained on. Rename the image (e.g. in a file manager)."))
    return f"{FAILED}\t{shown(prefix + image)}\t\tfile name is not valid UTF-8"


def _process_file(base: str, image: str, target: str, planned: bytes, files: set[str],
                  overwrite: bool, summary: ExtractSummary) -> tuple[str, str]:
    """Compare, write if needed; return the action and a log note ('' or '\\t<note>')."""
    path = base + target
    try:
        existing = _read(path) if target in files else None
        if existing is not None:  # compared as text: a UTF-16 file holding the plan is unchanged
            existing = decode_caption(existing, path).encode("utf-8")
        action = decide(existing, planned, overwrite)
        if action == WRITTEN or action == REPLACED:
            atomic_put(path, planned, fsync=False)  # why no fsync: module docstring
            files.add(target)
    except CaptionEncodingError as exc:
        summary.failed.append((Path(path), str(exc)))
        return FAILED, f"\t{exc}"
    except OSError as exc:
        return _failed(summary, path, exc, len(planned))
    if action == NO_CAPTION:
        summary.no_caption.append(Path(base + image))
        return action, "\tthe file name gives no caption"
    if action == KEPT:
        summary.kept.append(Path(path))
        if is_legacy_caption(existing):
            summary.legacy.append(Path(path))
            return action, "\told caption|instance|class format"
        return action, "\tdiffers from the file name (hand edit?); --overwrite replaces it"
    if action == WRITTEN and existing is not None:
        return action, "\twas empty"
    return action, ""


def _read(path: str) -> bytes:
    """The whole file, with as few system calls as possible (caption files are small)."""
    fd = os.open(path, _READ_FLAGS)
    try:
        data = os.read(fd, 65536)
        if len(data) < 65536:
            return data
        chunks = [data]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def caption_planner(concept: Concept, template: str) -> Callable[[str], str]:
    """`plan_caption` for many names of one concept, with the template filled in once.

    Gives exactly `plan_caption(name, concept, template)`. The template is filled with
    a marker for the caption; a caption without commas (the usual case) then replaces
    the marker, since the comma and space clean-up cannot reach into it.
    """
    ip, cp = concept.instance_prompt, concept.class_prompt
    marker = "\x00"
    filled = None
    if marker not in template + ip + cp:
        filled = apply_template(template, marker, ip, cp)

    def plan(name: str) -> str:
        caption = caption_from_filename(name)
        if filled is None or not caption or "," in caption:
            return apply_template(template, caption, ip, cp)
        return filled.replace(marker, caption)

    return plan


def _write_log(concept: Concept, template: str, cfg: ExtractConfig, lines: list[str],
               stamp: str, index: int, n_concepts: int, summary: ExtractSummary) -> None:
    """Write one concept's log in one go; a log that cannot be written is only a warning."""
    if cfg.log_dir:
        folder = Path(cfg.log_dir)
        base = f"extract-{stamp}" + (f"-concept{index + 1}" if n_concepts > 1 else "")
    else:
        folder = Path(concept.instance_data_dir) / LOG_FOLDER
        base = f"extract-{stamp}"
    counts = Counter(line.split("\t", 1)[0] for line in lines)
    header = [
        f"# dbtools extract, {stamp}",
        f"# instance_data_dir: {concept.instance_data_dir}",
        f"# template: {template}",
        f"# naming: {cfg.naming}; overwrite: {'yes' if cfg.overwrite else 'no'}",
        "# " + ", ".join(f"{counts[a]} {a}" for a in ACTIONS),
        "# action<TAB>caption file<TAB>caption planned from the file name[<TAB>note]",
    ]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{base}.log"
        n = 1
        while path.exists():
            n += 1
            path = folder / f"{base}-{n}.log"
        text = "\n".join(header + lines) + "\n"  # folder names that are not UTF-8: shown as \xNN
        atomic_write_bytes(path, shown(text).encode("utf-8"), fsync=False)  # a log: no wait
    except OSError as exc:
        logger.warning("could not write the log in %s (%s); the summary is all there is.", folder, exc)
        return
    summary.log_files.append(path)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m dbtools extract",
        description="Write a caption file for every image from its file name "
                    "(`a red car_3.png` -> `a red car_3.png.txt` holding `a red car`), "
                    "optionally with an instance and class prompt; write concepts_list.json.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--instance_data_dir", help="folder of images (one concept)")
    source.add_argument("--concepts_list", help="concepts_list.json: process every concept in it")
    parser.add_argument("--instance_prompt", default=None, help="e.g. 'sks' (method 2)")
    parser.add_argument("--class_prompt", default=None, help="e.g. 'a car' (method 2)")
    parser.add_argument("--class_data_dir", default=None, help="class image folder (recorded only)")
    parser.add_argument("--template", default=None,
                        help="prompt template with {caption}, {instance_prompt}, {class_prompt}; "
                             "default '{caption}' without prompts, else "
                             "'{instance_prompt}, {caption}, {class_prompt}'")
    parser.add_argument("--naming", choices=NAMINGS, default="sidecar",
                        help="sidecar: <image file>.txt (default, what --read_prompts_from_txts "
                             "reads); stem: <stem>.txt (kohya/EveryDream2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace caption files that differ (hand edits)")
    parser.add_argument("--verbose", action="store_true", help="print every file's action")
    parser.add_argument("--no_recursive", dest="recursive", action="store_false",
                        help="only the top folder, not its sub-folders")
    parser.add_argument("--write_concepts_list", default=None,
                        help="write the processed concept(s) here (Shivam's format)")
    parser.add_argument("--log_dir", default=None,
                        help="where the log goes (default <instance_data_dir>/.dbtools)")
    parser.add_argument("--no_progress", dest="progress", action="store_false",
                        help="no progress bar")
    return parser


def concepts_from_args(args: argparse.Namespace) -> list[Concept]:
    """The concepts a command line asks for (raises `ConceptError` for a bad file)."""
    if args.concepts_list:
        return read_concepts(args.concepts_list)
    return [Concept(instance_data_dir=args.instance_data_dir,
                    instance_prompt=args.instance_prompt or "",
                    class_prompt=args.class_prompt or "",
                    class_data_dir=args.class_data_dir or "")]


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 when every image has a caption file, 1 when some have none; bad input raises
    `ConceptError` (the entry point reports it and exits 2)."""
    args = build_parser().parse_args(argv)
    if args.concepts_list and any(v is not None for v in
                                  (args.instance_prompt, args.class_prompt, args.class_data_dir)):
        raise ConceptError("--instance_prompt/--class_prompt/--class_data_dir go with "
                           "--instance_data_dir; with --concepts_list set them in the file.")
    cfg = ExtractConfig(template=args.template, naming=args.naming, overwrite=args.overwrite,
                        verbose=args.verbose, recursive=args.recursive, log_dir=args.log_dir,
                        write_concepts_list=args.write_concepts_list, progress=args.progress)
    summary = run_extract(concepts_from_args(args), cfg)
    print(summary.describe())
    return 0 if summary.ok else 1
