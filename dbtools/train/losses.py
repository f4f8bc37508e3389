"""The DreamBooth loss as pure tensor maths: noise, per-sample error, prior split.

Nothing here loads a model or reads a file; the training loop draws the noise, asks the
model family (`dbtools.families`) for timesteps, noisy input, target, per-sample weights and
the prediction, and hands the tensors in. Nothing here depends on the family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def training_noise(shape: tuple[int, ...], generator: torch.Generator, offset_strength: float = 0.0) -> torch.Tensor:
    """Gaussian noise of `shape`; with `offset_strength`, plus one extra draw per sample and
    channel (offset noise), which lets the model learn overall brightness shifts."""
    noise = torch.randn(shape, generator=generator)
    if offset_strength:
        noise = noise + offset_strength * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise


def per_sample_loss(model_pred: torch.Tensor, target: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, in float32, times the per-sample `weights` when given
    (the family's, e.g. min-SNR)."""
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))
    if weights is not None:
        loss = loss * weights
    return loss


def dreambooth_loss(model_pred: torch.Tensor, target: torch.Tensor, *, is_prior: torch.Tensor,
                    prior_loss_weight: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean(instance losses) + prior_loss_weight x mean(class losses), a scalar.

    `is_prior` marks the class (prior-preservation) samples of the batch. A part with no
    samples adds nothing, so the loss of a batch split in two (instance and class images of
    different sizes) is the sum of this function over the two parts.
    """
    per_sample = per_sample_loss(model_pred, target, weights)
    # Counts come from the mask on the CPU and the split is a product with it, so the GPU is
    # never waited for (boolean indexing would read back from the device).
    is_prior = is_prior.cpu().bool()
    n_prior = int(is_prior.sum())
    n_instance = len(is_prior) - n_prior
    prior = is_prior.to(per_sample.device, per_sample.dtype)
    terms = []
    if n_instance:
        terms.append((per_sample * (1 - prior)).sum() / n_instance)
    if n_prior:
        terms.append(prior_loss_weight * ((per_sample * prior).sum() / n_prior))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]
