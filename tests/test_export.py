"""Single-file export: the original SD layout, read back by diffusers' own single-file loader."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dbtools.after import export
from dbtools.after.export import (
    ExportError,
    export_single_file,
    output_format,
    text_encoder_layout,
    to_original_state_dict,
    unet_key_map,
    vae_key_map,
)
from dbtools.core.atomic import TMP_PREFIX
from dbtools.families.models import ModelLoadError
from dbtools.families.sd import SD1, SD2
from dbtools.families.sdxl import SDXL
from dbtools.tiny import tiny_sd_configs

COMPONENTS = ("unet", "vae", "text_encoder")
ORIGINAL_ROOTS = {
    "sd1": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
    "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
}


def reference_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The folder's weights as diffusers/transformers load them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = dict(unet=UNet2DConditionModel, vae=AutoencoderKL, text_encoder=CLIPTextModel)
    return {name: cls.from_pretrained(folder, subfolder=name).state_dict() for name, cls in classes.items()}


def read_back(path: Path, config: Path, **kwargs):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, **kwargs)


def assert_round_trip(pipe, reference: dict, half: bool = False) -> None:
    for name in COMPONENTS:
        got = getattr(pipe, name).state_dict()
        want = reference[name]
        assert set(got) == set(want), name
        for key, tensor in want.items():
            if half:
                assert got[key].to(torch.float16).equal(tensor.to(torch.float16)), f"{name}.{key}"
            else:
                assert got[key].dtype == tensor.dtype and got[key].equal(tensor), f"{name}.{key}"


def build_deeper_sd(base: Path, out: Path, flavor: str) -> Path:
    """A copy of a tiny model with 3 UNet blocks, 2 layers per block, 2 transformer layers,
    attention in the first and last blocks, a 3-block VAE with 2 layers and a 3-layer text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    shutil.copytree(base, out)
    cfg = tiny_sd_configs(flavor)
    unet = dict(cfg["unet"], layers_per_block=2, block_out_channels=(32, 32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                transformer_layers_per_block=2,
                attention_head_dim=(2, 2, 4) if flavor == "sd2" else 8)
    vae = dict(cfg["vae"], layers_per_block=2, block_out_channels=(32, 64, 64),
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    old_text = CLIPTextConfig.from_pretrained(base / "text_encoder")
    text = dict(cfg["text"], num_hidden_layers=3, vocab_size=old_text.vocab_size,
                bos_token_id=old_text.bos_token_id, eos_token_id=old_text.eos_token_id,
                pad_token_id=old_text.pad_token_id)
    torch.manual_seed(1)
    for name, model in (("unet", UNet2DConditionModel(**unet)), ("vae", AutoencoderKL(**vae)),
                        ("text_encoder", CLIPTextModel(CLIPTextConfig(**text)))):
        shutil.rmtree(out / name)
        model.save_pretrained(out / name, safe_serialization=True)
    return out


def keys_in(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("flavor", ["sd1", "sd2"])
def test_round_trip_through_from_single_file(flavor, tiny_sd, tiny_sd2, tmp_path):
    folder = tiny_sd if flavor == "sd1" else tiny_sd2
    out = export_single_file(folder, tmp_path / "model.safetensors")
    assert out == tmp_path / "model.safetensors"
    keys = keys_in(out)
    assert all(k.startswith(ORIGINAL_ROOTS[flavor]) for k in keys), keys[:5]
    assert not any(".model.diffusion_model." in k or "first_stage_model.first_stage" in k for k in keys)
    assert_round_trip(read_back(out, folder), reference_weights(folder))


@pytest.mark.parametrize("flavor", ["sd1", "sd2"])
def test_block_counts_come_from_the_configs(flavor, tiny_sd, tiny_sd2, tmp_path):
    base = tiny_sd if flavor == "sd1" else tiny_sd2
    folder = build_deeper_sd(base, tmp_path / "deep", flavor)
    out = export_single_file(folder, tmp_path / "deep.safetensors")
    keys = set(keys_in(out))
    # 3 down blocks x (2 layers + downsampler); the last one has attention and no downsampler
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight" in keys
    assert not any(k.startswith("model.diffusion_model.input_blocks.9.") for k in keys)
    # up block 0 has attention, so its upsampler is the third module of output block 2
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys
    assert "model.diffusion_model.output_blocks.5.1.conv.weight" in keys
    assert "first_stage_model.decoder.up.0.block.2.conv1.weight" in keys
    assert_round_trip(read_back(out, folder), reference_weights(folder))


def test_ckpt_is_a_safe_state_dict_pickle_and_round_trips(tiny_sd, tmp_path):
    out = export_single_file(tiny_sd, tmp_path / "model.ckpt")
    data = torch.load(out, map_location="cpu", weights_only=True)
    assert set(data) == {"state_dict"}
    reference = export_single_file(tiny_sd, tmp_path / "model.safetensors")
    flat = load_file(str(reference))
    assert set(data["state_dict"]) == set(flat)
    assert all(data["state_dict"][k].equal(flat[k]) for k in flat)
    assert_round_trip(read_back(out, tiny_sd), reference_weights(tiny_sd))


@pytest.mark.parametrize("flavor", ["sd1", "sd2"])
def test_half_writes_fp16_and_keeps_integer_buffers(flavor, tiny_sd, tiny_sd2, tmp_path):
    folder = tiny_sd if flavor == "sd1" else tiny_sd2
    out = export_single_file(folder, tmp_path / "half.safetensors", half=True)
    tensors = load_file(str(out))
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.float16 for v in floats.values())
    if flavor == "sd1":
        assert tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    full = export_single_file(folder, tmp_path / "full.safetensors")
    assert out.stat().st_size < 0.6 * full.stat().st_size
    assert_round_trip(read_back(out, folder), reference_weights(folder), half=True)


def test_sd1_clip_and_sd2_openclip_layouts(tiny_sd, tiny_sd2, tmp_path):
    sd1 = load_file(str(export_single_file(tiny_sd, tmp_path / "a.safetensors")))
    sd2 = load_file(str(export_single_file(tiny_sd2, tmp_path / "b.safetensors")))
    # the keys diffusers (and AUTOMATIC1111/ComfyUI) use to tell the text encoders apart
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in sd1
    assert not any(k.startswith("cond_stage_model.model.") for k in sd1)
    assert "cond_stage_model.model.token_embedding.weight" in sd2
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)
    # OpenCLIP stacks q, k, v of each layer in that order
    te = load_file(str(tiny_sd2 / "text_encoder" / "model.safetensors"))
    stacked = sd2["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    parts = [te[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert stacked.equal(torch.cat(parts))
    # SD 1.x keeps proj_in as a 1x1 conv, SD 2.x (use_linear_projection) as a linear layer
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2
    # the VAE attention is stored as 1x1 convolutions in the original layout
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_folders_from_older_libraries_and_bin_weights(tiny_sd, tmp_path):
    """`text_model.` prefix + position_ids (old transformers), VAE `query/key/value/proj_attn`
    (old diffusers), and `.bin` pickles instead of safetensors."""
    folder = tmp_path / "old"
    shutil.copytree(tiny_sd, folder)
    te = load_file(str(folder / "text_encoder" / "model.safetensors"))
    te = {f"text_model.{k}": v for k, v in te.items()}
    te["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(te, folder / "text_encoder" / "pytorch_model.bin")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae = {}
    for key, tensor in load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")).items():
        for new, old in legacy.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        vae[key] = tensor
    assert any(".proj_attn." in k for k in vae)
    save_file(vae, str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    out = export_single_file(folder, tmp_path / "old.safetensors")
    assert_round_trip(read_back(out, tiny_sd), reference_weights(tiny_sd))


# --------------------------------------------------------------------------- refusals


def test_refuses_what_is_not_a_diffusers_sd_folder(tiny_sd, tmp_path):
    out = tmp_path / "out.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="not a diffusers model folder") as err:
        export_single_file(empty, out)
    assert str(empty) in str(err.value)
    with pytest.raises(ExportError, match="does not exist"):
        export_single_file(tmp_path / "missing", out)
    single = export_single_file(tiny_sd, tmp_path / "single.safetensors")
    with pytest.raises(ExportError, match="is a file"):
        export_single_file(single, out)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ExportError, match="'vae' folder is missing"):
        export_single_file(partial, out)
    assert not out.exists()


def test_refuses_weights_the_config_does_not_describe(tiny_sd, tmp_path):
    folder = tmp_path / "lora"
    shutil.copytree(tiny_sd, folder)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(str(path))
    unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(4, 32)
    save_file(unet, str(path))
    with pytest.raises(ExportError, match="LoRA"):
        export_single_file(folder, tmp_path / "x.safetensors")
    del unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    del unet["conv_in.weight"]
    save_file(unet, str(path))
    with pytest.raises(ExportError, match="1 weights missing"):
        export_single_file(folder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_refuses_a_pickle_that_would_run_code(tiny_sd, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_sd, folder)
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save({"weights": Path("x")}, folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refused"):
        export_single_file(folder, tmp_path / "x.safetensors")


def test_output_format_rules():
    assert output_format("m.safetensors") == "safetensors"
    assert output_format("m.ckpt") == "ckpt"
    assert output_format("m.CKPT") == "ckpt"
    assert output_format("model") == "safetensors"
    assert output_format("m.safetensors", True) == "safetensors"
    assert output_format("m.ckpt", False) == "ckpt"
    with pytest.raises(ExportError, match="m.safetensors"):
        output_format("m.ckpt", True)
    with pytest.raises(ExportError, match=r"\.ckpt"):
        output_format("m.safetensors", False)


# --------------------------------------------------------------------------- atomic writes


def test_existing_output_is_replaced_only_when_complete(tiny_sd, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"previous export")
    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_single_file(tiny_sd, out)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    monkeypatch.undo()
    export_single_file(tiny_sd, out)
    assert len(keys_in(out)) > 100
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- pure mapping


def test_text_encoder_layout_from_config():
    assert text_encoder_layout({"hidden_act": "quick_gelu", "hidden_size": 768}) == "clip"
    assert text_encoder_layout({"hidden_act": "gelu", "hidden_size": 1024}) == "openclip"
    assert text_encoder_layout({"hidden_act": "gelu", "hidden_size": 32}) == "openclip"
    assert text_encoder_layout({"hidden_size": 768}) == "clip"  # CLIPTextConfig's default act
    assert text_encoder_layout({"hidden_act": "relu", "hidden_size": 1024}) == "openclip"


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=2)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, projection_dim=512)


def meta_state_dicts(unet: dict, vae: dict, text: dict) -> dict:
    """Full-size SD models on the meta device: real names and shapes, no memory."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        return dict(unet=UNet2DConditionModel.from_config(unet).state_dict(),
                    vae=AutoencoderKL.from_config(vae).state_dict(),
                    text_encoder=CLIPTextModel(CLIPTextConfig(**text)).state_dict())


def test_real_sd15_names_and_shapes_without_weights():
    sds = meta_state_dicts(SD15_UNET, SD_VAE, SD15_TEXT)
    out = to_original_state_dict(sds, dict(unet=SD15_UNET, vae=SD_VAE, text_encoder=SD15_TEXT), SD1)
    count = lambda prefix: sum(k.startswith(prefix) for k in out)  # noqa: E731
    # the tensor counts of the original v1-5 checkpoint (without EMA and schedule buffers)
    assert (count("model.diffusion_model."), count("first_stage_model."), count("cond_stage_model.")) \
        == (686, 248, 197)
    shapes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    }
    assert {k: tuple(out[k].shape) for k in shapes} == shapes


def test_real_sd21_names_and_shapes_without_weights():
    sds = meta_state_dicts(SD21_UNET, SD_VAE, SD21_TEXT)
    out = to_original_state_dict(sds, dict(unet=SD21_UNET, vae=SD_VAE, text_encoder=SD21_TEXT), SD2)
    shapes = {
        # diffusers' single-file loader recognises SD 2.x by this key's 1024 width
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias": (3072,),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    }
    assert {k: tuple(out[k].shape) for k in shapes} == shapes
    # the original has OpenCLIP's 24th block, text_projection and logit_scale; readers that
    # check for them (e.g. "clip missing: layers.23") find them
    assert sum(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in out) == 24 * 12
    assert tuple(out["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(out["cond_stage_model.model.text_projection"].shape) == (1024, 1024)
    assert tuple(out["cond_stage_model.model.logit_scale"].shape) == ()
    # the tensor counts of the original v2-1 checkpoint (without EMA and schedule buffers)
    count = lambda prefix: sum(k.startswith(prefix) for k in out)  # noqa: E731
    assert (count("model.diffusion_model."), count("first_stage_model."), count("cond_stage_model.")) \
        == (686, 248, 294)


def test_sd2_last_block_is_an_identity_so_the_last_layer_equals_the_penultimate(tiny_sd2, tmp_path):
    sd = load_file(str(export_single_file(tiny_sd2, tmp_path / "m.safetensors")))
    last = "cond_stage_model.model.transformer.resblocks.2."  # the tiny SD 2.x encoder has 2 layers
    for leaf in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
        assert not sd[last + leaf].any(), leaf
    assert sd[last + "ln_1.weight"].equal(torch.ones(32))
    assert sd["cond_stage_model.model.text_projection"].equal(torch.eye(32))
    assert sd["cond_stage_model.model.logit_scale"].item() == pytest.approx(4.6052, abs=1e-4)


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_TEXT = dict(SD15_TEXT, projection_dim=768)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, projection_dim=1280)


def test_real_sdxl_names_and_shapes_without_weights():
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sds = meta_state_dicts(SDXL_UNET, SD_VAE, SDXL_TEXT)
    with init_empty_weights():
        sds["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)).state_dict()
    configs = dict(unet=SDXL_UNET, vae=SD_VAE, text_encoder=SDXL_TEXT, text_encoder_2=SDXL_TEXT_2)
    out = to_original_state_dict(sds, configs, SDXL)
    count = lambda prefix: sum(k.startswith(prefix) for k in out)  # noqa: E731
    # the tensor counts of the original sd_xl_base_1.0 checkpoint (2515 in all)
    assert (count("model.diffusion_model."), count("first_stage_model."), count("conditioner.embedders.0."),
            count("conditioner.embedders.1.")) == (1680, 248, 197, 390)
    assert len(out) == 2515
    shapes = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    }
    assert {k: tuple(out[k].shape) for k in shapes} == shapes


def test_sdxl_round_trip_through_from_single_file(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = export_single_file(tiny_sdxl, tmp_path / "xl.safetensors")
    keys = keys_in(out)
    roots = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
             "conditioner.embedders.1.model.")
    assert all(k.startswith(roots) for k in keys)
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    want = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    got = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(want, name).state_dict(), getattr(got, name).state_dict()
        assert set(a) == set(b), name
        for key, tensor in a.items():
            assert b[key].dtype == tensor.dtype and b[key].equal(tensor), f"{name}.{key}"


def test_sdxl_text_projection_is_stored_transposed(tiny_sdxl, tmp_path):
    sd = load_file(str(export_single_file(tiny_sdxl, tmp_path / "xl.safetensors")))
    te2 = load_file(str(tiny_sdxl / "text_encoder_2" / "model.safetensors"))
    linear = te2["text_projection.weight"]  # [projection 32, width 64]
    assert tuple(linear.shape) == (32, 64)
    assert sd["conditioner.embedders.1.model.text_projection"].equal(linear.T)
    # SDXL's OpenCLIP encoder is complete in diffusers: no block is added
    assert not any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.2.") for k in sd)
    assert export.run_export(export.ExportConfig(tiny_sdxl, tmp_path / "h.safetensors", half=True)).layout == "sdxl"


def test_key_maps_are_one_to_one():
    for key_map in (unet_key_map(SD15_UNET), vae_key_map(SD_VAE), unet_key_map(tiny_sd_configs("sd1")["unet"])):
        assert len(set(key_map.values())) == len(key_map)


def test_unsupported_unets_are_refused_by_name():
    with pytest.raises(ExportError, match="SimpleCrossAttnDownBlock2D"):
        unet_key_map(dict(SD15_UNET, down_block_types=["SimpleCrossAttnDownBlock2D"] * 4), keys=[])
    with pytest.raises(ExportError, match="layers_per_block"):
        unet_key_map(dict(SD15_UNET, layers_per_block=[1, 2, 2, 2]), keys=[])
    with pytest.raises(ExportError, match="add_embedding"):
        unet_key_map(SD15_UNET, keys=["add_embedding.linear_1.weight"])


# --------------------------------------------------------------------------- command line


def test_command_line(tiny_sd2, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert export.main(["--model_path", str(tiny_sd2), "--checkpoint_path", str(out), "--half"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "float16" in printed and "layout sd2" in printed
    from dbtools.cli import main

    assert main(["export", "--model_path", str(tiny_sd2), "--checkpoint_path", str(tmp_path / "m.ckpt"),
                 "--use_safetensors"]) == 2
    assert "m.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "m.ckpt").exists()
    assert main(["export", "--model_path", str(tmp_path / "nope"), "--checkpoint_path", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_dispatch_knows_export(tiny_sd, tmp_path):
    from dbtools.cli import main

    out = tmp_path / "model.ckpt"
    assert main(["export", "--model_path", str(tiny_sd), "--checkpoint_path", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)) == {"state_dict"}
    assert os.path.getsize(out) > 0


# --------------------------------------------------------------------------- hostile and careless paths


def test_refuses_an_output_inside_the_model_it_reads(tiny_sd, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_sd, model)
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.read_bytes()
    index = (model / "model_index.json").read_bytes()
    for inside in (unet, model / "unet" / "x.safetensors", model / "new" / "x.ckpt",
                   model / "model_index.json"):
        with pytest.raises(ExportError, match="inside --model_path"):
            export_single_file(model, inside)
    assert unet.read_bytes() == before and (model / "model_index.json").read_bytes() == index
    assert sorted(p.name for p in (model / "unet").iterdir()) == ["config.json", unet.name]
    # A single file beside the sub-folders is training's own layout (<step>/model.safetensors).
    assert export_single_file(model, model / "model.safetensors").is_file()


def test_unwritable_folder_is_named_not_the_temp_file(tiny_sd, tmp_path, monkeypatch):
    from dbtools.core import atomic

    def denied(path, keep_suffix=True):
        raise PermissionError(13, "Permission denied", f"{os.path.dirname(path)}/{TMP_PREFIX}1-0.safetensors")

    monkeypatch.setattr(atomic, "_create_temp", denied)
    with pytest.raises(ExportError) as info:
        export_single_file(tiny_sd, tmp_path / "ro" / "m.safetensors")
    message = str(info.value)
    assert "permission denied" in message and str(tmp_path / "ro") in message and TMP_PREFIX not in message


@pytest.mark.parametrize("name", ["m.ckpt", "m.safetensors"])
def test_full_disk_is_one_message_with_the_space_needed(tiny_sd, tmp_path, monkeypatch, name):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match="not enough disk space") as info:
        export_single_file(tiny_sd, tmp_path / name)
    assert str(tmp_path) in str(info.value) and "GB" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_ckpt_write_failing_midway_is_a_clear_message(tiny_sd, tmp_path, monkeypatch):
    def full(obj, f):  # what torch's zip writer raises when the disk fills mid-file
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ExportError, match="not enough disk space"):
        export_single_file(tiny_sd, tmp_path / "m.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_exported_file_gets_the_umask_mode(tiny_sd, tmp_path):
    old = os.umask(0o022)
    try:
        out = export_single_file(tiny_sd, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
