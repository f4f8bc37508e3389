"""The captioning config and the rules every captioner family shares: what one run asks
for (`CaptionConfig`), its error class, and the generation settings with EveryDream's
meaning of the flags. Pure: no files, no models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dbtools.core.errors import UserError

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
DEFAULT_MIN_LENGTH = 22
# (min, max) new tokens per family when --min_length / --max_length are left out.
LENGTHS = {"blip": (DEFAULT_MIN_LENGTH, 48), "blip2": (DEFAULT_MIN_LENGTH, 48),
           "florence2": (0, 256), "vlm": (0, 160)}


class CaptionError(UserError):
    """A problem the user can fix (bad flag, folder, model or undo log); says how."""


@dataclass
class CaptionConfig:
    """Everything one captioning run needs; the CLI, notebook and tests build this.

    `out_dir` defaults to `output` (EveryDream); `None` or the image folder itself
    means rename / write in place. `min_length`/`max_length` `None` mean the family's
    (`LENGTHS`); a minimum left out never exceeds a given maximum. `num_workers=None`
    picks `default_num_workers()`; 0 decodes in the main process. `prompt=None` means
    "a picture of" for BLIP and none for BLIP-2.
    """

    img_dir: str | Path = "input"
    out_dir: str | Path | None = "output"
    format: str = "filename"
    model: str = DEFAULT_MODEL
    nucleus: bool = False
    q_factor: float = 1.0
    min_length: int | None = None
    max_length: int | None = None
    num_beams: int = 16
    batch_size: int = 8
    num_workers: int | None = None
    prefix: str = ""
    suffix: str = ""
    prompt: str | None = None
    recursive: bool = False
    overwrite: bool = False
    seed: int = 0
    threshold: float = 0.35
    character_threshold: float = 0.85
    include_ratings: bool = False
    exclude_tags: str = ""
    tags_with: str | None = None
    quantize: str | None = None

    @property
    def image_dir(self) -> Path:
        return Path(self.img_dir)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir not in (None, "") else Path(self.img_dir)

    @property
    def in_place(self) -> bool:
        """True when outputs go into the image folder itself (renames, no copies)."""
        return _same_path(self.output_dir, self.image_dir)


def length_limits(cfg: CaptionConfig, family: str = "blip") -> tuple[int, int]:
    """(min, max) caption tokens: the flags, or `family`'s defaults for those left out.
    A default minimum follows a smaller given maximum (EveryDream: `--max_length 12`)."""
    low, high = LENGTHS.get(family, LENGTHS["blip"])
    high = cfg.max_length if cfg.max_length is not None else high
    low = cfg.min_length if cfg.min_length is not None else min(low, high)
    return low, high


def generation_kwargs(cfg: CaptionConfig, family: str = "blip") -> dict:
    """Keyword arguments for `model.generate`, with EveryDream's meaning of the flags.

    Nucleus: sampling with `top_p=q_factor` (above 1: 1.0, no cut). Otherwise beam
    search with `num_beams` beams and `repetition_penalty=q_factor`. Lengths count the
    caption's own tokens.
    """
    low, high = length_limits(cfg, family)
    lengths = {"min_new_tokens": low, "max_new_tokens": high}
    if cfg.nucleus:
        return {"do_sample": True, "top_p": min(cfg.q_factor, 1.0), "num_beams": 1, **lengths}
    return {"do_sample": False, "num_beams": cfg.num_beams,
            "repetition_penalty": cfg.q_factor, **lengths}


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (a.exists() and b.exists() and a.samefile(b))
