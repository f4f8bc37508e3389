"""The folders a training run writes to, checked before any model loads.

- Each folder (`--output_dir`, `--cache_dir`, the logging folder, class folders that
  will receive generated images) must be a folder, or creatable, writable, and on a
  disk with room for what the run will write there.
- A fresh run never lands on top of another run: an output folder holding weights or
  checkpoints of an earlier run is refused, unless the run resumes from it or
  `--overwrite_output_dir` asks to move the old run's folders aside (never deleted).

- Two runs never write into one output folder at the same time: a run holds
  `<output_dir>/.dbtools-train.lock` (`hold_output_dir`); a second one is refused at once.

The checks return messages (each naming the path and the fix); `move_previous_run` and the
lock are the only things here that change anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dbtools.core.atomic import atomic_create
from dbtools.core.errors import UserError
from dbtools.train.checkpoints import (
    CHECKPOINT_PREFIX,
    LORA_WEIGHTS,
    UI_LORA_SUFFIX,
    is_weights_folder,
    list_weights,
    step_folders,
)

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30


def human_size(n: int) -> str:
    """`1.5 GiB`, `300 MiB`: a size for messages."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{max(1, round(n / MiB))} MiB"


def nearest_existing(path: Path) -> Path:
    """`path` itself, or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problems(path: str | os.PathLike, flag: str, need_bytes: int) -> list[str]:
    """Why `path` cannot take `need_bytes` of new files (empty when it can).

    The folder may not exist yet (it is created later); then its closest existing
    ancestor must be a writable folder. Writability is tested by creating and removing
    a temporary file, which also catches read-only mounts where permission bits lie.
    """
    path = Path(path)
    base = nearest_existing(path)
    if not base.is_dir():
        what = "is a file" if base == Path(os.path.abspath(path)) else f"lies under a file ({base})"
        return [f"{flag} {path} {what}, not a folder. Give a folder path."]
    if not _can_write(base):
        return [(f"{flag} {path}: cannot write in {base} (permission denied or read-only). Choose a writable "
                 "folder (on Colab, one under /content or your mounted Drive).")]
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        return [(f"{flag} {path}: not enough free space ({human_size(free)} free, about "
                 f"{human_size(need_bytes)} needed). Free some space or choose a folder on another disk.")]
    return []


def _can_write(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".dbtools-probe-"):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- another run


# What an earlier run and the steps after it leave in the output folder besides its weights:
# logs, held-out images, scores, the preview grid, generated images and exports.
RUN_FOLDERS = ("logs", "validation", "generated", "gradio")
RUN_FILES = ("metrics.jsonl", "metrics-summary.json", "metrics.png", "preview.png")
EXPORT_SUFFIXES = (".safetensors", ".ckpt")


def previous_run_entries(output_dir: str | os.PathLike) -> list[Path]:
    """What an earlier run left in `output_dir`: step folders (`<step>/`, including an older
    run's `0/` with its logs), `checkpoint-<step>/`, `RUN_FOLDERS`, `RUN_FILES`, exported
    single files, and a pipeline or LoRA saved in the folder itself (diffusers layout).
    Anything else (`concepts_list.json`, the user's own files) stays."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for _, p in step_folders(root)] + [p for _, p in step_folders(root, CHECKPOINT_PREFIX)]
    found += [root / n for n in RUN_FOLDERS if (root / n).is_dir()]
    found += [root / n for n in RUN_FILES if (root / n).is_file()]
    if is_weights_folder(root):
        found += [root / n for n in _pipeline_entries(root) if (root / n).exists()]
    else:
        found += sorted(p for p in root.iterdir() if p.suffix in EXPORT_SUFFIXES and p.is_file())
    return found


def _pipeline_entries(root: Path) -> list[str]:
    import json

    names = ["model_index.json", LORA_WEIGHTS, "args.json", "samples"]
    names += [p.name for p in root.glob(f"*{UI_LORA_SUFFIX}")]
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        names += [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    except (OSError, ValueError):
        pass
    return names


def holds_another_run(output_dir: str | os.PathLike) -> bool:
    """True when `output_dir` holds saved weights or checkpoints of a run."""
    root = Path(output_dir)
    return bool(list_weights(root) or step_folders(root, CHECKPOINT_PREFIX) or
                (root.is_dir() and is_weights_folder(root)))


def another_run_message(output_dir: str | os.PathLike, resume_asked: bool = False) -> str:
    """The refusal of a fresh run in a folder holding another run, with the ways out."""
    aside = ("add --overwrite_output_dir to move the old run's folders aside into "
             f"{Path(output_dir).name}-previous-<time> next to it (nothing is deleted).")
    if resume_asked:  # `latest` found no checkpoint, only weights: resuming is not a way out
        return (f"--output_dir {output_dir} holds another run's weights but no checkpoint to resume from "
                "(--resume_from_checkpoint). Choose a new --output_dir, or " + aside)
    return (f"--output_dir {output_dir} already holds another run's weights or checkpoints; a new run there "
            "would mix with them. Either continue that run with --resume_from_checkpoint latest, or choose a "
            "new --output_dir, or " + aside)


def move_previous_run(output_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's folders (`previous_run_entries`) into a new sibling folder
    `<output_dir>-previous-<time>`; return it (None when there was nothing to move)."""
    root = Path(output_dir)
    entries = previous_run_entries(root)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = root.with_name(f"{root.name}-previous-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = root.with_name(f"{root.name}-previous-{stamp}-{n}")
    target.mkdir()
    for entry in entries:
        os.replace(entry, target / entry.name)  # same disk: a rename, nothing copied or deleted
    logger.info("--overwrite_output_dir: moved the earlier run's %d folder(s) from %s to %s",
                len(entries), root, target)
    return target


# --------------------------------------------------------------------------- one run at a time

LOCK_FILE = ".dbtools-train.lock"
"""Held in the output folder by the run writing there: its pid, host and start time (JSON)."""
HEARTBEAT_S = 30.0
"""How often a live run touches its lock."""
STALE_LOCK_S = 5 * 60.0
"""A lock untouched this long belongs to a run that is gone (a crashed machine, another
host whose process cannot be asked, e.g. the Colab runtime before a disconnect)."""


class OutputDirInUse(UserError):
    """Another live run holds the output folder."""


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike, accelerator=None) -> Iterator[None]:
    """Hold `output_dir` for one run; raise `OutputDirInUse` at once when a live run holds it.

    Only the main process of a multi-process run takes the lock; the others learn whether
    it was refused and then leave with exit code 2 (the main process says why). A lock whose
    owner is gone (its pid is not running on this host, or no heartbeat for
    `STALE_LOCK_S`) is taken over with a warning. The lock goes when the block ends.
    """
    main = accelerator is None or accelerator.is_main_process
    with contextlib.ExitStack() as stack:
        refusal = None
        if main:
            try:
                stack.enter_context(_lock(Path(output_dir) / LOCK_FILE))
            except OutputDirInUse as exc:
                refusal = exc
        refused = refusal is not None
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            refused = broadcast_object_list([refused])[0]
        if refusal is not None:
            raise refusal
        if refused:
            raise SystemExit(2)
        yield


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _acquire(path, me)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), name="dbtools-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _owner(path) == me:  # not if another run took it over meanwhile
            with contextlib.suppress(OSError):
                path.unlink()


def _acquire(path: Path, me: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            atomic_create(str(path), json.dumps(me).encode("utf-8"))
            return
        except FileExistsError:
            pass
        owner = _owner(path)
        if owner is None:  # gone since: try again
            continue
        if not _owner_gone(path, owner):
            raise OutputDirInUse(_in_use_message(path, owner))
        logger.warning("%s: taking over the lock of a run that is gone (pid %s on %s, started %s).",
                       path.parent, owner.get("pid"), owner.get("host"), owner.get("started"))
        with contextlib.suppress(OSError):  # one taker wins the rename; the others find a new lock
            aside = path.with_name(f"{path.name}.{os.getpid()}")
            os.rename(path, aside)
            aside.unlink()
    raise OutputDirInUse(_in_use_message(path, _owner(path) or {}))


def _owner(path: Path) -> dict | None:
    """The lock's record; None when there is no lock, {} when it cannot be read."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _owner_gone(path: Path, owner: dict) -> bool:
    try:
        if time.time() - path.stat().st_mtime > STALE_LOCK_S:
            return True
    except FileNotFoundError:
        return True
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False  # another machine's process cannot be asked: only the heartbeat tells
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # running, under another user
        return False
    return False


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def _in_use_message(path: Path, owner: dict) -> str:
    who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
    with contextlib.suppress(OSError):
        who += f", last alive {time.time() - path.stat().st_mtime:.0f} s ago"
    return (f"--output_dir {path.parent} is in use by another training run ({who}); two runs in one folder "
            f"would replace each other's weights. Wait for it to finish, or choose another --output_dir. A run "
            f"that died on another machine frees it after {STALE_LOCK_S / 60:.0f} minutes; if you are sure no run "
            f"is using it, delete {path}.")
