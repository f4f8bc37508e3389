"""The `python -m dbtools` entry point and the tiny offline models."""

from __future__ import annotations

import subprocess
import sys

from diffusers import StableDiffusionPipeline

from dbtools import cli
from dbtools.tiny import bytes_to_unicode, learn_bpe


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_module_has_main():
    import importlib

    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


def test_import_has_no_side_effects(tmp_path):
    # Importing every module must not create files, mount drives or download anything.
    code = "import dbtools, importlib; [importlib.import_module(m) for m, _ in __import__('dbtools.cli').cli.COMMANDS.values()]"
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    assert list(tmp_path.iterdir()) == []


def test_bpe_merges_make_caption_words_single_tokens(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    ids = pipe.tokenizer("a red car").input_ids
    assert len(ids) == 5  # <start> a red car <end>
    assert len(bytes_to_unicode()) == 256
    assert learn_bpe(["aa", "aa", "ab"], 1) == [("a", "a</w>")]


def test_tiny_sd_loads_and_generates(tiny_sd, tiny_sd2):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    image = pipe("a red car", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (64, 64)
    pipe2 = StableDiffusionPipeline.from_pretrained(tiny_sd2)
    assert pipe2.scheduler.config.prediction_type == "v_prediction"
    assert pipe2.unet.config.use_linear_projection


def test_tiny_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from dbtools.tiny import build_tiny_sd

    a = build_tiny_sd(tmp_path / "a")
    b = build_tiny_sd(tmp_path / "b")
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_user_errors_take_one_path_stderr_and_exit_2(tmp_path, capsys):
    """Every command reports a user error the same way: one message on stderr, exit code 2."""
    import train_dreambooth

    missing = str(tmp_path / "missing")
    argvs = [
        ["caption", "--img_dir", missing],
        ["extract", "--instance_data_dir", missing],
        ["classgen", "--pretrained_model_name_or_path", missing, "--class_data_dir", missing,
         "--class_prompt", "a dog"],
        ["train", "--pretrained_model_name_or_path", missing, "--instance_data_dir", missing],
        ["export", "--model_path", missing, "--checkpoint_path", str(tmp_path / "m.safetensors")],
        ["preview", "--output_dir", missing],
        ["evaluate", "--output_dir", missing],
        ["demo", "--out", missing, "--steps", "0"],
    ]
    for argv in argvs:
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        named = "--steps" if argv[0] == "demo" else "missing"
        assert err.startswith("error: ") and "Traceback" not in err and named in err, argv
        assert "error" not in out, argv
    args = train_dreambooth.parse_args(["--pretrained_model_name_or_path", missing,
                                        "--instance_data_dir", missing])
    assert train_dreambooth.main(args) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_real_bugs_keep_their_traceback(monkeypatch):
    import pytest

    from dbtools import preview

    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(preview, "main", broken)
    with pytest.raises(KeyError):
        cli.main(["preview", "--output_dir", "x"])
