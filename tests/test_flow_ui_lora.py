"""The web-UI LoRA files of Z-Image and Flux.2 [klein]: every key names a module ComfyUI patches
(with a fitting shape), and diffusers' own LoRA reader for the pipeline reads the file back to
the same fused weights as the diffusers LoRA file it was made from."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2KleinPipeline, ZImagePipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from ui_loaders import flux2_module_map, unmatched, zimage_module_map

from dbtools.families import flux2, zimage
from dbtools.families.lora_layout import LoraLayoutError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANK, ALPHA = 4, 2.0
ZIMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
FLUX2_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "linear_in", "linear_out",
                 "to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"]


def _lora_file(pipe_class, model, targets, folder, alpha=ALPHA):
    """A diffusers LoRA file of random (seeded) adapters on `targets`; returns its path and the
    transformer's weights with the adapters fused by hand (W + alpha / rank * B @ A)."""
    pipe = pipe_class.from_pretrained(model)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    layers = get_peft_model_state_dict(transformer)
    pipe_class.save_lora_weights(folder, transformer_lora_layers=layers,
                                 transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    expected = {}
    for key, down in layers.items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            up = layers[module + ".lora_B.weight"]
            base = transformer.get_submodule(module).base_layer.weight
            expected[module + ".weight"] = base + alpha / RANK * up @ down
    return folder / "pytorch_lora_weights.safetensors", expected


def _fused_through_diffusers(pipe_class, model, lora_file):
    pipe = pipe_class.from_pretrained(model)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_ui_lora_file_is_applied_fully_and_reads_back_to_the_same_weights(family, tiny_zimage, tiny_flux2, tmp_path):
    pipe_class, model, targets, layout, modules = {
        "zimage": (ZImagePipeline, tiny_zimage, ZIMAGE_TARGETS, zimage, zimage_module_map),
        "flux2": (Flux2KleinPipeline, tiny_flux2, FLUX2_TARGETS, flux2, flux2_module_map)}[family]
    diffusers_file, expected = _lora_file(pipe_class, model, targets, tmp_path)
    ui = layout.ui_lora_tensors(load_file(str(diffusers_file)), alpha=ALPHA)
    save_file(ui, str(tmp_path / "ui.safetensors"))

    transformer = pipe_class.from_pretrained(model).transformer
    assert unmatched(ui, modules(transformer)) == []
    assert len(ui) == 3 * len({k.rsplit(".", 2)[0] for k in ui if k.endswith(".lora_down.weight")})

    fused = _fused_through_diffusers(pipe_class, model, tmp_path / "ui.safetensors")
    reference = _fused_through_diffusers(pipe_class, model, diffusers_file)
    assert fused.keys() == reference.keys()
    for key, weight in expected.items():
        assert torch.allclose(fused[key], weight, atol=1e-5), key
    assert all(torch.allclose(fused[k], reference[k], atol=1e-5) for k in fused)


def test_flux2_qkv_of_one_stream_is_one_module_with_the_others_zero(tiny_flux2, tmp_path):
    diffusers_file, _ = _lora_file(Flux2KleinPipeline, tiny_flux2, ["add_q_proj", "to_q", "to_v"], tmp_path)
    ui = flux2.ui_lora_tensors(load_file(str(diffusers_file)), alpha=ALPHA)
    down = ui["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"]
    up = ui["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"]
    assert down.shape == (3 * RANK, 16) and up.shape == (3 * 16, 3 * RANK)
    assert ui["lora_unet_double_blocks_0_txt_attn_qkv.alpha"].item() == 3 * ALPHA  # same alpha / rank
    assert not up[16:].any() and not down[RANK:].any()  # k and v of the text stream are not trained
    img_up = ui["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert img_up[:16, :RANK].any() and not img_up[16:32].any() and img_up[32:, 2 * RANK:].any()


@pytest.mark.parametrize(("layout", "module"), [(flux2, "norm_out.linear"), (zimage, "layers.0.attention.norm_q")])
def test_a_module_the_ui_layout_cannot_name_is_refused_by_name(layout, module):
    lora = {f"transformer.{module}.lora_A.weight": torch.zeros(2, 4),
            f"transformer.{module}.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(LoraLayoutError, match=f"transformer.{module}"):
        layout.ui_lora_tensors(lora)


def test_the_native_flux2_names_the_test_takes_for_comfyui_are_black_forest_labs_own(tiny_flux2):
    """The rule `flux2_module_map` states is checked against diffusers' reader of original Flux.2
    files: those names and shapes become exactly the diffusers transformer's linear layers."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from ui_loaders import flux2_native_shapes

    transformer = Flux2KleinPipeline.from_pretrained(tiny_flux2).transformer
    native = {k + ".weight": torch.zeros(shape) for k, shape in flux2_native_shapes(transformer.config).items()}
    converted = {k: tuple(v.shape) for k, v in convert_flux2_transformer_checkpoint_to_diffusers(native).items()}
    linears = {n + ".weight": tuple(m.weight.shape) for n, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert converted == linears


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_export_writes_the_ui_file_of_a_lora_step_folder(family, tiny_zimage, tiny_flux2, tmp_path, capsys):
    """`python -m dbtools export --model_path <LoRA step folder>`: the family's UI layout, with
    the family in its metadata, read back by diffusers to the step's fused weights."""
    import json

    from dbtools.after.kohya import read_metadata
    from dbtools.cli import main

    pipe_class, model, targets, modules = {
        "zimage": (ZImagePipeline, tiny_zimage, ZIMAGE_TARGETS, zimage_module_map),
        "flux2": (Flux2KleinPipeline, tiny_flux2, FLUX2_TARGETS, flux2_module_map)}[family]
    step = tmp_path / "out" / "200"
    step.mkdir(parents=True)
    _, expected = _lora_file(pipe_class, model, targets, step, alpha=RANK)  # training's alpha: the rank
    (step / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(model), "lora_rank": RANK}),
                                    encoding="utf-8")
    out = tmp_path / "toy.safetensors"
    assert main(["export", "--model_path", str(step), "--checkpoint_path", str(out)]) == 0, capsys.readouterr()
    ui = load_file(str(out))
    assert unmatched(ui, modules(pipe_class.from_pretrained(model).transformer)) == []
    meta = read_metadata(out)
    assert meta["ss_base_model_version"] == {"zimage": "zimage", "flux2": "flux2_klein"}[family]
    assert meta["ss_network_alpha"] == str(float(RANK)) and meta["ss_network_dim"] == str(RANK)
    fused = _fused_through_diffusers(pipe_class, model, out)
    assert all(torch.allclose(fused[k], w, atol=1e-5) for k, w in expected.items())
