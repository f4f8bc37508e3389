"""The loss maths on fixed tensors against values worked out by hand, the first losses
of a seeded tiny run pinned, and a tiny UNet that learns to denoise one latent."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from dbtools.families.losses import (
    draw_sigmas,
    dreambooth_loss,
    flow_matching_noisy,
    flow_matching_target,
    flow_matching_weights,
    sigmas_on_schedule,
    training_noise,
)
from dbtools.families.sd import SD1, snr_weights
from dbtools.tiny import tiny_sd_configs

diffusion_target = SD1.target  # the DDPM target rule, SD 1.x/2.x and SDXL alike

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# DDPM's default linear schedule starts at beta = 1e-4: alpha_bar(0) = 0.9999.
A0 = 0.9999


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(prediction_type=prediction_type)


def per_sample_targets(values: list[float]) -> torch.Tensor:
    """One (1, 2, 2) sample per value, every element equal to it: its MSE against 0 is value^2."""
    return torch.tensor(values).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


# --------------------------------------------------------------------------- targets


def test_epsilon_target_is_the_noise():
    latents, noise = torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 2, 2)
    assert torch.equal(diffusion_target(scheduler(), latents, noise, torch.tensor([0])), noise)


def test_v_prediction_target_is_the_velocity():
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 = 0.99995 * 1 - 0.01 * 2 at t = 0.
    latents, noise = torch.full((1, 1, 2, 2), 2.0), torch.ones(1, 1, 2, 2)
    v = diffusion_target(scheduler("v_prediction"), latents, noise, torch.tensor([0]))
    assert torch.allclose(v, torch.full_like(v, math.sqrt(A0) - math.sqrt(1 - A0) * 2), atol=1e-6)
    assert v[0, 0, 0, 0].item() == pytest.approx(0.97995, abs=1e-5)


def test_an_unknown_prediction_type_is_a_user_error():
    from dbtools.core.errors import UserError

    odd = DDPMScheduler()
    odd.register_to_config(prediction_type="sample")
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        diffusion_target(odd, torch.zeros(1), torch.zeros(1), torch.tensor([0]))


# --------------------------------------------------------------------------- prior split


def test_prior_split_in_one_concatenated_batch():
    # Per-sample MSEs 1, 4 (instance) and 9, 16 (class): 2.5 + 0.5 x 12.5 = 8.75.
    target = per_sample_targets([1, 2, 3, 4])
    loss = dreambooth_loss(torch.zeros_like(target), target,
                           is_prior=torch.tensor([False, False, True, True]), prior_loss_weight=0.5)
    assert loss.item() == pytest.approx(8.75)


def test_prior_split_in_separate_batches_adds_up_to_the_same_loss():
    inst, cls = per_sample_targets([1, 2]), per_sample_targets([3, 4])

    def part(target, prior: bool):
        return dreambooth_loss(torch.zeros_like(target), target, is_prior=torch.full((2,), prior),
                               prior_loss_weight=0.5)

    assert part(inst, False).item() == pytest.approx(2.5)
    assert part(cls, True).item() == pytest.approx(6.25)
    assert (part(inst, False) + part(cls, True)).item() == pytest.approx(8.75)


def test_without_class_images_the_loss_is_the_plain_mean():
    target = per_sample_targets([1, 3])
    loss = dreambooth_loss(torch.zeros_like(target), target,
                           is_prior=torch.zeros(2, dtype=torch.bool), prior_loss_weight=1.0)
    assert loss.item() == pytest.approx(5.0)


# --------------------------------------------------------------------------- min-SNR


def test_min_snr_weights_for_epsilon_and_v_prediction():
    # t = 0: SNR = 0.9999 / 0.0001 = 9999 > gamma, so the weights are gamma / SNR (epsilon)
    # and gamma / (SNR + 1) (v-prediction). At t = 999 the SNR is below gamma: 1 and SNR / (SNR + 1).
    t = torch.tensor([0, 999])
    ab = scheduler().alphas_cumprod[999].item()
    snr_end = ab / (1 - ab)
    assert snr_end < 5
    eps = snr_weights(scheduler(), t, 5.0, "epsilon")
    v = snr_weights(scheduler("v_prediction"), t, 5.0, "v_prediction")
    assert eps.tolist() == pytest.approx([5 / 9999, 1.0], rel=1e-3)
    assert v.tolist() == pytest.approx([5 / 10000, snr_end / (snr_end + 1)], rel=1e-3)


@pytest.mark.parametrize(("prediction_type", "weight"), [("epsilon", 5 / 9999), ("v_prediction", 5 / 10000)])
def test_min_snr_weights_the_loss(prediction_type, weight):
    target = per_sample_targets([2])
    weights = SD1.loss_weights(scheduler(prediction_type), torch.tensor([0]), 5.0)
    loss = dreambooth_loss(torch.zeros_like(target), target, is_prior=torch.tensor([False]), prior_loss_weight=1.0,
                           weights=weights)
    assert loss.item() == pytest.approx(4 * weight, rel=1e-3)


# --------------------------------------------------------------------------- offset noise


def test_offset_noise_adds_one_draw_per_sample_and_channel():
    shape = (2, 3, 4, 4)
    gen = torch.Generator().manual_seed(7)
    base, offset = torch.randn(shape, generator=gen), torch.randn((2, 3, 1, 1), generator=gen)
    got = training_noise(shape, torch.Generator().manual_seed(7), 0.1)
    assert torch.allclose(got, base + 0.1 * offset)
    shift = got - base  # constant over each channel's pixels
    assert torch.allclose(shift, shift[:, :, :1, :1].expand(shape))
    plain = torch.Generator().manual_seed(7)
    assert torch.equal(training_noise(shape, plain, 0.0), base)
    # Without offset no second draw is made: the generator is where plain noise leaves it.
    assert torch.equal(torch.randn(3, generator=plain), torch.randn(3, generator=_after(shape)))


def _after(shape) -> torch.Generator:
    """A generator seeded 7 that has drawn one tensor of `shape` (what plain noise consumes)."""
    gen = torch.Generator().manual_seed(7)
    torch.randn(shape, generator=gen)
    return gen


# --------------------------------------------------------------------------- it learns


def _learns_setup():
    """One smooth training latent, one fixed prompt embedding, the tiny UNet and its schedulers."""
    cfgs = tiny_sd_configs()
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    latent = torch.stack([xs, ys, xs * ys, xs.abs() - ys.abs()]).unsqueeze(0)
    embeds = torch.randn((1, 4, cfgs["unet"]["cross_attention_dim"]), generator=torch.Generator().manual_seed(1))
    return cfgs, latent, embeds


def _train(unet, sched, latent, embeds, steps: int, batch: int = 8) -> None:
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    x0, emb = latent.expand(batch, -1, -1, -1), embeds.expand(batch, -1, -1)
    for _ in range(steps):
        noise = training_noise(tuple(x0.shape), gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(sched.add_noise(x0, noise, t), t, emb).sample
        loss = dreambooth_loss(pred, diffusion_target(sched, x0, noise, t),
                               is_prior=torch.zeros(batch, dtype=torch.bool), prior_loss_weight=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def _ddim_sample(unet, sched, embeds, steps: int = 20) -> torch.Tensor:
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(steps)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t, embeds).sample, t, x).prev_sample
    return x


# v-prediction gets there in fewer steps (after 60: about 0.08 x the untrained error, where
# epsilon needs 150 for its margin), so the pair stays within the suite's time.
@pytest.mark.parametrize(("prediction_type", "steps"), [("epsilon", 150), ("v_prediction", 60)])
def test_the_tiny_unet_learns_to_denoise_its_training_latent(prediction_type: str, steps: int):
    """Target, noise schedule and DDIM sampling agree end to end: after training on one
    latent, sampling for its prompt ends far nearer that latent than an untrained UNet does."""
    cfgs, latent, embeds = _learns_setup()
    sched = DDPMScheduler(**{**cfgs["scheduler"], "prediction_type": prediction_type})
    torch.manual_seed(0)
    # The tiny UNet as the tests build it. (A half-width variant looks cheaper but lands on a
    # CPU convolution path about 20x slower per step.)
    unet = UNet2DConditionModel(**cfgs["unet"])
    before = torch.mean((_ddim_sample(unet, sched, embeds) - latent) ** 2).item()
    _train(unet, sched, latent, embeds, steps=steps)
    after = torch.mean((_ddim_sample(unet, sched, embeds) - latent) ** 2).item()
    assert after < 0.25 * before, (before, after)


# --------------------------------------------------------------------------- flow matching


def flux_schedule(**kw) -> torch.Tensor:
    """Flux.1 [dev]'s training sigmas: 1.0, 0.999, ..., 0.001 (its shift is applied at inference)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{"num_train_timesteps": 1000, "shift": 3.0,
                                              "use_dynamic_shifting": True, **kw}).sigmas


def test_points_map_onto_the_training_schedule_noisiest_first():
    # index = floor(u x 1000): 0 -> 1.0, 250 -> 0.75, 500 -> 0.5, 999 -> 0.001
    got = sigmas_on_schedule(torch.tensor([0.0, 0.25, 0.5, 0.9999]), flux_schedule())
    assert got.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.001], abs=1e-6)
    # A statically shifted schedule (shift 3, as SD3's) is read as it is: 3 x 0.5 / (1 + 2 x 0.5) = 0.75.
    shifted = flux_schedule(use_dynamic_shifting=False)
    assert sigmas_on_schedule(torch.tensor([0.5]), shifted).item() == pytest.approx(0.75, abs=1e-6)


def test_sigmas_drawn_per_scheme_from_the_generator():
    gen = torch.Generator().manual_seed
    # seed 0's first uniform draws are 0.4963, 0.7682, 0.0885, 0.1320 -> indices 496, 768, 88, 132
    assert draw_sigmas("none", 4, flux_schedule(), gen(0)).tolist() == pytest.approx(
        [0.504, 0.232, 0.912, 0.868], abs=1e-6)
    # logit_normal: seed 0's normals 1.5410, -0.2934, -2.1788, 0.5684; sigmoid 0.8236, 0.4272,
    # 0.1017, 0.6384 -> indices 823, 427, 101, 638
    assert draw_sigmas("logit_normal", 4, flux_schedule(), gen(0)).tolist() == pytest.approx(
        [0.177, 0.573, 0.899, 0.362], abs=1e-6)
    # mode, scale 1.29: f(u) = 1 - u - 1.29 (cos^2(pi u / 2) - 1 + u); f(0.0885) = 0.8221 -> index 822 -> 0.178
    mode = draw_sigmas("mode", 4, flux_schedule(), gen(0), mode_scale=1.29)
    assert mode[2].item() == pytest.approx(0.178, abs=1e-6)
    # The same generator state gives the same sigmas: a resumed run draws what an unbroken one did.
    assert torch.equal(draw_sigmas("cosmap", 3, flux_schedule(), gen(5)),
                       draw_sigmas("cosmap", 3, flux_schedule(), gen(5)))


def test_logit_normal_mean_and_spread_move_the_sigmas():
    many = {m: draw_sigmas("logit_normal", 4000, flux_schedule(), torch.Generator().manual_seed(1), logit_mean=m)
            for m in (0.0, 2.0)}
    # Centred: the median is the middle of the schedule. diffusers' indexing (u counts from
    # the noisy end) makes a positive mean favour less noise.
    assert many[0.0].median().item() == pytest.approx(0.5, abs=0.03)
    assert (many[2.0] < 0.5).float().mean().item() > 0.95
    narrow = draw_sigmas("logit_normal", 4000, flux_schedule(), torch.Generator().manual_seed(1), logit_std=0.1)
    assert narrow.min().item() > 0.4 and narrow.max().item() < 0.6


def test_noisy_input_and_target_follow_the_straight_path():
    latents, noise = torch.full((3, 1, 2, 2), 2.0), torch.ones(3, 1, 2, 2)
    noisy = flow_matching_noisy(latents, noise, torch.tensor([0.0, 0.25, 1.0]))
    # (1 - s) x 2 + s x 1: 2, 1.75, 1
    assert noisy[:, 0, 0, 0].tolist() == pytest.approx([2.0, 1.75, 1.0])
    assert torch.equal(flow_matching_target(latents, noise), torch.full((3, 1, 2, 2), -1.0))


def test_loss_weights_per_scheme():
    sigmas = torch.tensor([0.5, 0.25, 1.0])
    assert flow_matching_weights("sigma_sqrt", sigmas).tolist() == pytest.approx([4.0, 16.0, 1.0])
    # cosmap: 2 / (pi (1 - 2s + 2s^2)): s = 0.5 -> 4 / pi; s = 0.25 -> 2 / (pi x 0.625); s = 1 -> 2 / pi
    assert flow_matching_weights("cosmap", sigmas).tolist() == pytest.approx(
        [4 / math.pi, 3.2 / math.pi, 2 / math.pi])
    for scheme in ("none", "logit_normal", "mode"):
        assert flow_matching_weights(scheme, sigmas).tolist() == [1.0, 1.0, 1.0]

