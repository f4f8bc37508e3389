"""Safe cleanup of a training output folder: decide what can go, show it, delete on confirm.

`cleanup_plan` decides and deletes nothing; `describe` shows the plan; `run_cleanup`
deletes only when the confirm text is exactly `CONFIRM_WORD`. Weights that were never
exported, chosen ones, half-written ones, links and anything outside the output folder
are never deleted. Temporaries left by interrupted runs (`.tmp-*`, see
`dbtools.core.atomic.leftovers`) are listed; those untouched for a while go with the confirm word.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dbtools.core.atomic import is_stale, leftover_kind, leftovers, remove_leftover
from dbtools.core.errors import FolderNotFound, UserError, reports_user_errors
from dbtools.train.checkpoints import CHECKPOINT_PREFIX, LORA_WEIGHTS, UI_LORA_SUFFIX, list_weights, step_folders

logger = logging.getLogger(__name__)

CONFIRM_WORD = "DELETE"
"""What the cleanup cell's confirm field must contain before anything is deleted."""


class CleanupError(UserError):
    """A keep or exported value that names nothing in the output folder."""


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
    """Weights and checkpoint folders that stay, with the reason."""
    leftovers: list[Path] = field(default_factory=list)
    """Temporaries of interrupted runs (`.tmp-*`), listed; the stale ones go with the rest."""

    @property
    def targets(self) -> list[Path]:
        return self.delete + (self.checkpoints if self.delete_checkpoints else [])

    @property
    def stale_leftovers(self) -> list[Path]:
        """Leftovers that may go: a deletion cut short (already confirmed), or any of ours
        untouched for `STALE_AFTER_S` (never an interrupted swap's only copy)."""
        return [p for p in self.leftovers if leftover_kind(p.name) == "deleting" or is_stale(p)]


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
    root = _must_be_folder(output_dir)
    keep_paths = [_norm(p) for p in keep if str(p).strip()]
    exported_paths = [_norm(p) for p in exported if str(p).strip()]
    plan = CleanupPlan(output_dir=root, delete_checkpoints=delete_checkpoints)
    for _, folder in list_weights(root):
        reason = _keep_reason(root / folder.name, keep_paths, exported_paths, delete_unexported)
        if reason:
            plan.kept[root / folder.name] = reason
        else:
            plan.delete.append(root / folder.name)
    # training's own rule for `checkpoint-<step>`; a link is never followed into
    checkpoints = [p for _, p in step_folders(root, CHECKPOINT_PREFIX) if not p.is_symlink()]
    plan.checkpoints = [p for p in checkpoints if not any(_related(p, k) for k in keep_paths)]
    plan.kept.update({p: "chosen to keep" for p in checkpoints if p not in plan.checkpoints})
    plan.leftovers = leftovers(root)
    return plan


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """What tells one save of a weights folder from another at the same path: each weights
    file's path inside it, size and modification time, hashed. A new run writing the same
    step gives a new fingerprint, so an export recorded with the old one no longer counts;
    images or notes added to the folder later do not change it."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(folder)
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(f for f in files if f.lower().endswith(WEIGHT_SUFFIXES)):
            path = Path(dirpath, name)
            with contextlib.suppress(OSError):
                st = path.lstat()
                digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _must_be_folder(output_dir: str | os.PathLike) -> Path:
    root = _norm(output_dir)
    if not root.is_dir():
        raise FolderNotFound(f"{output_dir}: not a folder. Check OUTPUT_DIR (is Google Drive mounted?).")
    return root


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
    """Top-level `.safetensors`/`.ckpt` files of a weights folder other than LoRA weights (the
    diffusers file and the UI file training writes into every LoRA step folder): exports
    written into the folder, which deleting it would lose."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != LORA_WEIGHTS
                  and not p.name.endswith(UI_LORA_SUFFIX) and p.suffix.lower() in (".safetensors", ".ckpt"))


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
    if plan.leftovers:
        lines.append("Left by interrupted runs (temporaries):")
        stale = plan.stale_leftovers
        lines += [f"  ~ {p.name} ({_du(p) / 1024**2:.1f} MiB; "
                  + ("goes with the confirm word)" if p in stale else "changed recently, maybe in use: left alone)")
                  for p in plan.leftovers]
    return "\n".join(lines)


def _du(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(OSError):
            return path.lstat().st_size
        return 0
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
    (surrounding spaces ignored); return the folders deleted, stale leftovers first.

    Each folder is checked again just before deletion (still a direct, non-link child of
    the output folder with a step or checkpoint name) and first renamed to a `.tmp-` name,
    so a deletion cut short never leaves something that looks like complete weights.
    """
    if (confirm or "").strip() != CONFIRM_WORD:
        if plan.targets or plan.stale_leftovers:
            logger.warning("Nothing deleted yet: confirm with %s (the notebook's confirm field, or "
                           "--confirm %s) to delete the folders listed above.", CONFIRM_WORD, CONFIRM_WORD)
        return []
    # leftovers first: a deletion cut short (confirmed before) may hold the name used below
    deleted = [p for p in plan.stale_leftovers if p.parent == plan.output_dir and remove_leftover(p)]
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


# --------------------------------------------------------------------------- command line


def keep_paths(output_dir: str | os.PathLike, items: Iterable[str], flag: str = "--keep_steps") -> list[Path]:
    """`--keep_steps` values as paths in `output_dir`: a step number (any spelling: `0500`,
    `500/`, ` 500`) means every folder of that step (`<step>/`, `checkpoint-<step>/`);
    anything else is a path (as given, or inside `output_dir`) to something in the output folder.

    Raises `CleanupError` naming every value that is neither, with the steps that exist,
    so nothing is deleted on a typo.
    """
    root = _norm(output_dir)
    steps: dict[int, list[Path]] = {}
    for step, folder in step_folders(root) + step_folders(root, CHECKPOINT_PREFIX):
        steps.setdefault(step, []).append(folder)
    out, unknown = [], []
    for item in items:
        for part in str(item).replace(",", " ").split():
            found = _keep_target(root, part, steps)
            out += found
            unknown += [] if found else [part]
    if unknown:
        saved = sorted({s for s, _ in list_weights(root) + step_folders(root, CHECKPOINT_PREFIX)})
        raise CleanupError(_unknown_message(root, unknown, saved, flag))
    return out


def _keep_target(root: Path, value: str, steps: dict[int, list[Path]]) -> list[Path]:
    """The folders of a step number, or the path `value` names inside `root`; [] for neither."""
    bare = value.rstrip("/" + os.sep)
    if bare.isdigit():
        return steps.get(int(bare), [])
    for candidate in (Path(os.path.expanduser(value)), root / value):
        if os.path.lexists(candidate):
            where = Path(os.path.normpath(_norm(candidate.parent) / candidate.name))  # a link itself
            return [where] if where == root or root in where.parents else []
    return []


def _unknown_message(root: Path, unknown: list[str], saved: list[int], flag: str) -> str:
    shown = ", ".join(repr(v) for v in unknown)
    have = ", ".join(map(str, saved)) or "none"
    return (f"{flag} {shown}: not a step or a folder of {root}, so nothing was deleted. Saved steps there: "
            f"{have}. Give step numbers like 500 1000 (or paths inside the output folder).")


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m dbtools cleanup", allow_abbrev=False, description=(
        "Show which weights folders of a training output can be deleted, and delete them only "
        f"with --confirm {CONFIRM_WORD}."))
    p.add_argument("--output_dir", required=True, help="the training output folder")
    p.add_argument("--keep_steps", nargs="*", default=[],
                   help="steps (e.g. 1000 2000) or paths (weights folder, checkpoint folder, single file) to keep")
    p.add_argument("--exported", nargs="*", default=[],
                   help="weights folders already converted to a single file (they may go)")
    p.add_argument("--delete_unexported", action="store_true",
                   help="also delete complete weights folders that were never exported")
    p.add_argument("--delete_checkpoints", action="store_true", help="also delete checkpoint-<step> folders")
    p.add_argument("--confirm", default="", help=f"{CONFIRM_WORD} to delete; without it only the plan is shown")
    return p


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools cleanup ...`: print the plan; delete only with `--confirm DELETE`."""
    args = build_parser().parse_args(argv)
    _must_be_folder(args.output_dir)
    plan = cleanup_plan(args.output_dir, keep=keep_paths(args.output_dir, args.keep_steps),
                        exported=keep_paths(args.output_dir, args.exported, "--exported"),
                        delete_checkpoints=args.delete_checkpoints, delete_unexported=args.delete_unexported)
    print(describe(plan))
    for folder in run_cleanup(plan, args.confirm):
        print(f"deleted {folder}")
    return 0
