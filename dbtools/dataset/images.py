"""The one image layer every stage uses: which files are images, and how to open them.

`list_images` decides what counts as an image (by extension, case-insensitive, never
sidecar files, OS junk or folders); `load_rgb` turns any of them into an upright RGB
picture or raises one `ImageError` that names the file and says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont, ImageOps

from dbtools.core.errors import FolderNotFound, UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".tga"}
)
"""Lower-case extensions we treat as images; matching is case-insensitive."""

# Folders that tools and operating systems leave next to user data.
_SKIP_DIRS = frozenset({".ipynb_checkpoints", ".dbtools", "__MACOSX", ".git", "__pycache__"})

# Pillow's own default is about 89 megapixels (a warning) and twice that (an error).
# We keep Pillow's limit in force and make its warning an error for our loads.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(UserError):
    """An image a user supplied cannot be used; the message names the file and the fix."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True when `path` names an image by its extension and is not a hidden/OS file."""
    return is_image_name(os.path.basename(os.fspath(path)))


def is_image_name(name: str) -> bool:
    """`is_image_file` for a bare file name (no folder part); fast for big folders."""
    if name.startswith("."):  # hidden files and macOS "._" resource forks
        return False
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def is_skipped_dir(name: str) -> bool:
    """True for folders that never hold user images: hidden, tool and OS folders."""
    return name.startswith(".") or name in _SKIP_DIRS


def has_images(folder: str | os.PathLike, recursive: bool = False) -> bool:
    """True when `folder` holds at least one image (see `list_images`); stops at the first.

    A missing folder has none.
    """
    pending = [os.fspath(folder)]
    while pending:
        try:
            with os.scandir(pending.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):  # like os.walk: no link loops
                        if recursive and not is_skipped_dir(entry.name):
                            pending.append(entry.path)
                    elif is_image_file(entry.name) and _is_file(entry):
                        return True
        except OSError:  # missing or unreadable: like os.walk, skip it
            continue
    return False


def _is_file(entry: os.DirEntry) -> bool:
    """`entry.is_file()`, False for a link that loops or leads nowhere (it raises for a loop)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def natural_key(text: str) -> list:
    """Sort key that orders `img2` before `img10` (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Every image file under `folder`, naturally sorted by relative path.

    Never returns folders, sidecar files (`.txt`, `.caption`), `Thumbs.db`, `.DS_Store`,
    hidden files, anything inside `.ipynb_checkpoints`/`.dbtools`, or links that loop or
    lead nowhere (logged); links to folders are not followed, so a loop cannot hang it.
    Raises `FolderNotFound` (a `UserError` and a `FileNotFoundError`) with a clear message if
    `folder` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FolderNotFound(f"{root}: not a folder. Check the path (is Google Drive mounted?).")
    found = [p for p in _walk(root, recursive) if is_image_file(p) and _is_real_file(p)]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def _is_real_file(path: Path) -> bool:
    if not path.is_symlink() or path.is_file():  # is_file is False for loops and dangling links
        return True
    logger.warning("skipping %s: a link that loops or leads nowhere", path)
    return False


def _walk(root: Path, recursive: bool) -> Iterable[Path]:
    if not recursive:
        with os.scandir(root) as it:
            for entry in it:
                if _is_file(entry):
                    yield Path(entry.path)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_skipped_dir(d)]
        for name in filenames:
            yield Path(dirpath) / name


def load_rgb(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Open `path` as an upright 8-bit RGB image, fully decoded.

    EXIF orientation is applied; palette, grey, alpha, CMYK and 16-bit/float modes are
    converted correctly (transparency composited on white, 16-bit scaled to 8-bit);
    animated images give their first frame. Decompression bombs (over `max_pixels`,
    default Pillow's limit), truncated and corrupt files raise `ImageError`.
    """
    path = Path(path)
    limit = max_pixels or MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > limit:
                    raise ImageError(
                        f"{path}: {width}x{height} pixels is over the {limit:,}-pixel safety limit. "
                        "Downscale the image or remove it from the folder."
                    )
                img.seek(0)
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{path}: too many pixels ({exc}). Downscale the image or remove it from the folder."
        ) from exc
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: file not found. Check the path.") from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied, cannot read this image. Give yourself read "
                         "permission (chmod u+r) or remove it from the folder.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"{path}: cannot read this image ({exc}). The file is truncated or corrupt: "
            "re-export or re-download it, or remove it from the folder."
        ) from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha over white, 16-bit/float scaled to 8-bit."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_rgb(img: Image.Image) -> Image.Image:
    """Map a high-bit-depth grey image onto 0..255 using its full nominal range."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = arr / 65535.0
    elif img.mode == "I":
        # 32-bit int images from 16-bit PNGs carry 0..65535 values.
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        scaled = arr / top
    else:  # "F": float, usually 0..1; otherwise normalise by its own range.
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
        scaled = arr if (lo >= 0.0 and hi <= 1.0) else (arr - lo) / max(hi - lo, 1e-12)
    grey = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def sample_files(weights_dir: str | os.PathLike) -> list[Path]:
    """The sample images saved in one weights folder (`samples/`), naturally sorted."""
    folder = Path(weights_dir) / "samples"
    return list_images(folder) if folder.is_dir() else []


def default_font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` pixels (the fixed bitmap font on old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed size
        return ImageFont.load_default()
