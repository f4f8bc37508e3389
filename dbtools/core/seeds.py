"""Stable seeds: the one rule that turns a run's `--seed` and a name into a random seed.

SHA-256 rather than `hash()`, so a seed is the same on every machine, process and
Python version: a resumed run draws the same batches and noise, and a missing class
image is drawn from the seed it would have had in the first run.
"""

from __future__ import annotations

import hashlib
from typing import Literal


def derived_seed(*parts: object, sep: str = ":", byteorder: Literal["little", "big"] = "little") -> int:
    """A 63-bit seed from `parts` (joined by `sep`); equal parts give equal seeds.

    Text that is not UTF-8 (a file name read with surrogate escapes) keeps its raw bytes.
    The 64 bits taken from the digest are read in `byteorder` and brought to 63 bits by
    dropping the lowest bit (little) or the highest (big): training's seeds and class
    images' seeds have always been made these two ways, and changing either would change
    resumed runs and class images.
    """
    text = sep.join(map(str, parts))
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], byteorder)
    return value >> 1 if byteorder == "little" else value & (2**63 - 1)
