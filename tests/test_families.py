"""Model families: detection from folders, Hub-style model indexes and single files; SDXL
pipelines loaded by the same functions; SDXL prompt encoding and size conditioning."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dbtools.after.export import export_single_file
from dbtools.families import detect as families
from dbtools.families.detect import SD1, SD2, SDXL, Detected
from dbtools.families.models import (
    ModelLoadError,
    detect_family,
    load_pipeline,
    load_sd_components,
)

# --------------------------------------------------------------------------- pure rules


def test_family_from_model_index_and_text_config():
    sd_index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    assert families.family_from_model_index(sd_index, {"hidden_act": "quick_gelu", "hidden_size": 768}) is SD1
    assert families.family_from_model_index(sd_index, {"hidden_act": "gelu", "hidden_size": 1024}) is SD2
    assert families.family_from_model_index(sd_index) is SD1
    assert families.family_from_model_index({"_class_name": "StableDiffusionXLPipeline"}) is SDXL
    # fine-tunes sometimes save under another pipeline name; the second encoder tells
    assert families.family_from_model_index({"_class_name": "DiffusionPipeline",
                                             "unet": ["diffusers", "UNet2DConditionModel"],
                                             "text_encoder": ["transformers", "CLIPTextModel"],
                                             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}) is SDXL


def test_family_from_single_file_keys():
    assert families.family_from_keys(["cond_stage_model.transformer.text_model.embeddings.x"]) is SD1
    assert families.family_from_keys(["cond_stage_model.model.token_embedding.weight"]) is SD2
    assert families.family_from_keys(["conditioner.embedders.0.transformer.text_model.a",
                                      "conditioner.embedders.1.model.b"]) is SDXL
    assert families.family_from_keys(["model.diffusion_model.out.2.weight"]) is SD1  # a UNet alone
    assert families.family_from_keys(["model.diffusion_model.label_emb.0.0.weight"]) is SDXL
    assert families.family_from_keys(["lora_unet_x.alpha"]) is None
    assert families.prediction_type_from_keys(["v_pred"], SD1) == "v_prediction"
    assert families.prediction_type_from_keys([], SDXL) == "epsilon"
    assert families.prediction_type_from_keys([], SD2) == "v_prediction"


def test_native_resolution_per_family():
    assert Detected(SD1).resolution == 512
    assert Detected(SD2, "v_prediction").resolution == 768
    assert Detected(SD2, "epsilon").resolution == 512  # stable-diffusion-2-base
    assert Detected(SDXL).resolution == 1024
    assert SDXL.components == ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet",
                               "scheduler")


def test_add_time_ids_for_a_bucketed_and_cropped_image():
    # a 1200x800 (w x h) photo in the 1152x768 bucket of a 1024 px run: scaled by 0.96 to
    # 1152x768 exactly, no crop
    assert families.time_ids_for_image((800, 1200), (768, 1152)) == [800, 1200, 0, 0, 768, 1152]
    # a 1000x600 (w x h) image in a 768x1024 (h x w) bucket: scaled by 1.28 to 1280x768,
    # centre crop removes 256 px of width -> left 128
    assert families.cover_crop((600, 1000), (768, 1024)) == ((768, 1280), (0, 128))
    assert families.time_ids_for_image((600, 1000), (768, 1024)) == [600, 1000, 0, 128, 768, 1024]
    # portrait 500x900 (w x h) into 1024x1024: scaled by 2.048 to 1024x1843, crop top 409
    assert families.time_ids_for_image((900, 500), (1024, 1024)) == [900, 500, 409, 0, 1024, 1024]
    assert families.time_ids_for_image((900, 500), (1024, 1024), center=False) == [900, 500, 0, 0, 1024, 1024]
    assert families.add_time_ids((1024, 1024), (0, 0), (1024, 1024)) == [1024, 1024, 0, 0, 1024, 1024]
    with pytest.raises(ValueError):
        families.add_time_ids((1024,), (0, 0), (1024, 1024))


# --------------------------------------------------------------------------- detection I/O


def test_detect_family_of_folders(tiny_sd, tiny_sd2, tiny_sdxl):
    assert detect_family(str(tiny_sd)) == Detected(SD1, "epsilon")
    assert detect_family(str(tiny_sd2)) == Detected(SD2, "v_prediction")
    assert detect_family(str(tiny_sdxl)) == Detected(SDXL, "epsilon")


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_detect_family_of_single_files(suffix, tiny_sd, tiny_sd2, tiny_sdxl, tmp_path):
    for folder, family, prediction in ((tiny_sd, SD1, "epsilon"), (tiny_sd2, SD2, "v_prediction"),
                                       (tiny_sdxl, SDXL, "epsilon")):
        out = export_single_file(folder, tmp_path / f"{family.key}.{suffix}")
        assert detect_family(str(out)) == Detected(family, prediction)
        assert detect_family(str(out), config=str(folder)).prediction_type == prediction


def test_single_file_prediction_type_comes_from_its_config(tiny_sd, tiny_sd2, tmp_path):
    # an SD 2.x "base" model (epsilon) exported to one file: its config folder tells
    base = shutil.copytree(tiny_sd2, tmp_path / "sd2-base")
    sched = base / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(dict(json.loads(sched.read_text()), prediction_type="epsilon")))
    out = export_single_file(base, tmp_path / "base.safetensors")
    assert detect_family(str(out), config=str(base)) == Detected(SD2, "epsilon")


def test_unknown_single_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 1.x/2.x/XL checkpoint"):
        detect_family(str(path))


def test_detect_family_of_a_hub_id_reads_only_its_configs(tiny_sdxl, monkeypatch):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        asked.append(filename)
        return str(tiny_sdxl / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert detect_family("someone/sdxl-finetune") == Detected(SDXL, "epsilon")
    assert asked == ["model_index.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]


# --------------------------------------------------------------------------- loading


def test_sdxl_folder_and_single_file_load_the_sdxl_pipeline(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(str(tiny_sdxl), scheduler="ddim")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    out = export_single_file(tiny_sdxl, tmp_path / "xl.safetensors")
    single = load_pipeline(str(out), config=str(tiny_sdxl))
    assert isinstance(single, StableDiffusionXLPipeline)
    assert single.text_encoder_2.text_projection.weight.equal(pipe.text_encoder_2.text_projection.weight)


def test_sdxl_folder_missing_its_second_encoder_is_named(tiny_sdxl, tmp_path):
    broken = shutil.copytree(tiny_sdxl, tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="'text_encoder_2' folder is missing"):
        load_pipeline(str(broken))


def test_training_loads_both_sdxl_text_encoders_and_names_a_missing_one(tiny_sdxl, tmp_path):
    from transformers import CLIPTextModelWithProjection

    parts = load_sd_components(str(tiny_sdxl))
    assert parts.family is SDXL and isinstance(parts.text_encoder_2, CLIPTextModelWithProjection)
    assert parts.tokenizer_2.pad_token == "!" and len(parts.text_encoders) == 2
    broken = shutil.copytree(tiny_sdxl, tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="'text_encoder_2' folder is missing"):
        load_sd_components(str(broken))


# --------------------------------------------------------------------------- SDXL prompts


def test_sdxl_prompt_encoding_uses_both_encoders_and_the_second_ones_pooled_projection(tiny_sdxl):
    pipe = load_pipeline(str(tiny_sdxl))
    prompts = ["a red car", "a cat"]
    ids = families.tokenize_sdxl([pipe.tokenizer, pipe.tokenizer_2], prompts)
    with torch.no_grad():
        embeds, pooled = families.encode_prompt_sdxl([pipe.text_encoder, pipe.text_encoder_2], ids)
        one = pipe.text_encoder(ids[0], output_hidden_states=True)
        two = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        want_embeds, _, want_pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                            do_classifier_free_guidance=False)
    assert tuple(embeds.shape) == (2, 77, 32 + 64)  # penultimate states of both, side by side
    assert embeds[..., :32].equal(one.hidden_states[-2])
    assert embeds[..., 32:].equal(two.hidden_states[-2])
    assert tuple(pooled.shape) == (2, 32)  # the second encoder's projection, not its 64-wide pool
    assert pooled.equal(two.text_embeds)
    # the same numbers diffusers' SDXL pipeline conditions on
    assert torch.allclose(embeds, want_embeds) and torch.allclose(pooled, want_pooled)
    assert embeds[0, 0, 0].item() == pytest.approx(want_embeds[0, 0, 0].item())


def test_sdxl_prompt_encoding_needs_a_projection_last():
    from transformers import CLIPTextConfig, CLIPTextModel

    plain = CLIPTextModel(CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        families.encode_prompt_sdxl([plain], [torch.zeros(1, 3, dtype=torch.long)])
