"""Models of families we do not train (Flux, SD3, an SDXL refiner, ...) are named in
one message by every command that takes a model, before anything loads; nothing is guessed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dbtools.families import detect as families
from dbtools.families.detect import SD1, SDXL, UnsupportedFamily

TRAINED = "this toolkit trains: SD 1.x, SD 2.x, SDXL, Flux.1"
FLUX_INDEX = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
              "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
SD3_INDEX = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


@pytest.mark.parametrize(("class_name", "label"), [
    ("FluxFillPipeline", "Flux.1 Fill"), ("Flux2Pipeline", "Flux.2 [dev]"),
    ("StableDiffusion3Pipeline", "Stable Diffusion 3"),
    ("QwenImagePipeline", "Qwen-Image"), ("StableDiffusionXLInpaintPipeline", "SDXL inpainting"),
    ("IFPipeline", "DeepFloyd IF"),
])
def test_known_pipelines_we_do_not_train_are_named(class_name, label):
    index = dict(FLUX_INDEX, _class_name=class_name)
    with pytest.raises(UnsupportedFamily) as err:
        families.family_from_model_index(index)
    assert err.value.label == label
    assert TRAINED in str(err.value)


def test_a_renamed_pipeline_is_read_from_its_parts_never_guessed():
    # SD3's parts under a generic name: two CLIP text encoders, but no UNet -> not SDXL
    with pytest.raises(UnsupportedFamily, match="a transformer, no UNet"):
        families.family_from_model_index(SD3_INDEX | {"_class_name": "DiffusionPipeline"})
    # a UNet with a T5 encoder is no Stable Diffusion either
    t5 = {"_class_name": "MyPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
          "text_encoder": ["transformers", "T5EncoderModel"]}
    with pytest.raises(UnsupportedFamily, match="T5EncoderModel"):
        families.family_from_model_index(t5)
    refiner = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "text_encoder": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
    with pytest.raises(UnsupportedFamily, match="SDXL refiner"):
        families.family_from_model_index(refiner)
    # ours under another name still work
    sdxl = dict(refiner, _class_name="DiffusionPipeline", text_encoder=["transformers", "CLIPTextModel"])
    assert families.family_from_model_index(sdxl) is SDXL
    sd = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
          "text_encoder": ["transformers", "CLIPTextModel"]}
    assert families.family_from_model_index(sd) is SD1


@pytest.mark.parametrize(("key", "label"), [
    ("double_blocks.0.img_attn.qkv.weight", "Flux-style transformer"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "Flux-style transformer"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "Stable Diffusion 3"),
])
def test_single_files_of_other_families_are_named(key, label):
    with pytest.raises(UnsupportedFamily) as err:
        families.family_from_keys(["model.diffusion_model.out.2.weight", key])
    assert err.value.label == label


@pytest.fixture
def sd3_folder(tmp_path) -> Path:
    """What a Stable Diffusion 3 download looks like to detection: its model_index.json."""
    folder = tmp_path / "stable-diffusion-3-medium"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(SD3_INDEX), encoding="utf-8")
    return folder


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})


def test_every_command_names_an_sd3_model_in_one_message(sd3_folder, tmp_path, image_factory):
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    image_factory(data / "a red car.png")
    (data / "a red car.png.txt").write_text("a red car", encoding="utf-8")
    commands = {
        "train": [str(root / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(sd3_folder),
                  "--instance_data_dir", str(data), "--instance_prompt", "x", "--output_dir", str(tmp_path / "o"),
                  "--max_train_steps", "1"],
        "generate": ["-m", "dbtools", "generate", "--model", str(sd3_folder), "--prompt", "x",
                     "--out_dir", str(tmp_path / "g")],
        "classgen": ["-m", "dbtools", "classgen", "--pretrained_model_name_or_path", str(sd3_folder),
                     "--class_data_dir", str(tmp_path / "c"), "--class_prompt", "a car", "--num_class_images", "1"],
        "export": ["-m", "dbtools", "export", "--model_path", str(sd3_folder),
                   "--checkpoint_path", str(tmp_path / "x.safetensors")],
    }
    for name, args in commands.items():
        done = _run(args, tmp_path)
        assert done.returncode == 2, (name, done.stderr[-2000:])
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (name, done.stderr[-2000:])
        assert f"{sd3_folder} is a Stable Diffusion 3 model; {TRAINED}" in done.stderr, name
        assert "Traceback" not in done.stderr, name


def test_the_notebook_settings_cell_names_the_family(sd3_folder, tmp_path):
    from dbtools.families.models import UnsupportedModelError
    from dbtools.ui import notebook as nb

    with pytest.raises(UnsupportedModelError, match=f"is a Stable Diffusion 3 model; {TRAINED}"):
        nb.Session.start(str(sd3_folder), str(tmp_path / "out"), save_to_gdrive=False)


def test_a_real_flux_folder_is_a_flux_model_we_train(tiny_flux):
    """The tiny Flux.1 pipeline (the real classes, loaded back through `from_pretrained`) is
    a complete Flux download, detected as Flux.1 (which trains: `tests/test_flux_train.py`)."""
    from diffusers import FluxPipeline

    from dbtools.families.flux import FLUX1
    from dbtools.families.models import detect_family

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16
    assert pipe.tokenizer_2("a red car").input_ids[-1] == pipe.tokenizer_2.eos_token_id
    assert detect_family(str(tiny_flux)).family is FLUX1
