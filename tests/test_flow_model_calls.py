"""The Z-Image and Flux.2 [klein] model calls training makes (prompt encoding, latents, the
transformer's prediction) are the pipelines' own: one Euler step from pure noise made with
them lands where the pipeline's first step lands."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, ZImagePipeline

from dbtools.families import flux2, zimage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _first_step(pipe, **kwargs) -> torch.Tensor:
    """The latents after the pipeline's first (and only) step from sigma 1 to 0."""
    seen = {}

    def grab(_pipe, _i, _t, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    pipe(num_inference_steps=1, output_type="latent", callback_on_step_end=grab, **kwargs)
    return seen["latents"]


def test_z_image_step_is_the_pipelines(tiny_zimage):
    pipe = ZImagePipeline.from_pretrained(tiny_zimage)
    prompts = ["a red car", "a cat sitting on a chair in a big old room"]
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    # a copy: the Z-Image pipeline writes the chat-formatted prompts into the list it is given
    expected = _first_step(pipe, prompt=list(prompts), height=32, width=32, guidance_scale=0.0, latents=noise)

    cond = zimage.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    assert prompts == ["a red car", "a cat sitting on a chair in a big old room"]  # cache keys stay as given
    assert cond["lengths"].tolist()[0] < cond["lengths"].tolist()[1] == cond["embeds"].shape[1]
    velocity = zimage.predict(pipe.transformer, noise, torch.ones(2), cond["embeds"], cond["lengths"])
    assert torch.allclose(noise - velocity, expected, atol=1e-5)


def test_z_image_latents_are_shifted_and_scaled(tiny_zimage):
    vae = ZImagePipeline.from_pretrained(tiny_zimage).vae
    sample = torch.full((1, 16, 2, 2), 0.5)
    expected = (0.5 - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.allclose(zimage.latents(sample, vae), torch.full_like(sample, expected))


def test_flux2_step_is_the_pipelines(tiny_flux2):
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2)
    prompts = ["a red car", "a cat sitting on a chair"]
    noise = torch.randn(2, 128, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = _first_step(pipe, prompt=prompts, height=32, width=32, guidance_scale=1.0, latents=noise)

    embeds = flux2.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)["embeds"]
    assert embeds.shape == (2, 512, pipe.transformer.config.joint_attention_dim)
    velocity = flux2.predict(pipe.transformer, noise, torch.ones(2), embeds)
    packed = Flux2KleinPipeline._pack_latents(noise - velocity)
    assert torch.allclose(packed, expected, atol=1e-5)


def test_flux2_latents_are_the_pipelines_normalised_patches(tiny_flux2):
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    sample = pipe.vae.encode(image).latent_dist.mode()
    ours = flux2.latents(sample, pipe.vae)
    assert ours.shape == (1, 128, 8, 8)
    assert torch.allclose(ours, pipe._encode_vae_image(image, generator=None), atol=1e-6)
