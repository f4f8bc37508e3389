"""Model loading: Hub ids / folders / single files, revisions and variants, clear errors, safe pickles."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from dbtools.families import models
from dbtools.families.detect import SD1
from dbtools.families.models import (
    ModelLoadError,
    inference_dtype,
    is_single_file,
    load_pipeline,
    load_sd_components,
    resolve_revision,
    safe_torch_load,
)
from tests.conftest import RunsCode


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


# --------------------------------------------------------------------------- folders


def test_loads_every_training_component_sd1(tiny_sd):
    c = load_sd_components(str(tiny_sd))
    assert type(c.tokenizer).__name__ == "CLIPTokenizer"
    assert type(c.text_encoder).__name__ == "CLIPTextModel"
    assert type(c.vae).__name__ == "AutoencoderKL"
    assert type(c.unet).__name__ == "UNet2DConditionModel"
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"
    assert c.prediction_type == "epsilon"
    assert {c.unet.dtype, c.vae.dtype, c.text_encoder.dtype} == {torch.float32}


def test_sd2_keeps_v_prediction(tiny_sd2):
    c = load_sd_components(str(tiny_sd2))
    assert c.noise_scheduler.config.prediction_type == "v_prediction"
    pipe = load_pipeline(str(tiny_sd2), scheduler="euler_a")
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_pipeline_has_no_safety_checker_and_unknown_scheduler_is_clear(tiny_sd):
    pipe = load_pipeline(str(tiny_sd), scheduler="dpm++")
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(ModelLoadError, match="unknown scheduler 'warp'.*ddim"):
        load_pipeline(str(tiny_sd), scheduler="warp")


def test_requested_dtype_is_used(tiny_sd):
    c = load_sd_components(str(tiny_sd), torch_dtype=torch.bfloat16)
    assert c.unet.dtype == c.vae.dtype == c.text_encoder.dtype == torch.bfloat16


def test_vae_override_from_vae_folder_or_model_folder(tiny_sd, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias += 1.0  # a "fine-tuned" VAE, like sd-vae-ft-mse
    vae.save_pretrained(tmp_path / "my-vae")
    vae.save_pretrained(tmp_path / "other-model" / "vae")
    assert not _same_weights(vae, load_sd_components(str(tiny_sd)).vae)
    for vae_path in (tmp_path / "my-vae", tmp_path / "other-model"):
        c = load_sd_components(str(tiny_sd), vae_name_or_path=str(vae_path))
        assert _same_weights(c.vae, vae)
        pipe = load_pipeline(str(tiny_sd), vae_name_or_path=str(vae_path))
        assert _same_weights(pipe.vae, vae)


def test_tokenizer_name_accepts_a_model_folder_or_a_tokenizer_folder(tiny_sd, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / "no-tokenizer")
    shutil.rmtree(broken / "tokenizer")
    for name in (tiny_sd, tiny_sd / "tokenizer"):
        c = load_sd_components(str(broken), tokenizer_name=str(name))
        assert c.tokenizer("a red car").input_ids[1:-1] == c.tokenizer.convert_tokens_to_ids(
            ["a</w>", "red</w>", "car</w>"])


def test_missing_vae_path_is_a_clear_error(tiny_sd, tmp_path):
    with pytest.raises(ModelLoadError, match="VAE path does not exist"):
        load_sd_components(str(tiny_sd), vae_name_or_path=str(tmp_path / "no-vae"))


# --------------------------------------------------------------------------- revisions / variants


@pytest.mark.parametrize(
    "name, revision, variant, expected",
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "fp16", None, (None, "fp16")),
        ("CompVis/stable-diffusion-v1-4", "fp16", None, (None, "fp16")),
        ("CompVis/stable-diffusion-v1-4", "main", None, ("main", None)),
        ("CompVis/stable-diffusion-v1-4", None, None, (None, None)),
        ("CompVis/stable-diffusion-v1-4", "fp16", "bf16", (None, "bf16")),
        ("/content/drive/MyDrive/model", "fp16", None, (None, None)),
        ("./output/500", "fp16", None, (None, None)),
        ("model.safetensors", "fp16", None, (None, None)),
        ("C:\\models\\sd15.ckpt", "main", "fp16", (None, "fp16")),
    ],
)
def test_resolve_revision(name, revision, variant, expected):
    assert resolve_revision(name, revision, variant) == expected


def test_revision_is_ignored_for_an_existing_local_folder(tiny_sd):
    assert resolve_revision(str(tiny_sd), "fp16", None) == (None, None)


@pytest.mark.parametrize("name, single", [("a.safetensors", True), ("b.CKPT", True), ("c.pt", True),
                                          ("d.bin", True), ("folder", False), ("owner/repo", False)])
def test_is_single_file(name, single):
    assert is_single_file(name) is single


@pytest.fixture(scope="module")
def fp16_only_folder(tiny_sd, tmp_path_factory) -> Path:
    """The tiny model saved the way Hub repos publish half weights: `*.fp16.safetensors` only."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path_factory.mktemp("variant") / "sd-fp16"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.to(torch.float16).save_pretrained(out, variant="fp16")
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    return out


def test_local_fp16_variant_is_used_and_loaded_as_fp32(fp16_only_folder, tiny_sd):
    c = load_sd_components(str(fp16_only_folder), variant="fp16")
    assert c.unet.dtype == torch.float32  # an optimizer must never get half-precision master weights
    reference = load_sd_components(str(tiny_sd)).unet
    # The fp16 weights were read (equal to the originals rounded to half precision).
    assert all(torch.equal(p, r.half().float())
               for p, r in zip(c.unet.state_dict().values(), reference.state_dict().values()))


def test_seed_notebook_revision_fp16_works_on_fp16_only_folder(fp16_only_folder):
    c = load_sd_components(str(fp16_only_folder), revision="fp16")
    assert c.unet.dtype == torch.float32
    pipe = load_pipeline(str(fp16_only_folder), revision="fp16")
    assert same_weights(pipe.unet, c.unet)  # both read the folder's fp16 weights


def test_local_folder_without_variant_falls_back_with_a_warning(tiny_sd, caplog):
    with caplog.at_level(logging.WARNING, logger="dbtools.families.models"):
        c = load_sd_components(str(tiny_sd), variant="fp16")
    assert "no fp16 weights" in caplog.text
    assert same_weights(c.unet, UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"))


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def _hub_repo_without_variant(returns, calls: list):
    """A stand-in for a diffusers/transformers class whose Hub repo has no variant files:
    `from_pretrained` records `(variant, kwargs)` in `calls` and fails when asked for a variant."""

    class Fake:
        @classmethod
        def from_pretrained(cls, name, variant=None, **kwargs):
            calls.append((variant, kwargs))
            if variant:
                raise OSError(f"{name} does not appear to have a file named model.{variant}.safetensors")
            return returns

    return Fake


def test_hub_repo_without_variant_falls_back_to_default_weights(caplog):
    calls = []
    fake_model = _hub_repo_without_variant("default weights", calls)
    with caplog.at_level(logging.WARNING, logger="dbtools.families.models"):
        got = models._from_pretrained(fake_model, "someone/old-repo", "unet", None, "fp16", torch.float32)
    assert got == "default weights"
    assert [variant for variant, _ in calls] == ["fp16", None]
    assert "no fp16 variant" in caplog.text


def test_hub_pipeline_without_variant_falls_back_to_default_weights(caplog):
    calls = []
    fake_pipeline = _hub_repo_without_variant("pipeline", calls)
    with caplog.at_level(logging.WARNING, logger="dbtools.families.models"):
        got = models._pipeline_from_pretrained(fake_pipeline, "someone/old-repo", None, "fp16",
                                                torch.float16, models._pipeline_kwargs(SD1))
    assert got == "pipeline"
    assert [(variant, kw["safety_checker"]) for variant, kw in calls] == [("fp16", None), (None, None)]
    assert "no fp16 variant" in caplog.text


# --------------------------------------------------------------------------- user errors


def test_missing_path_is_one_clear_error(tmp_path):
    missing = tmp_path / "drive" / "my-model"
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_sd_components(str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(str(missing))


def test_folder_that_is_not_a_model(tmp_path, image_factory):
    image_factory(tmp_path / "photos" / "a.jpg")
    with pytest.raises(ModelLoadError, match="not a diffusers model folder") as err:
        load_sd_components(str(tmp_path / "photos"))
    assert str(tmp_path / "photos") in str(err.value)


def test_training_output_folder_suggests_a_step_folder(tmp_path):
    for step in ("500", "1000"):
        (tmp_path / "out" / step).mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"pass one step folder.*1000"):
        load_pipeline(str(tmp_path / "out"))


def test_folder_of_a_single_file_suggests_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pass the file itself"):
        load_pipeline(str(tmp_path / "m"))


def test_missing_component_is_named(tiny_sd, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="'vae' folder is missing"):
        load_sd_components(str(broken))
    # ... unless a separate VAE is given.
    c = load_sd_components(str(broken), vae_name_or_path=str(tiny_sd))
    assert same_weights(c.vae, AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"))


def test_missing_weights_are_named(tiny_sd, tmp_path):
    broken = shutil.copytree(tiny_sd, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"unet: no weights"):
        load_pipeline(str(broken))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hugging Face Hub: offline mode is on"):
        load_sd_components("nobody-here/no-such-model-xyz")


def test_non_model_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model file"):
        load_pipeline(str(tmp_path / "notes.txt"))


# --------------------------------------------------------------------------- safe pickles


def test_safe_torch_load_refuses_code_and_runs_none(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": RunsCode(marker)}, path)
    with pytest.raises(ModelLoadError, match="refused") as err:
        safe_torch_load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    # The model loaders refuse it the same way, before diffusers reads it.
    with pytest.raises(ModelLoadError, match="refused"):
        load_pipeline(str(path))
    with pytest.raises(ModelLoadError, match="refused"):
        load_sd_components(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_safe_torch_load_reads_a_plain_state_dict(tmp_path, zip_format):
    path = tmp_path / "weights.ckpt"
    state = {"state_dict": {"a.weight": torch.arange(6.0).reshape(2, 3)}, "global_step": 7}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    got = safe_torch_load(path)
    assert got["global_step"] == 7
    assert torch.equal(got["state_dict"]["a.weight"], state["state_dict"]["a.weight"])


def test_safe_torch_load_reports_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelLoadError, match="cut.ckpt"):
        safe_torch_load(path)
    with pytest.raises(ModelLoadError, match="file not found"):
        safe_torch_load(tmp_path / "nope.ckpt")


# --------------------------------------------------------------------------- single files


def test_single_file_without_configs_offline_explains_config(tmp_path, monkeypatch, tiny_sd):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(models.SINGLE_FILE_CONFIG_ENV, raising=False)
    path = tmp_path / "custom.safetensors"
    unet = load_sd_components(str(tiny_sd)).unet
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in unet.state_dict().items()}, path)
    with pytest.raises(ModelLoadError, match=r"Pass config=<a diffusers folder") as err:
        load_pipeline(str(path))
    assert str(path) in str(err.value) and "original_config" in str(err.value)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelLoadError, match="not a valid .safetensors file"):
        load_pipeline(str(path))


@pytest.fixture(scope="module", params=["safetensors", "ckpt"])
def tiny_single_file(request, tiny_sd, tmp_path_factory) -> Path:
    from dbtools.after.export import export_single_file

    out = tmp_path_factory.mktemp("single") / f"tiny.{request.param}"
    export_single_file(str(tiny_sd), str(out))
    return out


def test_single_file_round_trip_with_config(tiny_single_file, tiny_sd, monkeypatch):
    ref = load_sd_components(str(tiny_sd))
    c = load_sd_components(str(tiny_single_file), config=str(tiny_sd))
    assert _same_weights(c.unet, ref.unet)
    assert _same_weights(c.vae, ref.vae)
    assert _same_weights(c.text_encoder, ref.text_encoder)
    assert c.prediction_type == "epsilon"
    monkeypatch.setenv(models.SINGLE_FILE_CONFIG_ENV, str(tiny_sd))
    pipe = load_pipeline(str(tiny_single_file), scheduler="ddim")
    assert _same_weights(pipe.unet, ref.unet)
    assert pipe.safety_checker is None


def test_single_file_keeps_v_prediction_from_its_config(tiny_sd2, tmp_path):
    from dbtools.after.export import export_single_file

    out = export_single_file(str(tiny_sd2), str(tmp_path / "sd2.safetensors"))
    c = load_sd_components(str(out), config=str(tiny_sd2))
    assert c.prediction_type == "v_prediction"
    assert _same_weights(c.unet, load_sd_components(str(tiny_sd2)).unet)


# --------------------------------------------------------------------------- devices


def test_inference_dtype_is_half_on_cuda_only():
    assert inference_dtype("cuda") == torch.float16
    assert inference_dtype("cuda:1") == torch.float16
    assert inference_dtype("cpu") == torch.float32
    assert inference_dtype("mps") == torch.float32


def test_pick_device_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.pick_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert models.pick_device() == "cpu"
    assert models.pick_device("cuda:1") == "cuda:1"  # a --device flag wins


def test_captioners_go_where_pick_device_says(tiny_blip, monkeypatch):
    from dbtools.caption import autocaption

    asked = []
    monkeypatch.setattr(models, "pick_device", lambda device=None: asked.append(device) or "cpu")
    assert autocaption.load_captioner(str(tiny_blip)).device == torch.device("cpu")
    assert asked == [None]  # the one device rule decided, not a copy of it


def test_vae_from_a_single_file_takes_its_config_from_the_base_folder(tiny_sd, tmp_path):
    from dbtools.after.export import export_single_file

    out = export_single_file(str(tiny_sd), str(tmp_path / "with-vae.safetensors"))
    c = load_sd_components(str(tiny_sd), vae_name_or_path=str(out))
    assert _same_weights(c.vae, load_sd_components(str(tiny_sd)).vae)
