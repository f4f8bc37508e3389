"""Atomic writes: a reader sees the old file or the complete new one, never half of it.

Files are written to a temporary name in the same folder and moved into place with
`os.replace`; folders are built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

TMP_PREFIX = ".tmp-"
"""Names starting with this are incomplete work; readers and `latest` skip them."""


def is_temporary(path: str | os.PathLike) -> bool:
    """True for files/folders still being written by `atomic_*`."""
    return os.path.basename(os.fspath(path)).startswith(TMP_PREFIX)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` and move the result to `path`; the temp file never lingers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8, no newline translation) to `path` atomically."""
    data = text.encode("utf-8")
    return atomic_write_bytes(path, data)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_save_image(image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Save a PIL image atomically; the format comes from `path`'s extension."""
    fmt = save_kwargs.pop("format", None) or _pil_format(Path(path))
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


def _pil_format(path: Path) -> str:
    from PIL import Image

    Image.init()
    ext = path.suffix.lower()
    if ext not in Image.EXTENSION:
        raise ValueError(f"{path}: unknown image extension {ext!r}")
    return Image.EXTENSION[ext]


def _fsync_file(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; rename it to `final` on success.

    On error the temporary folder is removed and `final` is untouched. With
    `replace=True` an existing `final` is swapped out only after the new one is
    complete (old moved aside, new renamed in, old deleted).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, final, replace)


def _swap_in(tmp: Path, final: Path, replace: bool) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    if not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{final} already exists")
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
