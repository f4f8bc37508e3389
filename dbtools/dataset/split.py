"""Which instance images training holds out for the validation loss (`--validation_split`).

The split depends only on the images' file names and a seed, so every run, resume and
process agrees on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from dbtools.core.errors import UserError


class ValidationSplitError(UserError):
    """A `--validation_split` share that cannot split the instance images."""


def validation_split(images: Sequence[Path], share: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split instance images into `(train, held_out)`: a deterministic share kept out.

    Which images are held out depends only on their file names and `seed` (not on the
    listing order or the folder's location), so every run, resume and process agrees.
    `round(share * n)` images are held out, at least one when `share > 0`, and at least
    one is always left for training. Both lists keep the input order; they are disjoint.
    """
    if not 0 <= share < 1:
        raise ValidationSplitError(f"--validation_split {share}: use a share from 0 up to (not including) 1, "
                                    "e.g. 0.1.")
    images = list(images)
    if share == 0:
        return images, []
    if len(images) < 2:
        raise ValidationSplitError(f"--validation_split {share}: needs at least 2 instance images, found "
                                    f"{len(images)}. Add images or use --validation_data_dir.")
    count = min(len(images) - 1, max(1, round(share * len(images))))
    rank = sorted(images, key=lambda p: (_name_hash(Path(p).name, seed), Path(p).name))
    held = set(map(Path, rank[:count]))
    return [p for p in images if Path(p) not in held], [p for p in images if Path(p) in held]


def _name_hash(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogateescape")).hexdigest()
