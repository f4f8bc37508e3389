"""The notebook with the flow-matching families: a headless run with the tiny Flux.1 model
(the settings cell detects it, the `auto` fields follow, LoRA on an NF4 base trains, samples
are written and the export cell writes the UI LoRA file), and the settings cell's family line
for Z-Image and Flux.2 [klein]."""

from __future__ import annotations

import json
import logging

import pytest
from test_notebook import cell_titled, read_notebook, set_form_values, stream_text, venv_kernel, widget_states

from dbtools.after.kohya import read_metadata


def test_notebook_runs_headless_with_a_flux_model(tmp_path, tiny_flux, captioned_factory, monkeypatch):
    """Settings to export with the tiny Flux.1 model, the `auto` fields left as they are; only
    model names, paths, sizes and counts are changed for a CPU."""
    from nbclient import NotebookClient

    captioned, out = captioned_factory(tmp_path / "captioned", name="toy_{i}.png"), tmp_path / "out"
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DBTOOLS_SKIP_INSTALL": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    kernel = venv_kernel(tmp_path / "jupyter", monkeypatch)

    nb = read_notebook()
    set_form_values(nb, dict(
        MODEL_NAME=str(tiny_flux), OUTPUT_DIR=str(out), images_folder="", captioned_folder=str(captioned),
        with_prior_preservation=False, score_saves=False, show_tensorboard=False,
        resolution=32, max_train_steps=2, save_interval=2, thumbnail_size=32,
        extra_flags="--n_save_sample 1 --save_infer_steps=2 --max_sequence_length=16",
    ))
    export = cell_titled(nb, "10.")
    del nb.cells[export + 1:]  # the run stops after the export cell, to stay short on 2 CPU cores
    client = NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError with the traceback
    client.set_widgets_metadata()
    text = {i: stream_text(cell, widget_states(nb)) for i, cell in enumerate(nb.cells)}

    # 3: the settings cell names the family and what `auto` picks for it
    settings = text[cell_titled(nb, "3.")]
    assert "Flux.1" in settings and "1024 px" in settings and "Flux.1 LoRA, NF4 base" in settings
    # 7: the auto fields followed Flux.1: LoRA at LoRA's rate on an NF4 base, Flux's own VAE, bf16
    train_text = text[cell_titled(nb, "7.")]
    command = train_text.splitlines()[0]
    for flag in ("--use_lora", "--quantize_base=nf4", "--learning_rate=0.0001", "--mixed_precision=bf16",
                 "--resolution=32", "--max_train_steps=2"):
        assert flag in command.split(), flag
    assert "--pretrained_vae_name_or_path" not in command and "--train_text_encoder" not in command.split()
    assert "Trained 2 steps" in train_text
    # the LoRA step folder, its sample, and the export cell's UI LoRA file
    assert (out / "2" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "2" / "args.json").read_text())["quantize_base"] == "nf4"
    assert list((out / "2" / "samples").glob("*.png"))
    [lora_file] = out.glob("*.safetensors")
    assert read_metadata(lora_file)["modelspec.architecture"] == "flux-1-dev/lora"


def test_settings_cell_names_z_image_and_flux2_klein(tmp_path, tiny_zimage, tiny_flux2, caplog):
    from dbtools.ui import notebook as nb

    with caplog.at_level(logging.INFO, logger="dbtools"):
        for model in (tiny_zimage, tiny_flux2):
            nb.Session.start(str(model), str(tmp_path / model.name), save_to_gdrive=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Base model:")]
    assert len(lines) == 2
    assert "Z-Image" in lines[0].splitlines()[0] and "Flux.2 [klein]" in lines[1].splitlines()[0]


def markdown_titled(nb, prefix: str) -> str:
    [text] = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith(f"## {prefix}")]
    return text


def test_help_says_which_captioner_suits_the_flow_families_and_which_base_to_train_for_distilled_ones():
    """The captioning help sends flow-model users to detailed captions; the settings help names
    the refused step-distilled models and the base models their refusals tell to train instead."""
    from dbtools.families.flux2 import DISTILLED_ADVICE
    from dbtools.families.zimage import TURBO_ADVICE

    nb = read_notebook()
    captioning = " ".join(markdown_titled(nb, "4. Auto-caption").split())
    for words in ("BLIP's short captions suit SD 1.x/2.x", "<MORE_DETAILED_CAPTION>", "instruction VLM",
                  "T5 for Flux.1", "Qwen for Z-Image and Flux.2 [klein]"):
        assert words in captioning, words
    settings = " ".join(markdown_titled(nb, "3. Settings").split())
    assert "Z-Image-Turbo" in settings and "step-distilled **Flux.2 [klein]**" in settings and "refused" in settings
    for base, refusal in (("Tongyi-MAI/Z-Image", TURBO_ADVICE), ("black-forest-labs/FLUX.2-klein-base-4B",
                                                                  DISTILLED_ADVICE)):
        assert base in refusal and f"`{base}`" in settings, base  # the help and the refusal agree


def test_a_z_image_turbo_is_refused_at_the_settings_cell_with_the_base_to_train(tmp_path, tiny_zimage):
    """Z-Image-Turbo ships Z-Image's files; only its name tells. The settings cell already says it
    is not trained and which base to train, rather than leaving it to the training cell."""
    import shutil

    from dbtools.families.models import UnsupportedModelError
    from dbtools.families.zimage import TURBO_ADVICE
    from dbtools.ui import notebook as nb

    turbo = tmp_path / "Z-Image-Turbo"
    shutil.copytree(tiny_zimage, turbo)
    with pytest.raises(UnsupportedModelError) as info:
        nb.Session.start(str(turbo), str(tmp_path / "out"), save_to_gdrive=False)
    assert TURBO_ADVICE in str(info.value) and "Tongyi-MAI/Z-Image" in str(info.value)
    nb.Session.start(str(tiny_zimage), str(tmp_path / "out2"), save_to_gdrive=False)  # the base model is fine
