"""Flux.1 as a model family: detection, loading (full precision and a quantized base), prompt
encoding as FluxPipeline does it, latents and packing, the flow-matching step and the
settings it refuses, on the tiny Flux model."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dbtools.families import registry
from dbtools.families.flux import FLUX1, FlowSettings, pack, unpack
from dbtools.families.models import load_sd_components
from dbtools.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load(tiny_flux, **kw):
    return load_sd_components(str(tiny_flux), **kw)


def test_flux_pipelines_are_flux_and_its_variants_are_named(tiny_flux):
    index = json.loads((tiny_flux / "model_index.json").read_text())
    assert registry.family_for_model_index(index) is FLUX1
    # Flux's parts saved under another pipeline name are still Flux, never SDXL.
    assert registry.family_for_model_index(dict(index, _class_name="DiffusionPipeline")) is FLUX1
    with pytest.raises(registry.UnsupportedFamily, match="a Flux.1 Fill model; this toolkit trains: SD 1.x, "
                                                         "SD 2.x, SDXL, Flux.1"):
        registry.family_for_model_index(dict(index, _class_name="FluxFillPipeline"))


def test_the_parts_load_with_the_run_settings_on_the_training_scheduler(tiny_flux):
    cfg = TrainConfig(weighting_scheme="logit_normal", logit_mean=0.5, max_sequence_length=24, guidance_scale=3.0)
    models = load(tiny_flux, options=cfg)
    assert models.family is FLUX1 and type(models.denoiser).__name__ == "FluxTransformer2DModel"
    assert type(models.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert models.noise_scheduler.flow_settings == FlowSettings("logit_normal", 0.5, 1.0, 1.29, 3.0, 24)
    assert [type(e).__name__ for e in models.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    cond = FLUX1.encode_prompts(FLUX1.prompt_encoder(models.tokenizers, cache=True), ["a red car"],
                                models.text_encoders, "cpu")
    assert cond["embeds"].shape[1] == 24 and cond["text_ids"].shape == (1, 24, 3)


def test_prompts_are_encoded_as_the_flux_pipeline_encodes_them(tiny_flux):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    prompts = ["a red car", "a photo of sks dog on a beach"]
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=32, device="cpu")
    tokenizer_2 = pipe.tokenizer_2
    tokenizer_2.model_max_length = 32
    for cache in (False, True):
        encoder = FLUX1.prompt_encoder([pipe.tokenizer, tokenizer_2], cache=cache)
        cond = FLUX1.encode_prompts(encoder, prompts, [pipe.text_encoder, pipe.text_encoder_2], "cpu")
        # Cached prompts are encoded without gradients, which may take another kernel.
        assert torch.allclose(cond["embeds"], embeds, atol=1e-5) and torch.allclose(cond["pooled"], pooled)
        assert torch.equal(cond["text_ids"][0], text_ids)
    assert list(encoder.cache) == prompts and encoder.cache["a red car"][0].device.type == "cpu"


def test_latents_are_shifted_scaled_and_packed_as_the_pipeline_packs_them(tiny_flux):
    from diffusers import AutoencoderKL, FluxPipeline

    vae = AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae")
    sample = torch.full((1, 16, 4, 6), 1.1159)
    # (1.1159 - 0.1159) x 0.3611
    assert torch.allclose(FLUX1.latents(sample, vae), torch.full_like(sample, 0.3611))
    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    tokens, ids = pack(x)
    assert tokens.shape == (2, 6, 64) and torch.equal(unpack(tokens, 4, 6), x)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", x.dtype))
    assert ids[:, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_one_step_is_flow_matching_with_the_guidance_embedding(tiny_flux):
    models = load(tiny_flux, options=TrainConfig(weighting_scheme="sigma_sqrt"))
    sched, transformer = models.noise_scheduler, models.denoiser
    sigmas = FLUX1.timesteps(sched, 3, torch.Generator().manual_seed(0))
    # seed 0's uniform draws 0.4963, 0.7682, 0.0885 on Flux's training schedule (1.0 ... 0.001)
    assert sigmas.tolist() == pytest.approx([0.504, 0.232, 0.912], abs=1e-6)
    assert FLUX1.loss_weights(sched, sigmas, None).tolist() == pytest.approx([s ** -2 for s in sigmas.tolist()])
    assert FLUX1.validation_timesteps(sched, 4) == [0.125, 0.375, 0.625, 0.875]
    x, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    assert torch.allclose(FLUX1.noisy(sched, x, noise, sigmas), (1 - sigmas[:, None, None, None]) * x
                          + sigmas[:, None, None, None] * noise)
    assert torch.equal(FLUX1.target(sched, x, noise, sigmas), noise - x)
    cond = FLUX1.encode_prompts(FLUX1.prompt_encoder(models.tokenizers, cache=False), ["a"] * 3,
                                models.text_encoders, "cpu")
    with torch.no_grad():
        at = {g: FLUX1.predict(transformer, x, sigmas, cond, guidance_scale=g) for g in (1.0, 4.0)}
    assert at[1.0].shape == x.shape
    assert not torch.allclose(at[1.0], at[4.0])  # the guidance embedding is fed


def test_a_quantized_base_trains_float32_adapters(tiny_flux):
    import bitsandbytes as bnb
    from peft import LoraConfig

    for quantize, layer in (("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)):
        transformer = load(tiny_flux, quantize=quantize).denoiser
        assert isinstance(transformer.transformer_blocks[0].attn.to_q, layer)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                           target_modules=FLUX1.lora_targets("transformer", transformer)))
        trained = [p for p in transformer.parameters() if p.requires_grad]
        assert trained and {p.dtype for p in trained} == {torch.float32}
        transformer.train()
        x = torch.randn(1, 16, 4, 4)
        out = FLUX1.predict(transformer, x, torch.tensor([0.5]), {
            "embeds": torch.randn(1, 8, 32), "pooled": torch.randn(1, 32), "text_ids": torch.zeros(1, 8, 3)})
        out.pow(2).mean().backward()
        # peft's gaussian init starts B at zero: the first gradients reach B.
        grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_flux_refuses_what_it_cannot_train_before_loading():
    ok = TrainConfig(use_lora=True, mixed_precision="bf16")
    assert FLUX1.training_problems(ok, cuda_bf16=True) == []
    assert FLUX1.training_problems(TrainConfig(use_lora=True), cuda_bf16=None) == []  # CPU: float32
    problems = FLUX1.training_problems(TrainConfig(train_text_encoder=True, snr_gamma=5.0), cuda_bf16=True)
    assert [p.split(":")[0].split(" ")[0] for p in problems] == ["Flux.1", "--train_text_encoder", "--snr_gamma"]
    (t4,) = FLUX1.training_problems(ok, cuda_bf16=False)
    assert "does not run natively (a T4" in t4
    (fp16,) = FLUX1.training_problems(TrainConfig(use_lora=True, mixed_precision="fp16"), cuda_bf16=True)
    assert fp16.startswith("--mixed_precision fp16: Flux.1 overflows in fp16")


def test_a_schnell_base_is_named_as_distilled_when_it_loads(tmp_path, tiny_flux, caplog):
    import shutil

    from diffusers import FluxTransformer2DModel

    schnell = tmp_path / "FLUX.1-schnell-tiny"
    shutil.copytree(tiny_flux, schnell)
    config = FluxTransformer2DModel.load_config(schnell, subfolder="transformer")
    FluxTransformer2DModel.from_config({**config, "guidance_embeds": False}).save_pretrained(schnell / "transformer")
    with caplog.at_level(logging.WARNING, logger="dbtools.families.flux"):
        load(schnell)
    assert "Flux.1 [schnell] is step-distilled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dbtools.families.flux"):
        load(tiny_flux)
    assert "schnell" not in caplog.text


def test_a_gated_base_is_named_with_the_way_in(monkeypatch):
    """Flux.1 [dev] is gated: the Hub's refusal becomes one message saying what to do."""
    import huggingface_hub

    from dbtools.families import models

    def refuse(*args, **kwargs):
        try:
            raise OSError("401 Client Error: Cannot access gated repo for url https://huggingface.co/...")
        except OSError as exc:
            raise OSError("You are trying to access a gated repo. Make sure to have access to it.") from exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(models.ModelLoadError) as err:
        models.detect_family("black-forest-labs/FLUX.1-dev")
    assert str(err.value).startswith("black-forest-labs/FLUX.1-dev is a gated model: accept its licence on "
                                     "https://huggingface.co/black-forest-labs/FLUX.1-dev")
