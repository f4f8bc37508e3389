"""Safe cleanup of a training output folder: decide what can go, show it, delete on confirm.

`cleanup_plan` decides and deletes nothing; `describe` shows the plan; `run_cleanup`
deletes only when the confirm text is exactly `CONFIRM_WORD`. Weights that were never
exported, chosen ones, half-written ones, links and anything outside the output folder
are never deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dbtools.checkpoints import CHECKPOINT_PREFIX, LORA_WEIGHTS, UI_LORA_SUFFIX, list_weights, step_folders

logger = logging.getLogger(__name__)

CONFIRM_WORD = "DELETE"
"""What the cleanup cell's confirm field must contain before anything is deleted."""

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
    root = _norm(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{output_dir}: not a folder. Check OUTPUT_DIR (is Google Drive mounted?).")
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
    plan.checkpoints = [p for _, p in step_folders(root, CHECKPOINT_PREFIX) if not p.is_symlink()]
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
        if plan.targets:
            logger.warning("Nothing deleted yet: confirm with %s (the notebook's confirm field, or "
                           "--confirm %s) to delete the folders listed above.", CONFIRM_WORD, CONFIRM_WORD)
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


# --------------------------------------------------------------------------- command line


def keep_paths(output_dir: str | os.PathLike, items: Iterable[str]) -> list[Path]:
    """`--keep_steps` values as paths: a step number means `<output_dir>/<step>`; anything
    else (a weights folder, a checkpoint folder, a single file) is a path as given."""
    out = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            out.append(Path(output_dir) / part if part.isdigit() else Path(part))
    return out


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


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools cleanup ...`: print the plan; delete only with `--confirm DELETE`."""
    import sys

    args = build_parser().parse_args(argv)
    try:
        plan = cleanup_plan(args.output_dir, keep=keep_paths(args.output_dir, args.keep_steps),
                            exported=keep_paths(args.output_dir, args.exported),
                            delete_checkpoints=args.delete_checkpoints, delete_unexported=args.delete_unexported)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(plan))
    for folder in run_cleanup(plan, args.confirm):
        print(f"deleted {folder}")
    return 0
