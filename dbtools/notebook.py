"""Helpers behind the notebook's cells: Colab/Drive, login, training launch, caption
editor, inference, the Gradio UI and safe cleanup.

Every cell of `KaliYuga_DreamBooth.ipynb` is a few lines calling into this module, so the
logic is tested here rather than in the notebook. Importing it has no side effects;
ipywidgets, gradio, torch and diffusers are imported only by the functions that use them.
Everything works in Colab, in local Jupyter and in a plain Python process (tests, CI).
"""

from __future__ import annotations

import codecs
import hashlib
import html
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TextIO

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

logger = logging.getLogger(__name__)

DRIVE_MOUNTPOINT = "/content/drive"
DRIVE_ROOT = "/content/drive/MyDrive"
CONFIRM_WORD = "DELETE"
"""What the cleanup cell's confirm field must contain before anything is deleted."""


# =========================================================================== environment


class _CellHandler(logging.Handler):
    """Writes log lines to whatever `sys.stdout` is now (in a notebook: the running cell)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # logging must never break a cell
            self.handleError(record)


def enable_logging(level: int | str = logging.INFO) -> None:
    """Show dbtools' messages (progress notes, warnings, skipped steps) in the notebook.

    Safe to call more than once: one handler is added to the `dbtools` logger, and
    later calls only change the level.
    """
    log = logging.getLogger("dbtools")
    log.setLevel(level)
    if not any(isinstance(h, _CellHandler) for h in log.handlers):
        handler = _CellHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False  # no second copy through a root handler


def in_colab() -> bool:
    """True when running inside Google Colab."""
    if "google.colab" in sys.modules:
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def mount_drive(mountpoint: str = DRIVE_MOUNTPOINT) -> bool:
    """Mount Google Drive at `mountpoint` in Colab; return True when it is mounted.

    Outside Colab nothing is mounted: this logs why and returns False, so the same
    notebook cell runs in local Jupyter and in CI.
    """
    if not in_colab():
        logger.info("Not running in Colab: Google Drive is not mounted; local paths are used as given.")
        return False
    if os.path.isdir(os.path.join(mountpoint, "MyDrive")):
        logger.info("Google Drive is already mounted at %s", mountpoint)
        return True
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(mountpoint)
    return True


def resolve_output_dir(
    path: str | os.PathLike,
    save_to_gdrive: bool,
    drive_root: str | os.PathLike = DRIVE_ROOT,
    *,
    colab: bool | None = None,
) -> Path:
    """Where outputs go: `path` on Google Drive when `save_to_gdrive`, else as given.

    Never adds the Drive prefix twice: a path already under `drive_root` or its mount
    point (`/content/drive`) is kept, and a relative path that starts with the tail of
    the prefix (`MyDrive/x`, `drive/MyDrive/x`) is completed rather than nested.
    Relative paths are joined to `drive_root`; other absolute paths are kept (with a
    warning, they are not on Drive). Trailing slashes, `~` and `.`/`..` are normalised.
    `save_to_gdrive` is ignored outside Colab (`colab` overrides the detection).
    """
    text = str(path).strip()
    if not text:
        raise ValueError("The output folder is empty: set OUTPUT_DIR to a folder name.")
    p = Path(os.path.normpath(os.path.expanduser(text)))
    if not save_to_gdrive:
        return p
    if not (in_colab() if colab is None else colab):
        logger.warning("save_to_gdrive is on but this is not Colab: saving to %s on this machine.", p)
        return p
    root = Path(os.path.normpath(str(drive_root)))
    if p.is_absolute():
        if not (p == root.parent or root.parent in p.parents):
            logger.warning("%s is not on Google Drive (%s): files there are lost when the runtime ends.",
                           p, root)
        return p
    for k in range(1, len(root.parts)):
        tail = root.parts[k:]
        if p.parts[: len(tail)] == tail:
            return Path(*root.parts[:k], *p.parts)
    return root / p


def gpu_report() -> str:
    """One line per CUDA GPU: name, total and free memory; a clear note without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return format_gpu_report([])
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        devices.append((torch.cuda.get_device_name(i), total, free))
    return format_gpu_report(devices)


def format_gpu_report(devices: list[tuple[str, int, int]]) -> str:
    """Text for `gpu_report` from `(name, total_bytes, free_bytes)` per GPU."""
    if not devices:
        return ("No CUDA GPU found: running on the CPU. Training a real model needs a GPU "
                "(in Colab: Runtime > Change runtime type > GPU); the tiny test models work on CPU.")
    gib = 1024 ** 3
    return "\n".join(f"GPU {i}: {name}, {total / gib:.1f} GiB total, {free / gib:.1f} GiB free"
                     for i, (name, total, free) in enumerate(devices))


REPORTED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub",
                     "safetensors", "bitsandbytes", "xformers", "Pillow", "ipywidgets", "gradio")


def versions_report(packages: Iterable[str] = REPORTED_PACKAGES) -> str:
    """Python, dbtools and package versions (read from metadata, nothing is imported)."""
    import importlib.metadata as md
    import platform

    from dbtools import __version__

    lines = [f"python {platform.python_version()}", f"dbtools {__version__}"]
    for name in packages:
        try:
            lines.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)


def hf_login(env_var: str = "HF_TOKEN") -> str:
    """Make sure the Hugging Face Hub can be used; return where the token comes from.

    `"env"`: `$HF_TOKEN` is set and huggingface_hub uses it directly (nothing is stored).
    `"stored"`: a token from an earlier login (or a Colab secret) is already available.
    `"prompt"`: `huggingface_hub.notebook_login()` shows its password widget. This
    function never writes or prints the token itself.
    """
    import huggingface_hub

    if os.environ.get(env_var, "").strip():
        logger.info("Using the Hugging Face token from $%s.", env_var)
        return "env"
    if huggingface_hub.get_token():
        logger.info("Already logged in to the Hugging Face Hub.")
        return "stored"
    huggingface_hub.notebook_login()
    return "prompt"


# =========================================================================== weights


def latest_weights(output_dir: str | os.PathLike) -> Path | None:
    """The complete weights folder with the highest step, or None when there is none.

    Half-written saves (`.tmp-*` folders, folders without `model_index.json`) are skipped.
    """
    from dbtools.preview import find_weight_steps

    found = find_weight_steps(output_dir)
    return found[-1][1] if found else None


def weights_for_step(output_dir: str | os.PathLike, step: int) -> Path:
    """The complete weights folder saved at `step`; `FileNotFoundError` lists the saved steps."""
    from dbtools.preview import find_weight_steps

    found = dict(find_weight_steps(output_dir))
    if int(step) in found:
        return found[int(step)]
    have = ", ".join(str(s) for s in found) or "none yet"
    raise FileNotFoundError(f"{Path(output_dir) / str(step)}: no complete weights saved at step {step}. "
                            f"Saved steps: {have}. Pick one of them, or leave the step empty for the latest.")


# =========================================================================== training launch


def flag_args(**flags: Any) -> list[str]:
    """Command-line flags from keyword arguments named after the flags.

    `True` -> bare `--flag`; `False`/`None` -> omitted; a list or tuple -> `--flag a b`;
    anything else -> `--flag=value` (the `=` keeps values that start with `-` intact).
    """
    args: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + name
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            if value:
                args += [flag, *(str(v) for v in value)]
        else:
            args.append(f"{flag}={os.fspath(value) if isinstance(value, os.PathLike) else value}")
    return args


def build_train_command(
    *,
    script: str | os.PathLike = "train_dreambooth.py",
    launch_args: Iterable[str] = (),
    **flags: Any,
) -> list[str]:
    """The argv for `accelerate launch <script> <flags>`, the same flags the CLI takes.

    Keyword arguments are named after `train_dreambooth.py`'s flags
    (`pretrained_model_name_or_path=...`, `with_prior_preservation=True`, ...); see
    `flag_args` for how values become flags. `launch_args` go to `accelerate launch`
    itself (e.g. `["--num_processes=2"]`). Accelerate runs through the current Python
    (`python -m accelerate.commands.launch`), so the kernel's environment is used even
    when its `bin/` is not on PATH. A `hub_token` is refused: log in with `hf_login()`.
    """
    if flags.get("hub_token"):
        raise ValueError("Do not pass hub_token as a flag (it would be visible in the command and "
                         "saved with the run). Log in with hf_login() or set $HF_TOKEN instead.")
    flags.pop("hub_token", None)
    bad = [name for name in flags if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
    if bad:
        raise ValueError(f"not valid flag names: {bad}")
    args = flag_args(**flags)
    if Path(script).name == "train_dreambooth.py":
        check_train_flags(args)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *launch_args]
    return launcher + [os.fspath(script)] + args


def check_train_flags(args: list[str]) -> None:
    """Parse `args` with the training parser; `ValueError` naming a wrong flag or value.

    Catches typos in notebook fields before accelerate starts or a model loads.
    """
    import argparse
    import difflib

    from dbtools.train import build_parser

    parser = build_parser()
    parser.exit_on_error = False
    try:
        _, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as exc:
        raise ValueError(f"training flag problem: {exc}") from None
    known = [s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")]
    problems = []
    for arg in unknown:
        name = arg.split("=", 1)[0].lstrip("-")
        if arg.startswith("--"):
            close = difflib.get_close_matches(name, known, n=1)
            problems.append(f"--{name} is not a training flag" + (f" (did you mean --{close[0]}?)" if close else ""))
    if problems:
        raise ValueError("; ".join(problems))


class CommandError(RuntimeError):
    """A command run by `run_command(check=True)` failed; the message has its last output lines."""

    def __init__(self, argv: list[str], returncode: int, tail: list[str]):
        self.argv, self.returncode, self.tail = argv, returncode, tail
        last = "".join(tail).rstrip() or "(no output)"
        super().__init__(f"command failed with exit code {returncode}: {' '.join(argv[:4])} ...\n"
                         f"last output:\n{last}")


def run_command(
    argv: list[str],
    cwd: str | os.PathLike | None = None,
    *,
    check: bool = False,
    env: dict[str, str] | None = None,
    stream: TextIO | None = None,
) -> int:
    """Run `argv`, streaming its stdout and stderr (merged, in order) as they are written.

    Output goes to `stream` (default: the current `sys.stdout`, which in a notebook is
    the cell). Carriage returns are passed through, so progress bars update in place.
    Returns the exit code; with `check=True` a non-zero exit raises `CommandError`
    quoting the last lines. Interrupting (the notebook's stop button) stops the child
    and everything it started (e.g. the processes `accelerate launch` spawns).
    """
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # A session of its own: the whole process tree can be stopped together.
    proc = subprocess.Popen([os.fspath(a) for a in argv], cwd=cwd, env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=os.name == "posix")
    tail: list[str] = []
    try:
        _pump(proc.stdout, stream or sys.stdout, tail)
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        proc.stdout.close()
    if check and code != 0:
        raise CommandError(list(map(os.fspath, argv)), code, tail)
    return code


def _pump(pipe, out: TextIO, tail: list[str], keep_chars: int = 4000) -> None:
    """Copy decoded output from `pipe` to `out` as it arrives; put the last lines in `tail`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, recent = "", ""
    while True:
        chunk = pipe.read1(65536)
        text = pending + decoder.decode(chunk, final=not chunk)
        # hold a trailing "\r" back: it may be the first half of "\r\n"
        text, pending = (text[:-1], "\r") if chunk and text.endswith("\r") else (text, "")
        text = text.replace("\r\n", "\n")
        if text:
            out.write(text)
            out.flush()
            recent = (recent + text)[-keep_chars:]
        if not chunk:
            break
    lines = [line.rsplit("\r", 1)[-1] for line in recent.rstrip("\n").split("\n")]
    tail[:] = [line + "\n" for line in lines[-20:]]


def _stop(proc: subprocess.Popen) -> None:
    """Stop `proc` and its process group: SIGTERM, then SIGKILL after 10 seconds."""
    _signal_tree(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _signal_tree(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
        proc.wait()


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


# =========================================================================== caption editor

CAPTION_FORMATS = ("sidecar", "txt", "caption", "filename")
_FORMAT_ALIASES = {"text": "txt", "sidecar": "sidecar", "txt": "txt", "caption": "caption",
                   "filename": "filename"}
CACHE_DIR = ".dbtools"


def caption_path(image: Path, fmt: str) -> Path | None:
    """Where an image's caption lives in format `fmt` (None for `filename`: the name itself)."""
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt == "sidecar":
        return image.with_name(image.name + ".txt")
    if fmt == "txt":
        return image.with_suffix(".txt")
    if fmt == "caption":
        return image.with_suffix(".caption")
    if fmt == "filename":
        return None
    raise ValueError(f"unknown caption format {fmt!r}; use one of {', '.join(CAPTION_FORMATS)}.")


def read_caption(image: Path, fmt: str) -> str:
    """The image's current caption in format `fmt` ("" when its caption file is missing)."""
    from dbtools.captions import caption_from_filename

    path = caption_path(image, fmt)
    if path is None:
        return caption_from_filename(image.name)
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return ""


def free_caption_name(folder: Path, caption: str, ext: str, taken: set[str] = frozenset()) -> Path:
    """`<folder>/<safe caption>_<i><ext>` with the smallest `i` whose name is not in use."""
    from dbtools.captions import safe_filename_stem

    i = 0
    while True:
        suffix = f"_{i}{ext}"
        name = safe_filename_stem(caption, suffix=suffix) + suffix
        if name not in taken and not (folder / name).exists():
            return folder / name
        i += 1


def rename_no_overwrite(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; `FileExistsError` instead of ever replacing an existing `dst`."""
    try:
        os.link(src, dst)  # fails atomically if dst exists
    except FileExistsError:
        raise FileExistsError(f"{dst}: already exists; not overwriting it.") from None
    except OSError:  # no hard links here (e.g. some network drives): check, then rename
        if dst.exists():
            raise FileExistsError(f"{dst}: already exists; not overwriting it.") from None
        os.rename(src, dst)
        return
    os.unlink(src)


class CaptionEditor:
    """Review and fix captions of the images in `folder`, a page at a time.

    `fmt` is where captions live: `"sidecar"` (`<image>.txt`, what training reads),
    `"txt"` (`<stem>.txt`), `"caption"` (`<stem>.caption`) or `"filename"` (the caption
    is the file name, EveryDream style). Thumbnails are made only for the page shown and
    cached under `<folder>/.dbtools/thumbs/` (keyed by path, mtime and size), so large
    folders open instantly. The Python side works without a browser: `page(n)`,
    `items`, `set_caption(path, text)`, `save()`; `widget` is the ipywidgets UI.
    Nothing is written until `save()` (or the Save button).
    """

    def __init__(self, folder: str | os.PathLike, fmt: str = "sidecar", page_size: int = 24, thumb: int = 128):
        from dbtools.images import list_images

        if fmt not in _FORMAT_ALIASES:
            raise ValueError(f"unknown caption format {fmt!r}; use one of {', '.join(CAPTION_FORMATS)}.")
        if page_size < 1 or thumb < 16:
            raise ValueError("page_size must be at least 1 and thumb at least 16 pixels.")
        self.folder = Path(folder)
        self.fmt = _FORMAT_ALIASES[fmt]
        self.page_size = page_size
        self.thumb = thumb
        self.images: list[Path] = list_images(self.folder)
        self.current_page = 0
        self._saved: dict[Path, str] = {}
        self._edits: dict[Path, str] = {}
        self._ui: dict[str, Any] | None = None
        self._syncing = False
        if self.fmt == "txt":
            _warn_shared_stems(self.images)

    # ----------------------------------------------------------------- paging and captions

    @property
    def n_pages(self) -> int:
        return max(1, -(-len(self.images) // self.page_size))

    def page_images(self, n: int | None = None) -> list[Path]:
        """The images on page `n` (default: the current page)."""
        n = self.current_page if n is None else n
        return self.images[n * self.page_size:(n + 1) * self.page_size]

    def page(self, n: int) -> list[tuple[Path, str]]:
        """Show page `n` (0-based): make its thumbnails (cached) and return its items."""
        if not 0 <= n < self.n_pages:
            raise IndexError(f"page {n} does not exist; pages are 0..{self.n_pages - 1}.")
        self.current_page = n
        for image in self.page_images():
            self.thumbnail(image)
        if self._ui is not None:
            self._render()
        return self.items

    @property
    def items(self) -> list[tuple[Path, str]]:
        """`(image path, caption)` for the current page, including unsaved edits."""
        return [(image, self.caption(image)) for image in self.page_images()]

    def caption(self, image: Path) -> str:
        """The caption shown for `image`: the unsaved edit, else the saved one."""
        image = Path(image)
        if image in self._edits:
            return self._edits[image]
        if image not in self._saved:
            self._saved[image] = read_caption(image, self.fmt)
        return self._saved[image]

    def set_caption(self, image: str | os.PathLike, text: str) -> None:
        """Change the caption of `image` (any page); written by the next `save()`."""
        image = Path(image)
        if image not in set(self.images):
            raise KeyError(f"{image}: not one of the images in {self.folder}.")
        self.caption(image)  # remember the saved caption before editing
        self._edits[image] = text
        if self._ui is not None and not self._syncing:
            area = self._ui["areas"].get(image)
            if area is not None and area.value != text:
                self._syncing = True
                try:
                    area.value = text
                finally:
                    self._syncing = False

    @property
    def pending(self) -> dict[Path, str]:
        """Edited captions that differ from what is saved on disk."""
        from dbtools.captions import clean_caption

        return {img: text for img, text in self._edits.items()
                if clean_caption(text) != clean_caption(self._saved.get(img, ""))}

    # ----------------------------------------------------------------- saving

    def save(self) -> list[Path]:
        """Write every changed caption; return the files written (or renamed images).

        Caption files are written atomically. In `filename` format an image is renamed to
        `<safe caption>_<i><ext>` with the first free `i` (never overwriting a file) and
        the renames are logged to `<folder>/.dbtools/renames-<time>.jsonl`.
        """
        from dbtools.captions import clean_caption

        changes = {img: clean_caption(text) for img, text in self.pending.items()}
        if self.fmt == "filename":
            written = self._rename_images(changes)
        else:
            written = self._write_caption_files(changes)
        self._edits.clear()
        if self._ui is not None:
            self._render()
        return written

    def _write_caption_files(self, changes: dict[Path, str]) -> list[Path]:
        from dbtools.atomic import atomic_write_text

        written = []
        for image, text in changes.items():
            path = caption_path(image, self.fmt)
            atomic_write_text(path, text + "\n" if text else "")
            self._saved[image] = text
            self._edits.pop(image, None)
            written.append(path)
        logger.info("saved %d caption file(s) in %s", len(written), self.folder)
        return written

    def _rename_images(self, changes: dict[Path, str]) -> list[Path]:
        from dbtools import autocaption

        renamed: list[Path] = []
        taken: set[str] = set()
        log = None
        for image, text in changes.items():
            if not text:
                logger.warning("%s: empty caption; a file name needs one, so it was not renamed.", image)
                continue
            target = free_caption_name(image.parent, text, image.suffix, taken)
            log = log or autocaption.new_renames_log(self.folder)
            _record_rename(log, self.folder, image, target, text)
            taken.add(target.name)
            renamed.append(target)
            self._after_rename(image, target)
        if renamed:
            logger.info("renamed %d image(s); undo with: python -m dbtools caption --undo %s", len(renamed), log)
        return renamed

    def _after_rename(self, old: Path, new: Path) -> None:
        self.images[self.images.index(old)] = new
        self._edits.pop(old, None)
        self._saved.pop(old, None)
        self._saved[new] = read_caption(new, self.fmt)
        try:  # the image bytes did not change: keep its thumbnail
            cached = self.thumbnail_path(old, stat=new.stat())
            if cached.exists():
                os.replace(cached, self.thumbnail_path(new))
        except OSError:
            pass

    # ----------------------------------------------------------------- thumbnails

    @property
    def thumbs_dir(self) -> Path:
        return self.folder / CACHE_DIR / "thumbs"

    def thumbnail_path(self, image: Path, stat: os.stat_result | None = None) -> Path:
        """The cache file for `image`'s thumbnail; changes when the image changes."""
        st = stat or image.stat()
        key = f"{image.resolve()}|{st.st_mtime_ns}|{st.st_size}|{self.thumb}"
        return self.thumbs_dir / (hashlib.sha1(key.encode("utf-8")).hexdigest()[:24] + ".jpg")

    def thumbnail(self, image: Path) -> bytes:
        """JPEG bytes of `image`'s thumbnail, made once and then read from the cache."""
        from dbtools.atomic import atomic_save_image
        from dbtools.images import ImageError, load_rgb

        path = self.thumbnail_path(image)
        if path.is_file():
            return path.read_bytes()
        try:
            img = load_rgb(image)
        except ImageError as exc:
            logger.warning("%s", exc)
            return _placeholder_jpeg(self.thumb)
        img.thumbnail((self.thumb, self.thumb))
        atomic_save_image(img, path, quality=85)
        return path.read_bytes()

    # ----------------------------------------------------------------- widget

    @property
    def widget(self):
        """The ipywidgets editor (built on first use): thumbnails, captions, paging, Save."""
        if self._ui is None:
            self._ui = self._build_ui()
            self.page(self.current_page)
        return self._ui["box"]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _build_ui(self) -> dict[str, Any]:
        import ipywidgets as w

        prev_b = w.Button(description="◀ Prev", layout=w.Layout(width="90px"))
        next_b = w.Button(description="Next ▶", layout=w.Layout(width="90px"))
        save_b = w.Button(description="Save", button_style="success", icon="save")
        label, status = w.HTML(), w.HTML()
        grid = w.GridBox(layout=w.Layout(
            grid_template_columns=f"repeat(auto-fill, minmax({self.thumb + 60}px, 1fr))", grid_gap="8px"))
        prev_b.on_click(lambda _: self.page(max(0, self.current_page - 1)))
        next_b.on_click(lambda _: self.page(min(self.n_pages - 1, self.current_page + 1)))
        save_b.on_click(lambda _: self._save_clicked())
        box = w.VBox([w.HBox([prev_b, label, next_b, save_b, status]), grid])
        return dict(box=box, grid=grid, label=label, status=status, prev=prev_b, next=next_b,
                    save=save_b, areas={})

    def _render(self) -> None:
        import ipywidgets as w

        ui = self._ui
        first = self.current_page * self.page_size
        ui["label"].value = (f"&nbsp;page {self.current_page + 1}/{self.n_pages} &nbsp;"
                             f"(images {first + 1}-{first + len(self.page_images())} of {len(self.images)})&nbsp;"
                             if self.images else f"&nbsp;no images in {html.escape(str(self.folder))}&nbsp;")
        ui["prev"].disabled = self.current_page == 0
        ui["next"].disabled = self.current_page >= self.n_pages - 1
        ui["areas"] = {}
        for card in ui["grid"].children:  # free the previous page's widgets in the browser
            _close_tree(card)
        cards = []
        for image, caption in self.items:
            area = w.Textarea(value=caption, layout=w.Layout(width="100%", height="4.5em"))
            area.observe(lambda change, img=image: self._area_changed(img, change["new"]), names="value")
            ui["areas"][image] = area
            picture = w.Image(value=self.thumbnail(image), format="jpeg",
                              layout=w.Layout(max_width=f"{self.thumb}px", max_height=f"{self.thumb}px"))
            name = w.HTML(f"<small>{html.escape(image.name)}</small>")
            cards.append(w.VBox([picture, name, area], layout=w.Layout(border="1px solid #ddd", padding="4px")))
        ui["grid"].children = cards

    def _area_changed(self, image: Path, text: str) -> None:
        if not self._syncing:
            self._syncing = True
            try:
                self.set_caption(image, text)
            finally:
                self._syncing = False

    def _save_clicked(self) -> None:
        try:
            written = self.save()
        except Exception as exc:  # shown in the widget: a button click has no traceback to read
            logger.exception("saving captions failed")
            self._ui["status"].value = f"<b style='color:#c00'>Not saved: {html.escape(str(exc))}</b>"
            return
        self._ui["status"].value = f"Saved {len(written)} file(s)."


def _close_tree(widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def _warn_shared_stems(images: list[Path]) -> None:
    seen: dict[Path, Path] = {}
    for image in images:
        key = image.with_suffix("")
        if key in seen:
            logger.warning("%s and %s share the caption file %s.txt; use fmt='sidecar' to give each "
                           "image its own.", seen[key].name, image.name, key.name)
        seen.setdefault(key, image)


def _placeholder_jpeg(size: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (90, 90, 90))
    ImageDraw.Draw(img).text((4, size // 2), "unreadable", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _record_rename(log: Path, folder: Path, src: Path, dst: Path, caption: str) -> None:
    """Rename `src` to `dst` (never overwriting), recorded the way the auto-captioner does.

    The rename goes into `log` (`<folder>/.dbtools/renames-<time>.jsonl`) before it
    happens, so `python -m dbtools caption --undo <log>` can reverse it; afterwards the
    new name is added to the captioning manifest as a filename-format output, so a
    later captioning run of the folder keeps the hand-edited name.
    """
    from dbtools import autocaption

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p, folder)).as_posix()

    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; not overwriting it.")
    autocaption.append_jsonl(log, {"from": rel(src), "to": rel(dst)})
    rename_no_overwrite(src, dst)
    autocaption.append_jsonl(autocaption.manifest_path(folder), {
        "source": os.path.abspath(src), "output": rel(dst), "format": "filename",
        "caption": caption, "action": "renamed", "renames_log": log.name})


# =========================================================================== inference


@dataclass
class Generated:
    """One generated image with the settings that reproduce it."""

    image: "Image.Image"
    settings: dict[str, Any]
    path: Path | None = None


def check_generation_args(num_images: int, steps: int, guidance_scale: float,
                          height: int | None, width: int | None) -> None:
    """Raise one clear `ValueError` for settings the pipeline cannot use."""
    problems = []
    if int(num_images) < 1:
        problems.append(f"num_images={num_images}: generate at least 1 image.")
    if int(steps) < 1:
        problems.append(f"steps={steps}: use at least 1 inference step (20-50 is typical).")
    if guidance_scale < 0:
        problems.append(f"guidance_scale={guidance_scale}: use 0 or more (7.5 is typical).")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (int(v) < 8 or int(v) % 8):
            problems.append(f"{name}={v}: use a multiple of 8 (e.g. 512 or 768).")
    if problems:
        raise ValueError(" ".join(problems))


def load_inference_pipeline(pipe_or_path, scheduler: str | None = None):
    """A pipeline ready to generate: `pipe_or_path` as is, or loaded on the best device."""
    if not isinstance(pipe_or_path, (str, os.PathLike)):
        return pipe_or_path
    from dbtools.models import inference_dtype, load_pipeline, pick_device

    device = pick_device()
    pipe = load_pipeline(os.fspath(pipe_or_path), device=device, torch_dtype=inference_dtype(device),
                         scheduler=scheduler)
    pipe.set_progress_bar_config(leave=False)
    return pipe


def generation_settings(pipe, prompt: str, negative_prompt: str, seed: int, steps: int,
                        guidance_scale: float, width: int, height: int, scheduler: str | None) -> dict:
    """The settings recorded with a generated image."""
    return dict(prompt=prompt, negative_prompt=negative_prompt, seed=int(seed), steps=int(steps),
                guidance_scale=float(guidance_scale), scheduler=scheduler or type(pipe.scheduler).__name__,
                width=int(width), height=int(height), model=str(getattr(pipe, "name_or_path", "") or ""))


def a1111_parameters(s: dict) -> str:
    """Settings in AUTOMATIC1111's `parameters` text, which its PNG Info tab reads."""
    lines = [s["prompt"]]
    if s["negative_prompt"]:
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    lines.append(f"Steps: {s['steps']}, Sampler: {s['scheduler']}, CFG scale: {s['guidance_scale']}, "
                 f"Seed: {s['seed']}, Size: {s['width']}x{s['height']}, Model: {s['model']}")
    return "\n".join(lines)


def png_metadata(settings: dict):
    """PNG text chunks: `parameters` (AUTOMATIC1111 style) and `dbtools` (JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(settings))
    info.add_text("dbtools", json.dumps(settings, ensure_ascii=False))
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
) -> list[Generated]:
    """Generate images; each gets its own seed (`seed`, `seed+1`, ...), so image `i` is
    reproduced by `seed=seed+i, num_images=1`. A `None` or negative seed draws a random one.

    With `out_dir`, each image is saved atomically as `<n>-<seed>.png` (never replacing a
    file) with its settings in PNG text metadata. Returns images, settings and paths.
    """
    import torch

    check_generation_args(num_images, steps, guidance_scale, height, width)
    pipe = load_inference_pipeline(pipe_or_path, scheduler)
    if scheduler and not isinstance(pipe_or_path, (str, os.PathLike)):
        from dbtools.models import make_scheduler

        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    first = secrets.randbelow(2**31) if seed is None or int(seed) < 0 else int(seed)
    seeds = [first + i for i in range(int(num_images))]
    results: list[Generated] = []
    for start in range(0, len(seeds), max(1, batch_size)):
        chunk = seeds[start:start + max(1, batch_size)]
        images = pipe(prompt, negative_prompt=negative_prompt or None, num_images_per_prompt=len(chunk),
                      guidance_scale=guidance_scale, num_inference_steps=int(steps), height=height,
                      width=width, generator=[torch.Generator("cpu").manual_seed(s) for s in chunk]).images
        for s, img in zip(chunk, images):
            settings = generation_settings(pipe, prompt, negative_prompt, s, steps, guidance_scale,
                                           img.width, img.height, scheduler)
            results.append(Generated(img, settings))
    if out_dir is not None:
        _save_generated(results, Path(out_dir))
    return results


def _save_generated(results: list[Generated], out_dir: Path) -> None:
    from dbtools.atomic import atomic_save_image

    out_dir.mkdir(parents=True, exist_ok=True)
    n = _next_index(out_dir)
    for g in results:
        path = out_dir / f"{n:05d}-{g.settings['seed']}.png"
        while path.exists():
            n += 1
            path = out_dir / f"{n:05d}-{g.settings['seed']}.png"
        g.path = atomic_save_image(g.image, path, pnginfo=png_metadata(g.settings))
        n += 1
    logger.info("saved %d image(s) to %s", len(results), out_dir)


def generate_images(
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
) -> list:
    """Generate images (see `generate`); return the saved PNG paths when `out_dir` is
    given, else the PIL images."""
    results = generate(pipe_or_path, prompt, negative_prompt, num_images, guidance_scale, steps,
                       height, width, seed, scheduler, out_dir)
    return [g.path for g in results] if out_dir is not None else [g.image for g in results]


def read_png_settings(path: str | os.PathLike) -> dict:
    """The settings `generate` stored in a PNG (empty when it has none)."""
    from PIL import Image

    with Image.open(path) as img:
        text = img.info.get("dbtools")
    return json.loads(text) if text else {}


# =========================================================================== gradio UI

DEFAULT_SCHEDULER = "model default"


def build_gradio_app(pipe_or_path, out_dir: str | os.PathLike | None = None):
    """A `gradio.Blocks` app for generating images with one model.

    Fields: prompt, negative prompt, number of images, guidance, steps, width, height,
    seed (-1 = random) and scheduler; results go to a gallery (captioned with their
    seeds) and, with `out_dir`, are saved as PNGs with their settings. The API name of
    the generate action is `/generate`. Launch with `launch_gradio(app)`.
    """
    import gradio as gr

    from dbtools.models import SCHEDULERS

    pipe = load_inference_pipeline(pipe_or_path)
    base_scheduler = pipe.scheduler
    lock = threading.Lock()
    size = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def run(prompt, negative, n, guidance, steps, width, height, seed, scheduler):
        with lock:  # one pipeline, one request at a time
            pipe.scheduler = base_scheduler
            results = generate(pipe, prompt, negative or "", int(n), float(guidance), int(steps),
                               int(height), int(width), None if seed is None else int(seed),
                               None if scheduler in (None, "", DEFAULT_SCHEDULER) else scheduler, out_dir)
        gallery = [(g.image, f"seed {g.settings['seed']}") for g in results]
        saved = "\n".join(str(g.path) for g in results if g.path) or "(not saved: no output folder)"
        return gallery, saved

    with gr.Blocks(title="dbtools: generate") as app:
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=2)
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    n = gr.Slider(1, 8, value=1, step=1, label="Images")
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
                    steps = gr.Slider(1, 150, value=30, step=1, label="Steps")
                with gr.Row():
                    width = gr.Slider(min(64, size), 2048, value=size, step=8, label="Width")
                    height = gr.Slider(min(64, size), 2048, value=size, step=8, label="Height")
                with gr.Row():
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                    scheduler = gr.Dropdown([DEFAULT_SCHEDULER, *SCHEDULERS], value=DEFAULT_SCHEDULER,
                                            label="Scheduler")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png")
                saved = gr.Textbox(label="Saved files", lines=2)
        button.click(run, [prompt, negative, n, guidance, steps, width, height, seed, scheduler],
                     [gallery, saved], api_name="generate")
    return app


def launch_gradio(app, share: bool | None = None, **launch_kwargs):
    """Launch the app; `share` (a public link) defaults to True in Colab, False elsewhere."""
    return app.launch(share=in_colab() if share is None else share, **launch_kwargs)


# =========================================================================== cleanup


@dataclass
class CleanupPlan:
    """What `run_cleanup` would delete in `output_dir` and why everything else stays."""

    output_dir: Path
    delete: list[Path] = field(default_factory=list)
    """Weights folders to delete: complete, exported, not kept."""
    checkpoints: list[Path] = field(default_factory=list)
    """`checkpoint-*` resume-state folders (deleted only if `delete_checkpoints`)."""
    delete_checkpoints: bool = False
    kept: dict[Path, str] = field(default_factory=dict)
    """Weights folders that stay, with the reason."""

    @property
    def targets(self) -> list[Path]:
        return self.delete + (self.checkpoints if self.delete_checkpoints else [])


def _norm(path: str | os.PathLike) -> Path:
    """Absolute, symlink-resolved, without trailing slash, `~` expanded."""
    return Path(os.path.expanduser(os.fspath(path).strip())).resolve()


def _related(a: Path, b: Path) -> bool:
    """True when `a` and `b` are the same path or one contains the other."""
    return a == b or a in b.parents or b in a.parents


def cleanup_plan(
    output_dir: str | os.PathLike,
    keep: Iterable[str | os.PathLike] = (),
    exported: Iterable[str | os.PathLike] = (),
    delete_checkpoints: bool = False,
    delete_unexported: bool = False,
) -> CleanupPlan:
    """Decide which weights folders in `output_dir` can go; deletes nothing.

    A step folder directly inside `output_dir` is listed for deletion only when it is
    complete, listed in `exported` (already converted to a single file), holds no
    exported file (nothing in `exported`, no top-level `.safetensors`/`.ckpt` other than
    LoRA weights), and is not in `keep` (nor inside or around a kept path). Folders being
    written (`.tmp-*`), incomplete folders, symlinks, `output_dir` itself and anything
    outside it are never listed. `checkpoint-*` folders are listed separately.
    `delete_unexported=True` (an explicit opt-in) also lists complete folders that were
    never exported, still never a kept one. Paths may have trailing slashes.
    """
    from dbtools.preview import find_weight_steps

    root = _norm(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{output_dir}: not a folder. Check OUTPUT_DIR (is Google Drive mounted?).")
    keep_paths = [_norm(p) for p in keep if str(p).strip()]
    exported_paths = [_norm(p) for p in exported if str(p).strip()]
    plan = CleanupPlan(output_dir=root, delete_checkpoints=delete_checkpoints)
    for _, folder in find_weight_steps(root):
        reason = _keep_reason(root / folder.name, keep_paths, exported_paths, delete_unexported)
        if reason:
            plan.kept[root / folder.name] = reason
        else:
            plan.delete.append(root / folder.name)
    plan.checkpoints = sorted((p for p in root.iterdir() if p.name.startswith("checkpoint-")
                               and p.is_dir() and not p.is_symlink()), key=lambda p: _step_of(p.name))
    return plan


def _keep_reason(folder: Path, keep: list[Path], exported: list[Path], unexported_ok: bool) -> str | None:
    if folder.is_symlink():
        return "a link (never followed)"
    if any(_related(folder, k) for k in keep):
        return "chosen to keep"
    if any(e != folder and folder in e.parents for e in exported):
        return "contains an exported file"
    inside = _single_files_in(folder)
    if inside:
        return f"contains the single file {inside[0]}"
    if folder not in exported and not unexported_ok:
        return "not exported yet"
    return None


def _single_files_in(folder: Path) -> list[str]:
    """Top-level `.safetensors`/`.ckpt` files of a weights folder other than LoRA weights:
    exports written into the folder, which deleting it would lose."""
    from dbtools.train import LORA_WEIGHTS

    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != LORA_WEIGHTS
                  and p.suffix.lower() in (".safetensors", ".ckpt"))


def _step_of(name: str) -> int:
    digits = name.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def describe(plan: CleanupPlan) -> str:
    """A readable summary of `plan`: what goes, what stays and why, space freed."""
    lines = [f"Output folder: {plan.output_dir}"]
    targets = plan.targets
    if targets:
        total = sum(_du(p) for p in targets)
        lines.append(f"Will delete {len(targets)} folder(s), {total / 1024**3:.2f} GiB:")
        lines += [f"  - {p.name}" for p in targets]
    else:
        lines.append("Nothing to delete.")
    if plan.kept:
        lines.append("Keeping:")
        lines += [f"  + {p.name} ({why})" for p, why in plan.kept.items()]
    if plan.checkpoints and not plan.delete_checkpoints:
        lines.append("Keeping resume checkpoints: " + ", ".join(p.name for p in plan.checkpoints)
                     + " (set delete_checkpoints to remove them).")
    if targets:
        lines.append(f'Type {CONFIRM_WORD} in the confirm field to delete.')
    return "\n".join(lines)


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def run_cleanup(plan: CleanupPlan, confirm: str) -> list[Path]:
    """Delete the plan's folders, but only when `confirm` is exactly "DELETE"
    (surrounding spaces ignored); return the folders deleted.

    Each folder is checked again just before deletion (still a direct, non-link child of
    the output folder with a step or checkpoint name) and first renamed to a `.tmp-` name,
    so a deletion cut short never leaves something that looks like complete weights.
    """
    if (confirm or "").strip() != CONFIRM_WORD:
        logger.warning("Nothing deleted: type %s in the confirm field to delete the listed folders.",
                       CONFIRM_WORD)
        return []
    deleted = []
    for folder in plan.targets:
        if not _safe_to_delete(plan, folder):
            logger.warning("%s: skipped (changed since the plan was made, or not a weights folder).", folder)
            continue
        doomed = folder.with_name(f".tmp-deleting-{folder.name}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed)
        deleted.append(folder)
        logger.info("deleted %s", folder)
    return deleted


def _safe_to_delete(plan: CleanupPlan, folder: Path) -> bool:
    root = plan.output_dir
    name_ok = folder.name.isdigit() or re.fullmatch(r"checkpoint-\d+", folder.name) is not None
    return (name_ok and folder.parent == root and folder != root and folder not in plan.kept
            and folder.is_dir() and not folder.is_symlink() and _norm(folder).parent == _norm(root))
