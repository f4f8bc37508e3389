"""The training output folder: which step folders exist, which are complete, which go.

Layout (as in Shivam's script): `<output_dir>/<step>/` is a weights folder (a diffusers
pipeline, or in LoRA mode `pytorch_lora_weights.safetensors`); accelerate state for
resuming goes to `<output_dir>/checkpoint-<step>/`. Every folder is built under a
temporary `.tmp-` name and renamed when complete, so the functions here only ever
return complete folders. Pure path rules, plus the one function that writes a checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dbtools.atomic import TMP_PREFIX, atomic_dir, is_temporary

if TYPE_CHECKING:  # pragma: no cover
    from dbtools.train_config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SINGLE_FILE_NAME = "model.safetensors"


def step_folders(output_dir: str | os.PathLike, prefix: str = "") -> list[tuple[int, Path]]:
    """Complete `<prefix><step>` folders in `output_dir`, sorted by step (temporary ones skipped)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        rest = p.name[len(prefix):]
        if p.is_dir() and p.name.startswith(prefix) and rest.isdigit() and not is_temporary(p):
            found.append((int(rest), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-<step>` folder in `output_dir`, or None."""
    found = step_folders(output_dir, CHECKPOINT_PREFIX)
    return found[-1][1] if found else None


def is_weights_folder(path: Path) -> bool:
    """True for a saved weights folder: a diffusers pipeline or a LoRA adapter."""
    return (path / "model_index.json").is_file() or (path / LORA_WEIGHTS).is_file()


def list_weights(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every complete `<output_dir>/<step>/` weights folder, sorted by step."""
    return [(s, p) for s, p in step_folders(output_dir) if is_weights_folder(p)]


def latest_weights(output_dir: str | os.PathLike) -> Path | None:
    """The complete weights folder with the highest step (never a half-written one), or None.

    Half-written saves (`.tmp-*` folders, folders without `model_index.json` or LoRA
    weights) are skipped.
    """
    found = list_weights(output_dir)
    return found[-1][1] if found else None


def checkpoints_to_remove(output_dir: str | os.PathLike, limit: int | None) -> list[Path]:
    """Oldest complete checkpoints beyond `limit` (None keeps all)."""
    found = step_folders(output_dir, CHECKPOINT_PREFIX)
    if limit is None or len(found) <= limit:
        return []
    return [p for _, p in found[: len(found) - limit]]


def resume_path(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: 'latest' or a path (as given, or inside `output_dir`).

    None when nothing is asked for, or when no complete checkpoint matches.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    for candidate in (Path(resume_from_checkpoint), Path(output_dir) / Path(resume_from_checkpoint).name):
        if candidate.is_dir() and not is_temporary(candidate):
            return candidate
    return None


def checkpoint_step(path: Path) -> int:
    """The step encoded in a `checkpoint-<step>` folder name."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


def should_save(step: int, cfg: TrainConfig) -> bool:
    """Shivam's rule: every `save_interval` steps once `save_min_steps` is reached."""
    return step > 0 and step % cfg.save_interval == 0 and step >= cfg.save_min_steps


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written folders left by a killed run (`.tmp-<step>-*`, `.tmp-checkpoint-*`)."""
    root = Path(output_dir)
    stale = [p for p in root.glob(f"{TMP_PREFIX}*") if p.is_dir()
             and re.match(rf"{re.escape(TMP_PREFIX)}(old-)?({CHECKPOINT_PREFIX})?\d+", p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None) -> Path:
    """Accelerate state in `<output_dir>/checkpoint-<step>/`, atomically; then remove the
    oldest checkpoints beyond `total_limit` (only once the new one is complete)."""
    target = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    with atomic_dir(target) as tmp:
        accelerator.save_state(str(tmp))
    for old in checkpoints_to_remove(output_dir, total_limit):
        logger.info("removing old checkpoint %s", old)
        shutil.rmtree(old)
    logger.info("checkpoint saved at %s", target)
    return target
