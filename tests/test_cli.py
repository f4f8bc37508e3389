"""The `python -m dbtools` entry point and the tiny offline models."""

from __future__ import annotations

import subprocess
import sys

import pytest
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


def test_every_command_has_a_main_that_answers_help(capsys):
    for name, (module, _) in cli.COMMANDS.items():
        with pytest.raises(SystemExit) as exit_:
            cli_main_of(module)(["--help"])
        assert exit_.value.code == 0, name
        assert capsys.readouterr().out.startswith("usage:"), name


def cli_main_of(module: str):
    import importlib

    return importlib.import_module(module).main


# Modules that exist only to train may import torch at the top; every other module
# must stay light: `python -m dbtools --help`, the notebook's first cell and the
# caption editor should not wait for torch, diffusers or transformers.
TRAINING_ONLY = {"loop", "setup", "outputs", "losses", "prompts"}
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "gradio")
IMPORT_PROBE = """
import importlib, json, os, pkgutil, sys
events = []
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and (
            any(c in (args[1] or "") for c in "wax+") or (args[2] or 0) & WRITES):
        events.append(f"open for writing {args[0]}")
    elif event in ("os.mkdir", "os.remove", "os.rename", "os.rmdir", "os.symlink", "os.link",
                   "shutil.rmtree", "socket.connect", "socket.getaddrinfo", "subprocess.Popen",
                   "os.system", "os.chdir"):
        events.append(f"{event} {args[0]!r}")

import dbtools
names = ["dbtools"] + sorted(m.name for m in pkgutil.walk_packages(dbtools.__path__, "dbtools.")
                             if m.name != "dbtools.__main__")  # running the CLI is what it is for
heavy, before = {}, set(sys.modules)
sys.addaudithook(audit)
for name in names:
    if name.split(".")[-1] in TRAINING_ONLY:
        continue
    importlib.import_module(name)
    new = [h for h in HEAVY if h in sys.modules and h not in before]
    if new:
        heavy[name] = new
        before |= set(sys.modules)
print(json.dumps({"modules": names, "heavy": heavy, "events": events}))
"""


def test_import_has_no_side_effects(tmp_path):
    # Importing dbtools or any light module writes nothing, connects nowhere, starts
    # no process, and loads no torch/diffusers/transformers.
    import json
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(tmp_path)}
    code = f"TRAINING_ONLY = {TRAINING_ONLY!r}\nHEAVY = {HEAVY!r}\n{IMPORT_PROBE}"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    light = {"dbtools.cli", "dbtools.dataset.captions", "dbtools.ui.notebook", "dbtools.ui.editor"}
    assert light <= set(report["modules"])
    assert report["heavy"] == {}
    assert report["events"] == []
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


def test_tiny_without_onnx_builds_the_rest_and_says_why(tmp_path, monkeypatch, capsys):
    """`python -m dbtools tiny` without the `tiny` extra: no traceback, the tagger is left out in one line."""
    from dbtools import tiny
    from dbtools.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets when it is not installed
    monkeypatch.setattr(tiny, "BUILDERS", {k: tiny.BUILDERS[k] for k in ("sd", "wd-tagger")})
    assert main(["tiny", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert f"sd: {tmp_path / 'sd'}" in out and (tmp_path / "sd" / "model_index.json").is_file()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("wd-tagger: not built, it needs the onnx package: pip install onnx "
                                        "(or pip install -e .[tiny]); the other models were written.")
    assert not (tmp_path / "wd-tagger" / "model.onnx").exists()


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

    from dbtools.after import preview

    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(preview, "main", broken)
    with pytest.raises(KeyError):
        cli.main(["preview", "--output_dir", "x"])
