"""Z-Image and Flux.2 [klein] LoRA DreamBooth on the tiny models, through the entry points users
take (`train_dreambooth.py`'s main, `python -m dbtools generate`): the held-out loss falls,
a resumed run repeats the unbroken one, samples are remade pixel for pixel, and the UI LoRA
file of each step folder names only modules ComfyUI patches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from diffusers import Flux2KleinPipeline, ZImagePipeline
from PIL import Image
from safetensors.torch import load_file
from test_flux_train import flux_config, overfit_set, train_main  # noqa: F401 (a fixture)
from ui_loaders import flux2_module_map, unmatched, zimage_module_map

from dbtools.after import generate as G
from dbtools.train import loop as T

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["zimage", "flux2"])
def family(request, tiny_zimage, tiny_flux2):
    """(tiny model folder, pipeline class, ComfyUI's module map) of each family."""
    return {"zimage": (tiny_zimage, ZImagePipeline, zimage_module_map),
            "flux2": (tiny_flux2, Flux2KleinPipeline, flux2_module_map)}[request.param]


def test_lora_learns_a_tiny_set(tmp_path, overfit_set, family):  # noqa: F811
    model, _, _ = family
    out = tmp_path / "out"
    cfg = flux_config(model, overfit_set, out, max_train_steps=40, validation_data_dir=str(overfit_set),
                      validation_steps=10)
    assert train_main(cfg) == 0
    losses = [json.loads(line)["validation_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # every held-out loss lower than the one before (fixed sigmas and noise), 5 % lower in 30 steps
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_resume_repeats_the_unbroken_run(tmp_path, overfit_set, family, monkeypatch):  # noqa: F811
    model, _, _ = family
    losses: list[float] = []
    real = T.train_step
    monkeypatch.setattr(T, "train_step", lambda run, step: losses.append(real(run, step)) or losses[-1])
    kw = dict(checkpointing_steps=2, weighting_scheme="logit_normal", hflip=True)
    full = T.train(flux_config(model, overfit_set, tmp_path / "full", **kw))
    unbroken, losses[:] = list(losses), []
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = T.train(flux_config(model, overfit_set, resumed_dir, resume_from_checkpoint="latest", **kw))
    assert resumed.global_step == 4 and losses == unbroken[2:]
    a, b = (load_file(str(r.weights_dir / "pytorch_lora_weights.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_samples_are_remade_by_generate_and_the_ui_file_is_applied_fully(tmp_path, overfit_set, family,  # noqa: F811
                                                                         capsys):
    model, pipe_class, modules = family
    out = tmp_path / "out"
    cfg = flux_config(model, overfit_set, out, save_interval=2, save_sample_prompt="a photo of sks toy",
                      n_save_sample=1, save_infer_steps=3, save_guidance_scale=3.0)
    assert train_main(cfg) == 0
    sample = out / "4" / "samples" / "0.png"
    settings = G.settings_from_png(sample)
    assert settings["scheduler"] == "flow_euler" and settings["guidance_scale"] == 3.0
    capsys.readouterr()
    assert G.main(["--model", str(out / "4"), "--from_png", str(sample), "--out_dir", str(tmp_path / "gen")]) == 0
    remade = capsys.readouterr().out.strip().splitlines()[-1]
    assert np.array_equal(np.asarray(Image.open(remade)), np.asarray(Image.open(sample)))
    ui = load_file(str(next((out / "4").glob("*-lora.safetensors"))))
    assert ui and unmatched(ui, modules(pipe_class.from_pretrained(model).transformer)) == []


def test_settings_it_cannot_train_with_stop_the_command_before_loading(tmp_path, overfit_set, family,  # noqa: F811
                                                                       capsys):
    from dbtools.cli import main

    model, _, _ = family
    argv = ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(overfit_set),
            "--output_dir", str(tmp_path / "out"), "--read_prompts_from_txts", "--snr_gamma", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "add --use_lora" in err and "--weighting_scheme" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))
