"""Flux.1 files for other programs: the LoRA file ComfyUI and Forge load, and the transformer in
Black Forest Labs' single-file layout; on the tiny Flux model, and at Flux.1's width where
diffusers' readers assume it."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from ui_loaders import comfy_apply, flux_module_map, flux_original_map, forge_version, unmatched

from dbtools.after.kohya import kohya_metadata, lora_alphas, read_metadata, write_kohya_lora
from dbtools.families import flux_files
from dbtools.families.flux_files import FluxFileError, lora_to_ui, transformer_to_original

DOUBLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                  "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                  "norm1.linear", "norm1_context.linear", "norm_out.linear", "x_embedder", "context_embedder"]
ALL_TARGETS = DOUBLE_TARGETS + ["proj_mlp", "proj_out", "norm.linear"]  # + the single blocks' q, k, v (attn.to_q)


def flux_pipe(model):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(model)


def make_flux_lora(model, out, targets, rank=4, alpha=8, text_encoder=False, exclude=None):
    """A diffusers Flux LoRA folder as `FluxPipeline.save_lora_weights` writes it (with the
    adapter settings in the file's metadata), non-zero everywhere so that it changes the model."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = flux_pipe(model)
    if exclude:  # the modules the targets name, but not those matching `exclude`
        targets = [name for name, _ in pipe.transformer.named_modules()
                   if any(name == t or name.endswith("." + t) for t in targets) and not re.match(exclude, name)]
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    models = [pipe.transformer]
    text_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "fc1"])
    if text_encoder:
        inject_adapter_in_model(text_config, pipe.text_encoder)
        models.append(pipe.text_encoder)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in models:
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.3)
    kw = {"transformer_lora_layers": get_peft_model_state_dict(pipe.transformer),
          "transformer_lora_adapter_metadata": pipe.transformer.peft_config["default"].to_dict()}
    if text_encoder:
        kw["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
        kw["text_encoder_lora_adapter_metadata"] = text_config.to_dict()
    pipe.save_lora_weights(out, **kw)
    return out


def fused_transformer(model, lora):
    """The tiny transformer's weights with `lora` (a diffusers or UI LoRA file) fused, as diffusers does it."""
    pipe = flux_pipe(model)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict(), pipe.text_encoder.state_dict()


def test_transformer_in_original_layout_is_where_comfyui_looks(tiny_flux):
    """Every weight lands where ComfyUI's Flux map says (fused q/k/v rows, the 4x MLP rows of
    linear1, the swapped final modulation), and the file has nothing else."""
    sd = flux_pipe(tiny_flux).transformer.state_dict()
    original = transformer_to_original(sd)
    where = flux_original_map(hidden=16, double=1, single=1)
    assert set(where) == set(sd)
    assert {target for target, *_ in where.values()} == set(original)
    for key, (target, first, rows, swapped) in where.items():
        value = original[target]
        if swapped:
            value = torch.cat(value.chunk(2)[::-1])
        if rows is not None:
            value = value[first:first + rows]
        assert value.equal(sd[key]), key


def test_transformer_reads_back_exactly_through_diffusers_at_flux_width(tmp_path):
    """`FluxTransformer2DModel.from_single_file` reads the file back to the same tensors. Its
    reader assumes Flux.1's width (3072, 24 heads of 128), so this model has that width with one
    double and one single block (0.53 B parameters, bf16)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=generator)
    model.save_config(tmp_path / "flux" / "transformer")
    sd = model.state_dict()
    out = tmp_path / "flux1-test.safetensors"
    save_file({k: v.contiguous() for k, v in transformer_to_original(sd).items()}, str(out), {"format": "pt"})
    del model
    back = FluxTransformer2DModel.from_single_file(str(out), config=str(tmp_path / "flux"), subfolder="transformer",
                                                   torch_dtype=torch.bfloat16).state_dict()
    assert set(back) == set(sd)
    assert [k for k in sd if not torch.equal(back[k], sd[k])] == []


def test_ui_lora_every_key_reaches_a_module_and_forge_lists_it_as_flux(tiny_flux, tmp_path):
    lora = make_flux_lora(tiny_flux, tmp_path / "lora", ALL_TARGETS, text_encoder=True)
    meta = kohya_metadata("flux1", 4, 8, "style-500-lora", steps=500, resolution=1024)
    out = write_kohya_lora(lora, tmp_path / "style-500-lora.safetensors", metadata=meta)
    ui = load_file(str(out))
    pipe = flux_pipe(tiny_flux)
    modules = flux_module_map(transformer_to_original(pipe.transformer.state_dict()), pipe.text_encoder)
    assert unmatched(ui, modules) == []
    patched = {k.rsplit(".", 2)[0] for k in ui if k.endswith(".lora_up.weight")}
    assert all(m + ".alpha" in ui and m + ".lora_down.weight" in ui for m in patched)
    assert len(ui) == 3 * len(patched)
    assert {m.split("_text_model")[0] for m in patched if m.startswith("lora_te")} == {"lora_te1"}
    # one fused module per q/k/v triple: 1 double block x 2 + linear1 of 1 single block
    assert sorted(m for m in patched if m.endswith(("_qkv", "_linear1"))) == [
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_single_blocks_0_linear1"]
    header = read_metadata(out)
    assert forge_version(header) == "Flux"
    assert (header["ss_base_model_version"], header["modelspec.architecture"], header["ss_network_dim"],
            header["ss_network_alpha"], header["ss_steps"], header["ss_network_module"]) == \
        ("flux1", "flux-1-dev/lora", "4", "8.0", "500", "networks.lora_flux")
    assert "modelspec.prediction_type" not in header
    assert ui["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 24.0  # 3 x 8 over rank 3 x 4


def test_ui_lora_patched_like_comfyui_gives_the_weights_diffusers_fuses(tiny_flux, tmp_path):
    """ComfyUI's and Forge's patch (alpha / rank * up @ down on each original weight) of the UI
    file gives the original-layout weights of the transformer diffusers fused the LoRA into,
    with alpha != rank taken from the LoRA file's settings."""
    lora = make_flux_lora(tiny_flux, tmp_path / "lora", ALL_TARGETS, rank=4, alpha=8)
    assert lora_alphas(lora) == {"transformer": 8.0}
    ui = lora_to_ui(load_file(str(lora / "pytorch_lora_weights.safetensors")), lora_alphas(lora))
    base = transformer_to_original(flux_pipe(tiny_flux).transformer.state_dict())
    fused = transformer_to_original(fused_transformer(tiny_flux, lora)[0])
    patched = comfy_apply(base, ui)
    changed = [k for k in base if not torch.allclose(base[k], fused[k])]
    assert "single_blocks.0.linear1.weight" in changed and "double_blocks.0.img_attn.qkv.weight" in changed
    assert len(changed) == len({k.rsplit(".", 2)[0] for k in ui})  # every LoRA module changes its weight
    assert [k for k in base if not torch.allclose(patched[k], fused[k], atol=1e-5)] == []


def test_diffusers_reads_the_ui_file_to_the_same_fused_weights(tiny_flux, tmp_path):
    """`FluxPipeline.load_lora_weights` of the UI file fuses to the same transformer weights as the
    diffusers file. Its kohya reader assumes Flux.1's widths for the single blocks' linear1, so
    the tiny LoRA leaves the single blocks' q/k/v and MLP input out here (the next test reads
    those at Flux.1's width). It also names the LoRAs of modules outside the blocks (img_in, txt_in,
    final_layer) without the `transformer.` prefix, so it drops them: those are left out too."""
    lora = make_flux_lora(tiny_flux, tmp_path / "lora", ALL_TARGETS,
                          exclude=r"single_transformer_blocks\.\d+\.(attn\.|proj_mlp)|(?!(single_)?transformer_blocks\.)")
    ui = write_kohya_lora(lora, tmp_path / "ui.safetensors", family="flux1")
    want, got = fused_transformer(tiny_flux, lora)[0], fused_transformer(tiny_flux, ui)[0]
    base = flux_pipe(tiny_flux).transformer.state_dict()
    modules = len(load_file(str(lora / "pytorch_lora_weights.safetensors"))) // 2
    # 14 modules in the double block, linear2 and the modulation in the single one
    assert sum(not torch.equal(base[k], want[k]) for k in base) == modules == 16
    assert [k for k in want if not torch.allclose(want[k], got[k], atol=1e-5)] == []


def test_diffusers_reads_fused_linear1_at_flux_width(tmp_path):
    """At Flux.1's width diffusers splits the fused modules back into the same weight changes,
    q/k/v/MLP of the single blocks included (LoRA tensors only: no model needed)."""
    from diffusers import FluxPipeline

    hidden, rank, g = 3072, 4, torch.Generator().manual_seed(0)
    shapes = {f"single_transformer_blocks.0.{m}": (hidden * (4 if m == "proj_mlp" else 1), hidden)
              for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
    shapes.update({f"transformer_blocks.0.attn.{m}": (hidden, hidden) for m in ("to_q", "to_k", "to_v", "add_k_proj")})
    lora = {}
    for module, (rows, cols) in shapes.items():
        lora[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=g)
        lora[f"transformer.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    ui = write_kohya_lora(lora, tmp_path / "ui.safetensors", alpha=2.0)  # told Flux by its transformer keys
    back = FluxPipeline.lora_state_dict(str(ui))
    back = back[0] if isinstance(back, tuple) else back
    for module in shapes:
        want = 0.5 * lora[f"transformer.{module}.lora_B.weight"] @ lora[f"transformer.{module}.lora_A.weight"]
        got = back[f"transformer.{module}.lora_B.weight"] @ back[f"transformer.{module}.lora_A.weight"]
        assert torch.allclose(got, want, atol=1e-4), module
    # the parts of txt_attn.qkv that were not trained come back as no change
    for module in ("add_q_proj", "add_v_proj"):
        key = f"transformer.transformer_blocks.0.attn.{module}"
        assert not (back[key + ".lora_B.weight"] @ back[key + ".lora_A.weight"]).any()


def test_diffusers_named_lora_tensors_give_the_same_ui_file(tiny_flux, tmp_path):
    """Training saves the LoRA with diffusers' `lora.down`/`lora.up` names; the UI file is the same."""
    from diffusers.utils import convert_state_dict_to_diffusers

    from dbtools.after.kohya import to_kohya

    folder = make_flux_lora(tiny_flux, tmp_path / "lora", ALL_TARGETS)
    lora = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    renamed = convert_state_dict_to_diffusers(lora)
    assert any(".lora.down." in k for k in renamed)
    want, got = to_kohya(lora, 8.0, "flux1"), to_kohya(renamed, 8.0, "flux1")
    assert set(want) == set(got) and all(want[k].equal(got[k]) for k in want)


def test_parts_with_different_scales_fold_into_the_up_weights():
    g = torch.Generator().manual_seed(0)
    pieces = {0: (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 1.0),
              2: (torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g), 0.25)}
    down, up, scale = flux_files.stack_parts(pieces, 3)
    assert (down.shape, up.shape, scale) == ((6, 8), (24, 6), 1.0)
    delta = scale * up @ down
    assert torch.allclose(delta[:8], pieces[0][1] @ pieces[0][0])
    assert not delta[8:16].any()
    assert torch.allclose(delta[16:], 0.25 * pieces[2][1] @ pieces[2][0])


def test_what_cannot_go_into_the_ui_file_is_one_clear_error():
    with pytest.raises(FluxFileError, match="DoRA"):
        lora_to_ui({"transformer.proj_out.lora_magnitude_vector": torch.ones(4)})
    with pytest.raises(FluxFileError, match="no lora_B"):
        lora_to_ui({"transformer.proj_out.lora_A.weight": torch.ones(2, 4)})
    with pytest.raises(FluxFileError, match="not a module of a Flux.1 transformer"):
        lora_to_ui({f"transformer.pos_embed.lora_{p}.weight": torch.ones(2, 2) for p in "AB"})


@pytest.fixture(scope="module")
def flux_lora_step(tiny_flux, tmp_path_factory):
    """A Flux LoRA run's step folder: the diffusers LoRA and args.json naming the base model."""
    import json

    folder = make_flux_lora(tiny_flux, tmp_path_factory.mktemp("run") / "500", ALL_TARGETS, text_encoder=True)
    (folder / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_flux),
                                                  "resolution": 1024, "learning_rate": 1e-4, "guidance_scale": 1.0,
                                                  "weighting_scheme": "none"}), encoding="utf-8")
    return folder


def test_export_command_writes_the_ui_lora_of_a_flux_lora_step(flux_lora_step, tmp_path, capsys):
    from dbtools.cli import main

    out = tmp_path / "style.safetensors"
    assert main(["export", "--model_path", str(flux_lora_step), "--checkpoint_path", str(out)]) == 0
    assert "models/loras (ComfyUI)" in capsys.readouterr().out
    ui, header = load_file(str(out)), read_metadata(out)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in ui
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in ui)
    assert forge_version(header) == "Flux"
    assert (header["ss_base_model_version"], header["ss_network_alpha"], header["ss_output_name"],
            header["ss_steps"], header["ss_resolution"], header["ss_guidance_scale"]) == \
        ("flux1", "8.0", "style", "500", "(1024, 1024)", "1.0")


def test_export_fuse_lora_writes_the_transformer_with_the_lora_in_the_original_layout(
        flux_lora_step, tiny_flux, tmp_path, capsys):
    from dbtools.cli import main

    out = tmp_path / "flux1-style.safetensors"
    assert main(["export", "--model_path", str(flux_lora_step), "--checkpoint_path", str(out), "--fuse_lora"]) == 0
    said = capsys.readouterr().out
    assert "layout flux1" in said and "models/diffusion_models" in said
    written = load_file(str(out))
    fused = transformer_to_original(fused_transformer(tiny_flux, flux_lora_step)[0])
    assert set(written) == set(fused)
    assert [k for k in fused if not torch.allclose(written[k], fused[k], atol=1e-6)] == []
    assert read_metadata(out)["modelspec.architecture"] == "flux-1-dev"
    half = tmp_path / "half.safetensors"
    assert main(["export", "--model_path", str(flux_lora_step), "--checkpoint_path", str(half), "--fuse_lora",
                 "--half"]) == 0
    assert {v.dtype for v in load_file(str(half)).values()} == {torch.bfloat16}


def test_export_command_writes_a_flux_pipeline_folders_transformer(tiny_flux, tmp_path, capsys):
    from dbtools.cli import main

    out = tmp_path / "flux1.safetensors"
    assert main(["export", "--model_path", str(tiny_flux), "--checkpoint_path", str(out)]) == 0
    written = load_file(str(out))
    want = transformer_to_original(flux_pipe(tiny_flux).transformer.state_dict())
    assert set(written) == set(want) and all(written[k].equal(want[k]) for k in want)
    assert "layout flux1" in capsys.readouterr().out
    half = tmp_path / "half.safetensors"
    assert main(["export", "--model_path", str(tiny_flux), "--checkpoint_path", str(half), "--half"]) == 0
    assert {v.dtype for v in load_file(str(half)).values()} == {torch.bfloat16}  # Flux.1's half precision
