"""Memory profiles and how the notebook adapts to the model's family (SD 1.x, SD 2.x, SDXL)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dbtools.families import profiles, registry
from dbtools.families.detect import SD1, SD2, SDXL, Detected
from dbtools.families.profiles import (
    MEMORY_PROFILES,
    SD_DEFAULT,
    SDXL_FULL_24GB,
    SDXL_LORA_16GB,
    estimate_training_memory,
    fit_warning,
    recommended_profile,
)
from dbtools.ui import notebook as nb

T4_GIB = 15.0  # what a Colab T4 reports


def test_every_profile_is_flags_the_training_command_accepts():
    from dbtools.train.config import parse_args

    for name, flags in MEMORY_PROFILES.items():
        args = parse_args(["--instance_data_dir=x", "--output_dir=y", *nb.flag_args(**flags)])
        for key, value in flags.items():
            assert getattr(args, key) == value, (name, key)
        assert set(profiles.PROFILE_FAMILIES[name]) <= {f.key for f in registry.FAMILIES}


def test_estimates_match_the_known_figures():
    # Shivam Shrirao's T4 figure for SD 1.5 at 512 px, fp16 + 8-bit Adam + checkpointing + text encoder: 9.92 GB
    sd15 = estimate_training_memory("sd1", {**MEMORY_PROFILES[SD_DEFAULT], "train_text_encoder": True,
                                            "resolution": 512})
    assert 9.0 <= sd15.total_gib <= 11.0
    assert sd15.parts["gradients"] == pytest.approx((859_520_964 + 123_060_480) * 4 / 1024**3)
    # each memory saver lowers the estimate
    no_ckpt = estimate_training_memory("sd1", {**MEMORY_PROFILES["fp16 + 8-bit Adam"], "train_text_encoder": True})
    fp32 = estimate_training_memory("sd1", {**MEMORY_PROFILES["fp32, no memory savings"], "train_text_encoder": True})
    assert sd15.total_gib < no_ckpt.total_gib < fp32.total_gib
    # SDXL LoRA at 1024 px fits a T4 with room (the target: at most 12 GB)
    lora = estimate_training_memory("sdxl", {**MEMORY_PROFILES[SDXL_LORA_16GB], "resolution": 1024})
    assert lora.total_gib <= 12 and lora.fits(T4_GIB)
    assert lora.parts["weights"] == pytest.approx(
        (2_567_463_684 * 2 + 4 * 1_451_520 * 4) / 1024**3)  # frozen fp16 UNet + float32 rank-4 adapters
    # a bigger picture costs activations: 1024 px is 4x the pixels of 512 px
    small = estimate_training_memory("sdxl", {**MEMORY_PROFILES[SDXL_LORA_16GB], "resolution": 512})
    assert lora.parts["activations"] == pytest.approx(4 * small.parts["activations"])
    # SDXL with every UNet weight trained in float32: 8-bit Adam's state does not fit 24 GB,
    # Adafactor's (the 24 GB profile) does, with little room; neither fits a T4
    full = estimate_training_memory("sdxl", {**MEMORY_PROFILES[SDXL_FULL_24GB], "resolution": 1024})
    adam8 = estimate_training_memory("sdxl", {**MEMORY_PROFILES[SDXL_FULL_24GB], "use_adafactor": False,
                                              "use_8bit_adam": True, "resolution": 1024})
    assert 22 < full.total_gib <= 24 < adam8.total_gib and not full.fits(T4_GIB)
    assert full.parts["optimizer"] == pytest.approx(2_567_463_684 * 0.38 / 1024**3)


def test_fit_warning_names_the_profile_and_the_fix():
    flags = {**MEMORY_PROFILES[SDXL_FULL_24GB], "resolution": 1024}
    warning = fit_warning("sdxl", flags, T4_GIB, SDXL_FULL_24GB)
    assert SDXL_FULL_24GB in warning and "15.0 GiB" in warning and SDXL_LORA_16GB in warning
    assert fit_warning("sdxl", flags, None, SDXL_FULL_24GB) is None  # no GPU known: nothing to say
    assert fit_warning("sdxl", {**MEMORY_PROFILES[SDXL_LORA_16GB], "resolution": 1024}, T4_GIB) is None
    assert "--use_lora" in fit_warning("sd1", {**MEMORY_PROFILES["fp32, no memory savings"],
                                               "train_text_encoder": True}, T4_GIB)


def test_recommended_profile_keeps_sd_and_picks_lora_for_sdxl_on_small_gpus():
    for gpu in (None, T4_GIB, 80.0):
        assert recommended_profile("sd1", gpu) == recommended_profile("sd2", gpu) == SD_DEFAULT
    assert recommended_profile("sdxl", None) == SDXL_LORA_16GB
    assert recommended_profile("sdxl", T4_GIB) == SDXL_LORA_16GB
    assert recommended_profile("sdxl", 80.0) == recommended_profile("sdxl", 24.0) == SDXL_FULL_24GB


# --------------------------------------------------------------------------- the training cell


CELL = {"pretrained_vae_name_or_path": "auto", "resolution": 0, "memory_profile": "auto", "train_text_encoder": True,
            "max_train_steps": 2000, "save_interval": 500}


def test_training_cell_defaults_follow_the_family():
    sd1 = nb.training_flags("m", family=Detected(SD1), **CELL).flags
    assert (sd1["resolution"], sd1["pretrained_vae_name_or_path"]) == (512, "stabilityai/sd-vae-ft-mse")
    assert sd1["train_text_encoder"] is True and sd1["gradient_checkpointing"] is True and "use_lora" not in sd1
    sd2v = nb.training_flags("m", family=Detected(SD2, "v_prediction"), **CELL).flags
    assert sd2v["resolution"] == 768

    chosen = nb.training_flags("m", family=Detected(SDXL), **CELL)
    flags = chosen.flags
    assert flags["resolution"] == 1024 and flags["pretrained_vae_name_or_path"] == "madebyollin/sdxl-vae-fp16-fix"
    assert flags["use_lora"] is True and flags["train_text_encoder"] is False  # LoRA without a known GPU
    assert flags["mixed_precision"] == "fp16" and flags["use_8bit_adam"] and flags["gradient_checkpointing"]
    assert any(SDXL_LORA_16GB in n for n in chosen.notes)
    assert any("--train_text_encoder" in n and "extra_flags" in n for n in chosen.notes)
    assert chosen.warning is None
    # extra flags still win; a big GPU gets the full fine-tune
    again = nb.training_flags("m", family=Detected(SDXL), extra_flags="--train_text_encoder --resolution=768", **CELL)
    assert again.flags["train_text_encoder"] is True and again.flags["resolution"] == "768"
    assert nb.training_flags("m", family=Detected(SDXL), gpu_gib=80.0, **CELL).flags["use_lora"] is False


def test_training_cell_warns_when_the_profile_cannot_fit_and_notes_a_profile_of_another_family(caplog):
    cell = {**CELL, "memory_profile": SDXL_FULL_24GB}
    chosen = nb.training_flags("m", family=Detected(SDXL), gpu_gib=T4_GIB, **cell)
    assert chosen.warning and "run out of memory" in chosen.warning
    with caplog.at_level(logging.INFO, logger="dbtools"):
        nb.training_command("m", "out", "c.json", family=Detected(SDXL), gpu_gib=T4_GIB, **cell)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and SDXL_LORA_16GB in r.getMessage()]
    sd_on_xl = nb.training_flags("m", family=Detected(SDXL), **{**CELL, "memory_profile": SD_DEFAULT})
    assert any("meant for sd1 / sd2" in n for n in sd_on_xl.notes)
    with pytest.raises(nb.UserError, match="memory_profile 'huge'"):
        nb.training_flags("m", family=Detected(SD1), **{**CELL, "memory_profile": "huge"})


def test_auto_values_detect_the_family_from_the_model_and_the_session_knows_it(tiny_sdxl, tmp_path, caplog):
    flags = nb.training_flags(str(tiny_sdxl), **CELL).flags  # no family given: read from the folder
    assert flags["resolution"] == 1024 and flags["use_lora"] is True
    with caplog.at_level(logging.INFO, logger="dbtools"):
        session = nb.Session.start(str(tiny_sdxl), str(tmp_path / "out"), save_to_gdrive=False)
    assert session.family.family is SDXL and "Stable Diffusion XL, 1024 px" in caplog.text
    unknown = nb.Session.start(str(tmp_path / "no-such-model"), str(tmp_path / "out2"), save_to_gdrive=False)
    assert unknown.family is None  # the training cell asks again and reports the problem then
    with pytest.raises(nb.UserError, match="no-such-model"):
        nb.training_flags(str(tmp_path / "no-such-model"), **CELL)


# --------------------------------------------------------------------------- the export cell


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, tmp_path_factory):
    """A LoRA run's output folder: `4/` holds UNet adapters (non-zero) and args.json naming the base."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    out = tmp_path_factory.mktemp("lora_run")
    StableDiffusionXLPipeline.save_lora_weights(
        out / "4", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    (out / "4" / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_sdxl)}))
    return out


def test_export_cell_writes_a_lora_file_or_a_fused_checkpoint(lora_run, tiny_sdxl, tmp_path, caplog):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    session = nb.Session(model=str(tiny_sdxl), output_dir=lora_run, weights_dir=lora_run / "4")
    with caplog.at_level(logging.INFO, logger="dbtools"):
        lora_file = nb.export_step(session, fp16=False)  # auto: a LoRA run exports its LoRA file
    assert "put it in models/Lora (AUTOMATIC1111, Forge) or models/loras (ComfyUI)" in caplog.text
    from dbtools.after.kohya import read_metadata

    assert read_metadata(lora_file)["ss_base_model_version"] == "sdxl_base_v1-0"  # from args.json's base model
    assert lora_file.name == f"{lora_run.name}-4-lora.safetensors"
    keys = set(load_file(str(lora_file)))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)

    fused = nb.export_step(session, fp16=False, name="fused", export_as="single-file checkpoint")
    pipe = StableDiffusionXLPipeline.from_single_file(str(fused), config=str(tiny_sdxl))
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    name = next(n for n, _ in base.named_parameters() if n.endswith("attn1.to_q.weight"))
    assert not torch.equal(dict(pipe.unet.named_parameters())[name], dict(base.named_parameters())[name])
    assert session.exported_from == [lora_run / "4", lora_run / "4"]

    full = nb.Session(model=str(tiny_sdxl), output_dir=tmp_path, weights_dir=tiny_sdxl)
    with pytest.raises(nb.UserError, match="full model, not LoRA"):
        nb.export_step(full, export_as="LoRA file (kohya)")
    with pytest.raises(nb.UserError, match="safetensors"):
        nb.export_step(session, export_format="ckpt", export_as="LoRA file (kohya)")


def test_the_24gb_profile_optimizer_is_adafactor_at_the_given_learning_rate():
    from transformers.optimization import Adafactor

    from dbtools.train.config import TrainConfig, flag_problems
    from dbtools.train.setup import make_optimizer

    cfg = TrainConfig(instance_data_dir="x", output_dir="y", **{
        **{k: v for k, v in MEMORY_PROFILES[SDXL_FULL_24GB].items() if k != "mixed_precision"}, "learning_rate": 2e-6})
    weight = torch.nn.Parameter(torch.ones(3, 4))
    opt = make_optimizer(cfg, [weight], "cpu")
    assert isinstance(opt, Adafactor) and opt.param_groups[0]["lr"] == 2e-6
    weight.grad = torch.ones(3, 4)
    opt.step()
    assert torch.all(weight < 1)  # it steps at the fixed rate, no relative step size
    both = TrainConfig(instance_data_dir="x", output_dir="y", use_adafactor=True, use_8bit_adam=True)
    assert any("--use_adafactor" in p for p in flag_problems(both))


def test_every_profile_carries_the_learning_rate_that_suits_it():
    for name, flags in MEMORY_PROFILES.items():
        rate = flags["learning_rate"]
        assert (5e-5 <= rate <= 5e-4) if flags.get("use_lora") else (1e-6 <= rate <= 5e-6), name
    # LoRA turned on by hand over a full fine-tune profile trains at LoRA's rate
    assert profiles.learning_rate_for(SD_DEFAULT, {"use_lora": True}) == profiles.LORA_LR
    assert profiles.learning_rate_for(SD_DEFAULT, {}) == MEMORY_PROFILES[SD_DEFAULT]["learning_rate"]
    chosen = nb.training_flags("m", family=Detected(SD1), extra_flags="--use_lora", **CELL).flags
    assert chosen["learning_rate"] == profiles.LORA_LR


def test_prior_preservation_doubles_the_unet_batch_in_the_estimate():
    flags = {**MEMORY_PROFILES[SDXL_LORA_16GB], "resolution": 1024}
    alone = estimate_training_memory("sdxl", flags)
    prior = estimate_training_memory("sdxl", {**flags, "with_prior_preservation": True})
    assert prior.parts["activations"] == pytest.approx(2 * alone.parts["activations"])
    assert prior.parts["weights"] == alone.parts["weights"]
