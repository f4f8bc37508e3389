"""Pure tensor maths of the DDPM and flow-matching losses, which the family modules wire and
the loop reduces: noise, sigmas, noisy input, target, per-sample weights and error, prior split.

Nothing here loads a model or reads a file; the training loop draws the noise, asks the
model family (`dbtools.families`) for timesteps, noisy input, target, per-sample weights and
the prediction, and hands the tensors in. Nothing here branches on a family.
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


# --------------------------------------------------------------------------- flow matching

# The flow-matching counterpart (Flux): sigmas drawn by a weighting scheme, the noisy input,
# the target and the scheme's per-sample loss weights. diffusers' weighting schemes
# (`--weighting_scheme`, checked with the flags): logit_normal and mode shape how sigmas are
# drawn, sigma_sqrt and cosmap weight the loss, none draws uniformly and weights nothing.


def sigmas_on_schedule(u: torch.Tensor, schedule_sigmas: torch.Tensor) -> torch.Tensor:
    """The training schedule's sigma at each point `u` in [0, 1): u = 0 is the first (noisiest,
    1.0 for Flux) entry of `schedule_sigmas`, u -> 1 the last (the scheduler's table has one
    entry per training timestep, as diffusers' Flux DreamBooth script indexes it)."""
    index = (u * len(schedule_sigmas)).long().clamp(0, len(schedule_sigmas) - 1)
    return schedule_sigmas.float()[index.cpu()]


def draw_sigmas(scheme: str, batch_size: int, schedule_sigmas: torch.Tensor, generator: torch.Generator, *,
                logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """One sigma per sample, drawn with diffusers' density for `scheme` from `generator`
    (logit-normal: sigmoid of N(logit_mean, logit_std); mode: uniform bent by `mode_scale`
    towards the middle; the others uniform), then looked up on the schedule."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std,
                                              mode_scale=mode_scale, generator=generator)
    return sigmas_on_schedule(u, schedule_sigmas)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`sigmas` shaped to broadcast over each sample of `like`, in its dtype and device."""
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def flow_matching_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The point on the straight path from the latents (sigma 0) to the noise (sigma 1):
    (1 - sigma) * latents + sigma * noise."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def flow_matching_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer must predict: the path's velocity, noise - latents."""
    return noise - latents


def flow_matching_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of `scheme` (diffusers' `compute_loss_weighting_for_sd3`):
    sigma_sqrt 1 / sigma^2, cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)), others 1."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas.float())

