"""Z-Image and Flux.2 [klein] as families on the seam: detected from their files, loaded for
training through the same loader as SD, prompts encoded (and cached) as their pipelines do,
one flow-matching step that trains LoRA adapters, and the sample pipeline built from the
training components making the images `from_pretrained` makes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, ZImagePipeline
from peft import LoraConfig

from dbtools.core.errors import UserError
from dbtools.families import flux2, registry, zimage
from dbtools.families.base import Conditioning
from dbtools.families.models import UnsupportedModelError, detect_family, load_sd_components

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["zimage", "flux2"])
def case(request, tiny_zimage, tiny_flux2):
    """(family, tiny model folder, pipeline class) for each of the two families."""
    return {"zimage": (zimage.ZIMAGE, tiny_zimage, ZImagePipeline),
            "flux2": (flux2.FLUX2, tiny_flux2, Flux2KleinPipeline)}[request.param]


def test_detected_from_the_folder_and_named_in_what_we_train(case):
    family, model, _ = case
    assert detect_family(str(model)).family is family
    assert family.label in registry.trained_labels()


def test_a_step_distilled_klein_is_refused_with_what_to_train_instead(tiny_flux2, tmp_path):
    distilled = tmp_path / "FLUX.2-klein-4B"
    shutil.copytree(tiny_flux2, distilled)
    index = json.loads((distilled / "model_index.json").read_text(encoding="utf-8"))
    (distilled / "model_index.json").write_text(json.dumps(dict(index, is_distilled=True)), encoding="utf-8")
    with pytest.raises(UnsupportedModelError, match="FLUX.2-klein-base-4B") as err:
        detect_family(str(distilled))
    assert "step-distilled" in str(err.value)


def test_z_image_turbo_is_refused_before_loading_with_what_to_train_instead(tiny_zimage, tmp_path):
    turbo = tmp_path / "Z-Image-Turbo"
    shutil.copytree(tiny_zimage, turbo)
    with pytest.raises(UserError, match="Tongyi-MAI/Z-Image") as err:
        load_sd_components(str(turbo))
    assert "8 steps" in str(err.value)
    assert zimage.is_turbo("Tongyi-MAI/Z-Image-Turbo") and not zimage.is_turbo("ostris/Z-Image-De-Turbo")
    assert not zimage.is_turbo("Tongyi-MAI/Z-Image")


def test_training_components_load_in_their_classes(case):
    family, model, pipe_class = case
    parts = load_sd_components(str(model), component_dtypes={"text_encoder": torch.bfloat16})
    assert parts.family is family
    assert type(parts.denoiser).__name__ == family.denoiser_class
    assert parts.text_encoder.dtype == torch.bfloat16 and parts.denoiser.dtype == torch.float32
    assert isinstance(parts.vae, AutoencoderKLFlux2) == (family is flux2.FLUX2)
    reference = pipe_class.from_pretrained(model).scheduler.config
    assert parts.noise_scheduler.config.shift == reference.shift
    assert parts.noise_scheduler.config.use_dynamic_shifting == reference.use_dynamic_shifting


def test_prompts_are_encoded_as_the_pipeline_does_and_cached(case):
    family, model, pipe_class = case
    pipe = pipe_class.from_pretrained(model)
    encoder = family.prompt_encoder([pipe.tokenizer], cache=True, max_length=512)
    prompts = ["a red car", "a cat sitting on a chair in a big old room"]
    cond = family.encode_prompts(encoder, prompts, [pipe.text_encoder], "cpu")
    assert set(encoder.cache) == set(prompts)
    own = family.model.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    for i, length in enumerate(cond["lengths"].tolist()):
        assert torch.equal(cond["embeds"][i, :length], own["embeds"][i, :length])
        assert not cond["embeds"][i, length:].any()

    class Gone(torch.nn.Module):  # the encoder has left: cached prompts need no encoder
        def forward(self, *args, **kwargs):
            raise AssertionError("encoded again")

    again = family.encode_prompts(encoder, prompts[::-1], [Gone()], "cpu")
    both = Conditioning.cat([cond, again])  # batches of different prompts join (prior preservation)
    assert torch.equal(both["embeds"][3], cond["embeds"][0])


def _lora_transformer(family, model, pipe_class):
    pipe = pipe_class.from_pretrained(model)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=family.lora_targets("transformer", transformer)))
    return pipe, transformer


def test_one_flow_matching_step_trains_the_lora_adapters(case):
    family, model, pipe_class = case
    pipe, transformer = _lora_transformer(family, model, pipe_class)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        latents = family.latents(pipe.vae.encode(image).latent_dist.sample(generator), pipe.vae)
    cond = family.encode_prompts(family.prompt_encoder([pipe.tokenizer], cache=False), ["a red car", "a dog"],
                                 [pipe.text_encoder], "cpu")
    scheduler = family.noise_scheduler(pipe.scheduler.config)
    sigmas = family.timesteps(scheduler, 2, generator)
    assert ((sigmas > 0) & (sigmas <= 1)).all()
    noise = torch.randn(latents.shape, generator=generator)
    noisy = family.noisy(scheduler, latents, noise, sigmas)
    target = family.target(scheduler, latents, noise, sigmas)
    assert torch.allclose(noisy + (1 - sigmas.view(-1, 1, 1, 1)) * target, noise, atol=1e-5)

    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        pred = family.predict(transformer, noisy, sigmas, cond)
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]  # it learns the fixed sample


def test_sample_pipeline_from_training_parts_makes_the_from_pretrained_images(case):
    family, model, pipe_class = case
    parts = load_sd_components(str(model))
    built = family.build_pipeline(parts.parts, pipe_class.from_pretrained(model).scheduler)
    reference = pipe_class.from_pretrained(model)
    kwargs = dict(prompt="a red car", height=32, width=32, num_inference_steps=2, output_type="np",
                  guidance_scale=family.guidance_scale)
    ours = built(generator=torch.Generator().manual_seed(3), **kwargs).images
    theirs = reference(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert np.array_equal(ours, theirs)


def test_saved_lora_reads_back_and_its_ui_file_covers_every_module(case, tmp_path):
    family, model, pipe_class = case
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    _, transformer = _lora_transformer(family, model, pipe_class)
    # training hands the layers over in diffusers' names (`lora.down` for the attention projections)
    family.save_lora(str(tmp_path), {"transformer": convert_state_dict_to_diffusers(
        get_peft_model_state_dict(transformer))})
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    fresh = pipe_class.from_pretrained(model)
    fresh.load_lora_weights(str(tmp_path))
    trained = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    loaded = {n for n, m in fresh.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert trained and loaded == trained  # every adapter reaches the pipeline that loads the file
    assert all(k.startswith("transformer.") for k in saved)
    ui = family.ui_lora("flow").convert(saved, 4)
    assert len(ui) == 3 * len({k.rsplit(".", 2)[0] for k in ui if k.endswith(".lora_down.weight")})
    assert all(k.startswith(family.ui_lora("flow").prefixes["transformer"]) for k in ui)


def test_run_settings_reach_the_sigmas_and_the_prompt_length(case):
    from types import SimpleNamespace

    family, model, _ = case
    uniform = load_sd_components(str(model))
    options = SimpleNamespace(weighting_scheme="logit_normal", logit_mean=2.0, logit_std=0.5, max_sequence_length=16)
    parts = load_sd_components(str(model), options=options)
    draw = [family.timesteps(p.noise_scheduler, 256, torch.Generator().manual_seed(0)) for p in (uniform, parts)]
    assert draw[1].mean() < draw[0].mean() - 0.2  # logit mean 2: most draws near the clean end
    long_caption = ["a red car on a street in the city " * 10]
    cond = family.encode_prompts(family.prompt_encoder([parts.tokenizer], cache=False), long_caption,
                                 [parts.text_encoder], "cpu")
    # Z-Image drops padding, so --max_sequence_length shortens its prompts; Flux.2 attends to the
    # padding and always reads the pipeline's 512 tokens
    assert cond["embeds"].shape[1] == (16 if family is zimage.ZIMAGE else 512)


def test_settings_it_cannot_train_with_are_named_before_loading(case):
    from types import SimpleNamespace

    family, _, _ = case
    options = SimpleNamespace(use_lora=False, train_text_encoder=True, snr_gamma=5.0, mixed_precision="fp16")
    problems = family.training_problems(options, cuda_bf16=True)
    assert len(problems) == 4 and all(family.label in p or "--" in p for p in problems)
    assert family.training_problems(SimpleNamespace(use_lora=True, mixed_precision="bf16"), cuda_bf16=True) == []
    assert family.training_problems(SimpleNamespace(use_lora=True), cuda_bf16=False)  # a T4: no bf16


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantized_base_trains_float32_adapters(case, quantize):
    import bitsandbytes as bnb

    family, model, _ = case
    parts = load_sd_components(str(model), quantize=quantize)
    transformer = parts.denoiser
    layer = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}[quantize]
    assert any(isinstance(m, layer) for m in transformer.modules())
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=family.lora_targets("transformer",
                                                                                             transformer)))
    cond = family.encode_prompts(family.prompt_encoder([parts.tokenizer], cache=False), ["a red car"],
                                 [parts.text_encoder], "cpu")
    channels = 4 * parts.vae.config.latent_channels if family is flux2.FLUX2 else parts.vae.config.latent_channels
    pred = family.predict(transformer, torch.randn(1, channels, 8, 8), torch.tensor([0.5]), cond)
    pred.float().pow(2).mean().backward()
    trained = [p for p in transformer.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.grad is not None for p in trained)
    assert not family.may_upcast(quantized=True)


def test_generate_makes_an_image_that_from_png_remakes_pixel_for_pixel(case, tmp_path, capsys):
    from PIL import Image

    from dbtools.cli import main

    _, model, _ = case
    argv = ["generate", "--model", str(model), "--prompt", "a red car", "--negative_prompt", "blurry",
            "--steps", "2", "--width", "32", "--height", "32", "--seed", "5"]
    assert main([*argv, "--out_dir", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out.split()[-1]
    assert main(["generate", "--model", str(model), "--from_png", first, "--out_dir", str(tmp_path / "b")]) == 0
    again = capsys.readouterr().out.split()[-1]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_classgen_fills_a_class_folder(case, tmp_path, capsys):
    from PIL import Image

    from dbtools.cli import main

    _, model, _ = case
    folder = tmp_path / "class"
    assert main(["classgen", "--pretrained_model_name_or_path", str(model), "--class_data_dir", str(folder),
                 "--class_prompt", "a photo of a dog", "--negative_prompt", "blurry", "--num_class_images", "2",
                 "--sample_batch_size", "2", "--resolution", "32", "--num_inference_steps", "1"]) == 0
    images = sorted(folder.iterdir())
    assert len(images) == 2 and all(Image.open(p).size == (32, 32) for p in images)


@pytest.mark.parametrize(("key", "budget_gib"), [("zimage", 12.0), ("flux2", 10.0)])
def test_the_notebook_picks_the_familys_16_gb_profile_and_its_estimate_fits(key, budget_gib, tiny_zimage, tiny_flux2):
    from dbtools.families import profiles
    from dbtools.ui.notebook import training_flags

    model = {"zimage": tiny_zimage, "flux2": tiny_flux2}[key]
    chosen = training_flags(str(model), memory_profile="auto", resolution="auto", learning_rate="auto",
                            gpu_gib=16.0)
    flags = chosen.flags
    assert flags["resolution"] == 1024 and flags["use_lora"] and not flags["train_text_encoder"]
    assert flags["mixed_precision"] == "bf16" and flags["learning_rate"] == 1e-4 and chosen.warning is None
    assert flags.get("quantize_base", "none") == ("int8" if key == "zimage" else "none")
    bench = {**flags, "lora_rank": 16, "with_prior_preservation": False}  # rank 16, 1024 px, batch 1
    estimate = profiles.estimate_training_memory(key, bench)
    assert estimate.total_gib <= budget_gib, estimate.describe()
    # the real-size parts: a bf16 Z-Image transformer alone would take 11.5 GiB of the 16
    bf16 = profiles.estimate_training_memory(key, {**bench, "quantize_base": "none"})
    assert (bf16.parts["weights"] > estimate.parts["weights"] + 5) == (key == "zimage")
