"""Atomic writes: a reader sees the old file or the complete new one, never half of it.

Files are written to a temporary name in the same folder and moved into place with
`os.replace`; folders are built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
"""Names starting with this are incomplete work; readers and `latest` skip them."""


def is_temporary(path: str | os.PathLike) -> bool:
    """True for files/folders still being written by `atomic_*`."""
    return os.path.basename(os.fspath(path)).startswith(TMP_PREFIX)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], fsync: bool = True) -> Path:
    """Call `write(tmp_path)` and move the result to `path`; the temp file never lingers.

    The temp file is created empty (permissions from the umask, as `open` gives) in
    `path`'s folder, which is created if missing. `fsync=False` skips flushing the data
    to disk before the rename: still all-or-nothing for readers and after a crash of the
    program, but after a power cut the file may be empty.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        mode = _published_mode(path, fd)
    finally:
        os.close(fd)
    try:
        write(tmp)
        # Writers such as safetensors create their file 0600: give the published file the
        # mode a plain `open` would (or the replaced file's), whatever `write` did.
        os.chmod(tmp, mode)
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    """Write `text` (UTF-8, no newline translation) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write `data` to `path` atomically (see `atomic_write` for `fsync`)."""
    atomic_put(os.fspath(path), data, fsync)
    return Path(path)


def atomic_put(path: str, data: bytes, fsync: bool = True) -> None:
    """`atomic_write_bytes` for loops over many small files: a `str` path, no return value."""
    fd, tmp = _create_temp(path, keep_suffix=False)
    try:
        _keep_mode(path, fd)
        _write_all(fd, data, fsync)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_create(path: str, data: bytes, fsync: bool = True) -> None:
    """Write a *new* file atomically: it appears complete or not at all.

    Raises `FileExistsError` when `path` already exists: an existing file is never
    replaced. The data goes into a temp file in the same folder, which is then
    hard-linked under its name (the link fails if the name is taken, with no window
    between a check and the write). File systems without hard links (some FUSE and
    network mounts) get a check for the name followed by `os.replace`.
    """
    fd, tmp = _create_temp(path, keep_suffix=False)
    try:
        _write_all(fd, data, fsync)
        fd = -1
        _link_new(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_all(fd: int, data: bytes, fsync: bool) -> None:
    """Write `data` to `fd`, flush it to disk if asked, and close `fd`."""
    written = os.write(fd, data)
    if written < len(data):  # os.write may write less than asked
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]
    if fsync:
        os.fsync(fd)
    os.close(fd)


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
                  errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _link_new(tmp: str, path: str) -> None:
    """Give the complete file `tmp` the name `path` unless `path` exists (`FileExistsError`)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", path) from None
        os.replace(tmp, path)


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_temp_names = itertools.count()


def _create_temp(path: str | os.PathLike, keep_suffix: bool = True) -> tuple[int, str]:
    """Create a new empty temp file next to `path`; return its descriptor and name.

    Unlike `tempfile.mkstemp` (always 0600) the file gets the umask's permissions, so a
    replaced file stays readable by whoever could read it before. The name is short so
    it fits even when `path`'s own name is near the 255-byte limit; it is made of the
    process id and a counter (no random bytes to fetch per file), and a name that
    already exists (left by a killed process) is simply skipped.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    suffix = ""
    if keep_suffix:
        name = os.path.basename(path)
        dot = name.rfind(".")
        suffix = name[dot:] if 0 < dot and len(name) - dot <= 16 else ""
    head = os.path.join(parent, f"{TMP_PREFIX}{os.getpid()}-")
    made_parent = False
    for _ in range(1000):
        tmp = f"{head}{next(_temp_names)}{suffix}"
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            if made_parent or not parent:
                raise
            # Only now: checking the folder before every write would cost a system call.
            os.makedirs(parent, exist_ok=True)
            made_parent = True
    raise FileExistsError(f"{parent}: could not create a temporary file")


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


def _published_mode(path: str | os.PathLike, fd: int) -> int:
    """The mode `path` should end with: the replaced file's, else the new temp file's
    (0666 less the umask, as `open` gives)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return stat.S_IMODE(os.fstat(fd).st_mode)


def _keep_mode(path: str, fd: int) -> None:
    """Give the temp file `fd` the mode of the file it will replace, if there is one."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # a new file: the temp file already has the umask's mode
    if mode != stat.S_IMODE(os.fstat(fd).st_mode):
        os.fchmod(fd, mode)


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
    complete (old moved aside as `.tmp-old-<name>`, new renamed in, old deleted); a
    crash between the two renames leaves the old copy, which `restore_interrupted_swaps`
    (called here first) puts back. Files inside get the umask's normal mode, whatever
    mode the code that wrote them chose.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swaps(final.parent, only=final.name)
    tmp = _create_temp_dir(final)
    try:
        yield tmp
        _publish_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, final, replace)


OLD_PREFIX = f"{TMP_PREFIX}old-"
"""`atomic_dir` moves the folder it replaces aside under this prefix for a moment."""


def restore_interrupted_swaps(folder: str | os.PathLike, only: str | None = None) -> list[Path]:
    """Put back every `.tmp-old-X` in `folder` whose `X` is missing; return the restored paths.

    Such a folder is the only complete copy left by a crash between the two renames of
    a folder swap: it is never deleted. A `.tmp-old-X` next to an existing `X` is a
    finished swap's leftover and stays for the caller to remove. `only` limits this to
    one name `X`.
    """
    folder = Path(folder)
    names = [OLD_PREFIX + only] if only else _names_with_prefix(folder, OLD_PREFIX)
    restored = []
    for name in names:
        old, final = folder / name, folder / name[len(OLD_PREFIX):]
        if old.is_dir() and not os.path.lexists(final):
            os.replace(old, final)
            logger.warning("restored %s from %s (an earlier save was interrupted)", final, old.name)
            restored.append(final)
    return restored


def _names_with_prefix(folder: Path, prefix: str) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it if e.name.startswith(prefix)]
    except OSError:
        return []


def _publish_modes(root: Path) -> None:
    """Give every file under `root` the umask's normal mode (0644 under umask 022).

    `root` was created with 0777 less the umask, so its mode tells the umask without
    changing it (`os.umask` is process-wide). Executable bits are kept.
    """
    dir_mode = stat.S_IMODE(os.stat(root).st_mode)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            mode = dir_mode & (0o777 if st.st_mode & 0o111 else 0o666)
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)


def _create_temp_dir(final: Path) -> Path:
    """A new empty folder next to `final` (umask permissions, unlike `tempfile.mkdtemp`)."""
    while True:
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{os.urandom(4).hex()}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def _swap_in(tmp: Path, final: Path, replace: bool) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    if not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{final} already exists")
    old = final.with_name(f"{OLD_PREFIX}{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- leftovers of killed runs

STALE_AFTER_S = 30 * 60
"""A temporary untouched this long belongs to a run that is gone: a live writer's file or
folder changes every few seconds while it writes."""

LEFTOVER_KINDS = {
    "file": re.compile(rf"{re.escape(TMP_PREFIX)}\d+-\d+(\.[^./\\]{{1,15}})?"),  # atomic_write / atomic_put
    "folder": re.compile(rf"{re.escape(TMP_PREFIX)}.+-[0-9a-f]{{8}}"),  # atomic_dir
    "old": re.compile(rf"{re.escape(OLD_PREFIX)}.+"),  # atomic_dir's swap
    "deleting": re.compile(rf"{re.escape(TMP_PREFIX)}deleting-.+"),  # cleanup
}
"""The names our writers give their temporaries, by kind. A name of no kind (a user's
`.tmp-notes`) is never ours."""


def leftover_kind(name: str) -> str | None:
    """Which of our temporaries `name` is (a key of `LEFTOVER_KINDS`), or None."""
    for kind in ("deleting", "old", "file", "folder"):  # the most specific names first
        if LEFTOVER_KINDS[kind].fullmatch(name):
            return kind
    return None


def last_change(path: str | os.PathLike) -> float:
    """The newest modification time of `path` or of anything inside it (links not followed)."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def leftovers(folder: str | os.PathLike, kinds: tuple[str, ...] = tuple(LEFTOVER_KINDS),
              suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Our temporaries of `kinds` directly in `folder` (any age), sorted; `suffixes` limits
    "file" temporaries to those ending so (`""` for none: `atomic_put`'s)."""
    found = []
    for name in _names_with_prefix(Path(folder), TMP_PREFIX):
        kind = leftover_kind(name)
        if kind not in kinds:
            continue
        if kind == "file" and suffixes is not None and os.path.splitext(name[len(TMP_PREFIX):])[1] not in suffixes:
            continue
        found.append(Path(folder) / name)
    return sorted(found)


def is_stale(path: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> bool:
    """True when nothing in `path` changed for `max_age_s` seconds. A `.tmp-old-X` without
    `X` is never stale: it is the only complete copy (see `restore_interrupted_swaps`)."""
    path = Path(path)
    if leftover_kind(path.name) == "old" and not os.path.lexists(path.with_name(path.name[len(OLD_PREFIX):])):
        return False
    try:
        return time.time() - last_change(path) > max_age_s
    except OSError:
        return False


def remove_leftovers(folder: str | os.PathLike, kinds: tuple[str, ...],
                     suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Delete the stale temporaries of `kinds` in `folder` (see `leftovers`, `is_stale`);
    return them. Each removal is logged; one that fails is skipped."""
    return [p for p in leftovers(folder, kinds, suffixes) if is_stale(p) and remove_leftover(p)]


def remove_leftover(path: Path) -> bool:
    """Delete one temporary (a folder with what is inside; a link itself, never its target);
    log it; False when it could not be removed (a warning says why)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        logger.warning("could not remove %s, left by an interrupted run (%s)", path, exc)
        return False
    logger.info("removed %s, left by an interrupted run", path)
    return True
