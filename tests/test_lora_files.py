"""The files of a LoRA run for the web UIs: one in every step folder, and `export` with and
without `--fuse_lora`, on a tiny SD 1.x LoRA run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ui_loaders import a1111_version, forge_version, module_map, unmatched

from dbtools.after.kohya import read_metadata


@pytest.fixture(scope="module")
def lora_run(tiny_sd, tmp_path_factory):
    """Two steps of a LoRA run with the text encoder trained, weights saved at both steps."""
    from conftest import make_captioned, train_config

    from dbtools.train import loop as T

    root = tmp_path_factory.mktemp("lora_run")
    inst = make_captioned(root / "inst", sizes=[(48, 48)] * 2, colors=[(200, 0, 0), (200, 90, 0)])
    cfg = train_config(tiny_sd, inst, root / "out", save_interval=1, checkpointing_steps=None, learning_rate=1e-2,
                       save_infer_steps=1, use_lora=True, lora_rank=2, train_text_encoder=True,
                       output_name="toy style", training_comment="two steps on a toy")
    return T.train(cfg)


def test_every_lora_step_folder_has_the_ui_file_beside_the_diffusers_one(lora_run, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from dbtools.after.cleanup import cleanup_plan

    out = lora_run.output_dir
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    modules = module_map(pipe, "sd1")
    for step in (1, 2):
        folder = out / str(step)
        ui = folder / f"toy style-{step}-lora.safetensors"
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors", ui.name]
        tensors = load_file(str(ui))
        assert unmatched(tensors, modules) == []
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
        assert all(v.item() == 2 for k, v in tensors.items() if k.endswith(".alpha"))
        meta = read_metadata(ui)
        assert a1111_version(meta) == forge_version(meta) == "SD1"
        assert (meta["ss_base_model_version"], meta["ss_network_dim"], meta["ss_steps"], meta["ss_output_name"],
                meta["ss_training_comment"], meta["ss_sd_model_name"]) == \
            ("sd_v1", "2", str(step), f"toy style-{step}-lora", "two steps on a toy", Path(tiny_sd).name)
    # diffusers still finds its own file in the folder; cleanup does not take the UI file for an export
    pipe.load_lora_weights(str(out / "2"))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder"}
    assert cleanup_plan(out, exported=[out / "1"]).delete == [out / "1"]


def test_export_without_fuse_lora_writes_the_ui_lora_file(lora_run, tmp_path, capsys):
    from dbtools.cli import main

    out = tmp_path / "picked.safetensors"
    assert main(["export", "--model_path", str(lora_run.output_dir / "2"), "--checkpoint_path", str(out)]) == 0
    said = capsys.readouterr().out
    assert "models/Lora (AUTOMATIC1111, Forge) or models/loras (ComfyUI)" in said
    tensors, meta = load_file(str(out)), read_metadata(out)
    assert tensors.keys() == load_file(str(lora_run.weights_dir / "toy style-2-lora.safetensors")).keys()
    assert (meta["ss_output_name"], meta["ss_base_model_version"], meta["ss_steps"]) == ("picked", "sd_v1", "2")


def test_export_with_fuse_lora_writes_one_checkpoint_that_makes_the_lora_images(lora_run, tiny_sd, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from dbtools.cli import main

    out = tmp_path / "fused.safetensors"
    folder = lora_run.output_dir / "2"
    assert main(["export", "--model_path", str(folder), "--checkpoint_path", str(out), "--fuse_lora"]) == 0
    assert "models/Stable-diffusion (AUTOMATIC1111, Forge) or models/checkpoints (ComfyUI)" in capsys.readouterr().out
    keys = load_file(str(out)).keys()
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert not any("lora" in k for k in keys)

    def latents(pipe):
        return pipe("a photo of sks toy", num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    with_lora = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base = latents(with_lora)
    with_lora.load_lora_weights(str(folder))
    fused = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_sd), local_files_only=True,
                                                     safety_checker=None, requires_safety_checker=False)
    assert not torch.allclose(base, latents(with_lora), atol=1e-4)  # the LoRA changes the images
    assert torch.allclose(latents(fused), latents(with_lora), atol=1e-4)
