"""Kohya-style LoRA files (AUTOMATIC1111/ComfyUI) from diffusers LoRAs, on the tiny SDXL model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dbtools.after.kohya import LoraConvertError, to_kohya, write_kohya_lora

TEXT_PREFIXES = {"sd1": {"lora_te_"}, "sd2": {"lora_te_"}, "sdxl": {"lora_te1_", "lora_te2_"}}


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def make_lora(model, family: str, out):
    """A diffusers LoRA folder for a tiny model (rank 4 UNet, rank 2 text encoders), written as
    training writes it, with non-zero up weights so that it changes the output."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline_class(family).from_pretrained(model)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    te = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for encoder in encoders:
        inject_adapter_in_model(te, encoder)
    torch.manual_seed(0)
    with torch.no_grad():
        for model_ in [pipe.unet, *encoders]:
            for name, p in model_.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)

    def layers(model_):
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model_))

    kw = dict(unet_lora_layers=layers(pipe.unet), text_encoder_lora_layers=layers(pipe.text_encoder))
    if family == "sdxl":
        kw["text_encoder_2_lora_layers"] = layers(pipe.text_encoder_2)
    pipe.save_lora_weights(out, **kw)
    return out


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, tmp_path_factory):
    return make_lora(tiny_sdxl, "sdxl", tmp_path_factory.mktemp("lora"))


def test_kohya_key_naming_and_alphas(sdxl_lora, tmp_path):
    out = write_kohya_lora(sdxl_lora, tmp_path / "style.safetensors", alpha={"unet": 8, "text_encoder": 1})
    sd = load_file(str(out))
    unet = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    te2 = "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"
    for module, rank, alpha in ((unet, 4, 8.0), (te1, 2, 1.0), (te2, 2, 2.0)):  # te2: alpha = rank
        assert sd[module + ".lora_down.weight"].shape[0] == rank
        assert sd[module + ".lora_up.weight"].shape[1] == rank
        assert sd[module + ".alpha"].item() == alpha
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in sd)
    assert all(k.endswith((".alpha", ".lora_down.weight", ".lora_up.weight")) for k in sd)
    modules = {k.rsplit(".", 2)[0] if not k.endswith(".alpha") else k[:-6] for k in sd}
    # every module has its three tensors: 2 down blocks x transformer layers x 2 attentions x 4
    # projections in the UNet (plus mid and up blocks), 2 layers x 4 in each text encoder
    assert len(sd) == 3 * len(modules)
    assert sum(m.startswith("lora_te1_") for m in modules) == sum(m.startswith("lora_te2_") for m in modules) == 8


def test_kohya_file_gives_the_same_images_as_the_diffusers_lora(sdxl_lora, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    kohya = write_kohya_lora(sdxl_lora, tmp_path / "k.safetensors")  # alpha = rank: scale 1, as diffusers

    def latents(lora):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        if lora:
            pipe.load_lora_weights(lora)
        return pipe("a red car", num_inference_steps=1, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    base, diffusers_lora, kohya_lora = latents(None), latents(sdxl_lora), latents(kohya)
    assert not torch.allclose(base, diffusers_lora)  # the LoRA does something
    assert torch.allclose(kohya_lora, diffusers_lora, atol=1e-5)


def test_weights_are_kept_and_half_halves(sdxl_lora, tmp_path):
    from dbtools.after.kohya import read_lora

    src = read_lora(sdxl_lora)
    key = next(k for k in src if k.startswith("unet.") and k.endswith("lora.up.weight"))
    sd = to_kohya(src)
    module = "lora_unet_" + key[len("unet."):-len(".lora.up.weight")].replace(".", "_")
    assert sd[module + ".lora_up.weight"].equal(src[key])
    half = load_file(str(write_kohya_lora(src, tmp_path / "h.safetensors", half=True)))
    assert half[module + ".lora_up.weight"].dtype == torch.float16


def test_user_errors(tmp_path):
    with pytest.raises(LoraConvertError, match="not found"):
        write_kohya_lora(tmp_path / "missing", tmp_path / "x.safetensors")
    with pytest.raises(LoraConvertError, match="name the LoRA file .safetensors"):
        write_kohya_lora({}, tmp_path / "x.ckpt")
    with pytest.raises(LoraConvertError, match="belongs to no denoiser or text encoder"):
        to_kohya({"prior.x.lora_A.weight": torch.zeros(2, 2)})


def test_a_flux_transformer_lora_gets_the_lora_transformer_prefix_comfyui_maps():
    """ComfyUI maps `lora_transformer_<diffusers module, dots as underscores>` onto Flux's
    weights (its key map for diffusers-layout Flux LoRAs, the layout OneTrainer writes)."""
    src = {"transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": torch.ones(2, 8),
           "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": torch.ones(8, 2)}
    sd = to_kohya(src, alpha=2.0, family="flux1")
    module = "lora_transformer_single_transformer_blocks_0_attn_to_k"
    assert set(sd) == {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"}
    assert sd[f"{module}.alpha"].item() == 2.0


def test_export_command_turns_a_lora_folder_into_a_kohya_file(sdxl_lora, tmp_path, capsys):
    from dbtools.after import export

    out = tmp_path / "style.safetensors"
    assert export.main(["--model_path", str(sdxl_lora), "--checkpoint_path", str(out)]) == 0
    assert "kohya-style LoRA" in capsys.readouterr().out
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in load_file(str(out)))
    from dbtools.cli import main as cli_main

    assert cli_main(["export", "--model_path", str(sdxl_lora), "--checkpoint_path", str(tmp_path / "s.ckpt")]) == 2
    assert "Name it s.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "s.ckpt").exists()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_key_reaches_a_module_and_the_metadata_names_the_base_model(family, request, tmp_path):
    """The web UIs' rules (tests/ui_loaders.py): each tensor patches a module of this family's
    UNet or text encoders with a fitting shape, and the Lora tab lists the file for this family."""
    from ui_loaders import UI_VERSION, a1111_version, forge_version, module_map, unmatched

    from dbtools.after.kohya import kohya_metadata, read_metadata

    model = request.getfixturevalue({"sd1": "tiny_sd", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}[family])
    lora = make_lora(model, family, tmp_path / "lora")
    meta = kohya_metadata(family, 4, 4, "style-500-lora", resolution=512, steps=500, training_comment="test run",
                          v_prediction=family == "sd2")
    out = write_kohya_lora(lora, tmp_path / "style-500-lora.safetensors", alpha={"unet": 4, "text_encoder": 2,
                                                                                   "text_encoder_2": 2},
                           metadata=meta)
    sd = load_file(str(out))
    pipe = pipeline_class(family).from_pretrained(model)
    modules = module_map(pipe, family)
    assert unmatched(sd, modules) == []
    patched = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_up.weight")}
    assert {m.split("text_model")[0] for m in patched if "_te" in m} == set(TEXT_PREFIXES[family])
    assert all(m + ".alpha" in sd and m + ".lora_down.weight" in sd for m in patched)
    header = read_metadata(out)
    assert a1111_version(header) == forge_version(header) == UI_VERSION[family]
    assert header["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]
    assert (header["ss_network_module"], header["ss_network_dim"], header["ss_network_alpha"]) == \
        ("networks.lora", "4", "4.0")
    assert (header["ss_output_name"], header["ss_resolution"], header["ss_steps"], header["ss_training_comment"]) == \
        ("style-500-lora", "(512, 512)", "500", "test run")
    # diffusers reads the file too, to the same images as its own LoRA file
    images = []
    for source in (lora, out):
        pipe = pipeline_class(family).from_pretrained(model)
        pipe.load_lora_weights(str(source))
        images.append(pipe("a red car", num_inference_steps=1, output_type="latent",
                           generator=torch.Generator().manual_seed(0)).images)
    assert torch.allclose(images[0], images[1], atol=1e-5)
