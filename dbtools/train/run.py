"""What a training run is made of: `Run`, built once by `loop.setup` and passed to every
step, save and watch, and the micro-batches it reads.

This module sits below the loop, the outputs and the watch (they all take a `Run`), so it
imports none of them except the watch's `Watch` class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dbtools.families.base import Components
from dbtools.families.prompts import PromptEncoder, SDXLPromptEncoder
from dbtools.train.config import TrainConfig
from dbtools.train.data import DreamBoothData
from dbtools.train.watch import Watch

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from torch.optim.lr_scheduler import LRScheduler


class HeldOutLoss(Protocol):
    """The held-out images' loss (`dbtools.train.outputs.HeldOut`, which takes a `Run`)."""

    last_step: int | None

    def loss(self, run: Run) -> float: ...


class SaveScores(Protocol):
    """Scores of each save (`dbtools.after.evaluate.SaveScorer`, a later stage than training)."""

    def score(self, step: int, pipe, samples: Sequence, device) -> dict: ...


@dataclass(frozen=True)
class Run:
    """Everything the loop needs, built once by `setup` and never changed afterwards.

    `models` holds the modules as accelerate prepared them: `models.unet` (and
    `models.text_encoder` when it trains) may be wrapped for data-parallel training.
    """

    cfg: TrainConfig
    accelerator: Accelerator
    models: Components
    data: DreamBoothData
    prompts: PromptEncoder | SDXLPromptEncoder
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    params: list[torch.nn.Parameter]
    weight_dtype: torch.dtype
    batches: MicroBatches
    ema: EMAModel | None = None
    watch: Watch = dataclasses.field(default_factory=Watch.disabled)
    seed: int = 0
    max_train_steps: int = 0
    start_step: int = 0
    resumed_from: Path | None = None
    held_out: HeldOutLoss | None = None
    scorer: SaveScores | None = None

    @property
    def unet(self) -> torch.nn.Module:
        return self.models.denoiser

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.models.text_encoder


class MicroBatches:
    """This process's micro-batches by global index: read when asked, or prefetched by
    `DataLoader` workers (`--dataloader_num_workers`, only without the latent cache) in
    the order `micro_indices` gives, which is the order the loop asks for them."""

    def __init__(self, data: DreamBoothData, cfg: TrainConfig, indices: list[int]):
        self.data, self.indices = data, indices
        self.workers = cfg.dataloader_num_workers if data.cache is None else 0
        self._prefetched: Iterator[dict] | None = None

    def __enter__(self) -> MicroBatches:
        if self.workers > 0:
            from torch.utils.data import DataLoader

            self._prefetched = iter(DataLoader(self, batch_size=None, shuffle=False, num_workers=self.workers,
                                               collate_fn=_as_is))
        return self

    def __exit__(self, *exc) -> None:
        self._prefetched = None  # stops the loader's workers

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        return self.data.micro_batch(self.indices[j])

    def get(self, micro: int) -> dict:
        """Micro-batch `micro`: the next prefetched one, or read now."""
        if self._prefetched is None:
            return self.data.micro_batch(micro)
        return next(self._prefetched)


def _as_is(x):
    return x
