"""Training against careless set-ups and hostile inputs: flags, folders, captions, names.

Everything here is refused (or handled) before a model loads, except the few tiny
training runs that show a case end to end.
"""

from __future__ import annotations

import ast
import codecs
import errno
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from dbtools import cli
from dbtools.core.redact import mask_secrets
from dbtools.core.textio import CaptionEncodingError, decode_caption
from dbtools.dataset.concepts import Concept
from dbtools.dataset.extract import ExtractConfig, run_extract
from dbtools.families.base import Components
from dbtools.families.sd import SD1
from dbtools.train import loop as T
from dbtools.train import outputs as O
from dbtools.train import setup as S
from dbtools.train.config import TrainConfig, parse_args
from dbtools.train.data import find_caption_file, scan_concepts, step_seed, weights_key
from dbtools.train.setup import TrainError
from dbtools.ui import notebook as nb
from dbtools.ui.editor import read_caption
from tests.conftest import make_captioned
from tests.conftest import train_config as config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123456789"


def captioned(folder: Path, name: str = "a.png", text: str = "sks toy") -> Path:
    """One captioned image, `folder/name`."""
    return make_captioned(folder, sizes=[(64, 48)], name=name, caption=text) / name


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if training loads a model (everything must be caught before)."""
    import dbtools.families.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the pre-flight finished")

    monkeypatch.setattr(dbtools.families.models, "load_sd_components", refuse)


def preflight_error(cfg: TrainConfig) -> str:
    with pytest.raises(TrainError) as info:
        S.preflight(cfg)
    return str(info.value)


# --------------------------------------------------------------------------- flags and tokens


def test_every_parser_refuses_abbreviated_flags():
    """argparse's prefix matching let `--hub_t=...` through as --hub_token; no parser allows it."""
    sources = [*ROOT.glob("dbtools/**/*.py"), *ROOT.glob("bench/*.py"), ROOT / "train_dreambooth.py"]
    parsers = 0
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                parsers += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert "allow_abbrev" in flags and flags["allow_abbrev"].value is False, path
    assert parsers >= 8
    with pytest.raises(SystemExit):
        parse_args(["--hub_t", TOKEN])
    with pytest.raises(SystemExit):
        parse_args(["--learning_r=1e-6"])


def test_abbreviated_token_flag_in_the_notebook_is_refused_and_never_shown(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.INFO)
    ran = []
    monkeypatch.setattr(nb, "run_command", lambda argv, **k: ran.append(argv) or 0)
    for extra in (f"--hub_t={TOKEN}", f"--hub_t {TOKEN}", f"--hub_token={TOKEN}"):
        with pytest.raises(ValueError) as info:
            nb.launch_training("m", tmp_path / "out", tmp_path / "c.json", extra_flags=extra)
        assert TOKEN not in str(info.value)
    assert not ran
    # A token pasted anywhere else in a command is masked where the command is shown.
    nb.launch_training("m", tmp_path / "out", tmp_path / "c.json", save_sample_prompt=f"a photo {TOKEN}")
    assert ran and TOKEN in " ".join(ran[0])  # the child gets what the user typed
    out = capsys.readouterr()
    assert TOKEN not in caplog.text + out.out + out.err
    assert "<redacted>" in caplog.text


def test_mask_secrets_hides_token_values_and_keeps_other_flags():
    argv = ["--hub_token", "abc", f"--hub_token={TOKEN}", "--my_auth_token=xyz", f"--save_sample_prompt=a {TOKEN}",
            "--keep_tokens", "2", "--tokenizer_name=t", "--hub_t", "short"]
    assert mask_secrets(argv) == ["--hub_token", "<redacted>", "--hub_token=<redacted>", "--my_auth_token=<redacted>",
                                  "--save_sample_prompt=a <redacted>", "--keep_tokens", "2", "--tokenizer_name=t",
                                  "--hub_t", "<redacted>"]


@pytest.mark.parametrize("flag,value", [("learning_rate", "-1"), ("learning_rate", "nan"),
                                        ("learning_rate", "inf"), ("adam_beta2", "1.5"), ("max_grad_norm", "-1"),
                                        ("prior_loss_weight", "nan"), ("lr_warmup_steps", "-3")])
def test_bad_numbers_are_refused_before_any_model_loads(tmp_path, no_model_loads, capsys, flag,
                                                        value, tiny_sd):
    captioned(tmp_path / "inst")
    code = cli.main(["train", "--pretrained_model_name_or_path", str(tiny_sd),
                     "--instance_data_dir", str(tmp_path / "inst"),
                     "--read_prompts_from_txts", "--output_dir", str(tmp_path / "out"), f"--{flag}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and f"--{flag}" in err and "Traceback" not in err


def test_flow_matching_flags_have_their_defaults_and_their_ranges(tmp_path, image_factory, no_model_loads, capsys,
                                                                  tiny_sd):
    from dbtools.train.config import TrainConfig, flag_problems, parse_args

    cfg = TrainConfig.from_args(parse_args([]))
    assert (cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.guidance_scale,
            cfg.max_sequence_length, cfg.quantize_base) == ("none", 0.0, 1.0, 1.29, 1.0, 512, "none")
    given = TrainConfig.from_args(parse_args(["--weighting_scheme", "logit_normal", "--logit_mean", "-0.5",
                                              "--quantize_base", "nf4", "--max_sequence_length", "256"]))
    assert (given.weighting_scheme, given.logit_mean, given.quantize_base, given.max_sequence_length) == \
        ("logit_normal", -0.5, "nf4", 256)
    bad = dict(logit_std=0.0, logit_mean=float("nan"), guidance_scale=-1.0, max_sequence_length=600,
               weighting_scheme="uniform", quantize_base="fp8")
    problems = flag_problems(TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", **bad))
    assert [next(p for p in problems if p.startswith(f"--{name} ")) for name in bad]
    captioned(tmp_path / "inst")
    code = cli.main(["train", "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir",
                     str(tmp_path / "inst"), "--read_prompts_from_txts", "--output_dir", str(tmp_path / "out"),
                     "--max_sequence_length", "600"])
    err = capsys.readouterr().err
    assert code == 2 and "--max_sequence_length 600: must be from 1 to 512" in err


def test_flux_settings_it_cannot_train_are_one_message_before_loading(tmp_path, image_factory, no_model_loads,
                                                                       capsys, monkeypatch, tiny_flux):
    from dbtools.train import classgen

    captioned(tmp_path / "inst")
    argv = ["train", "--pretrained_model_name_or_path", str(tiny_flux), "--instance_data_dir",
            str(tmp_path / "inst"), "--read_prompts_from_txts", "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Flux.1 trains LoRA adapters only" in err and "--use_lora" in err and "Traceback" not in err
    # A GPU without native bf16 (a T4) is told so once, before anything loads.
    monkeypatch.setattr(S.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(classgen, "native_bf16", lambda: False)
    assert cli.main([*argv, "--use_lora", "--mixed_precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "bf16" in line] == [
        "- Flux.1 trains in bf16, which this GPU does not run natively (a T4 or older): fp16 overflows in its "
        "transformer and float32 does not fit. Use a GPU with bf16 (Ampere or newer: A100, L4, RTX 30xx/40xx)."]


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantize_base_with_an_sd_model_is_one_message_before_loading(tmp_path, no_model_loads, capsys, tiny_sd,
                                                                      quantize):
    captioned(tmp_path / "inst")
    code = cli.main(["train", "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir",
                     str(tmp_path / "inst"), "--read_prompts_from_txts", "--output_dir", str(tmp_path / "out"),
                     "--use_lora", "--quantize_base", quantize])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "quantize_base" in line] == [
        f"- --quantize_base {quantize}: Stable Diffusion 1.x models train from a full-precision base (a quantized "
        "base is for the large flow transformers); leave --quantize_base unset."]


# --------------------------------------------------------------------------- folders


def test_output_and_cache_dir_that_are_files_are_refused(tmp_path, tiny_sd, no_model_loads):
    captioned(tmp_path / "inst")
    (tmp_path / "file").write_text("x")
    text = preflight_error(config(tiny_sd, tmp_path / "inst", tmp_path / "file", cache_dir=str(tmp_path / "file")))
    assert f"--output_dir {tmp_path / 'file'} is a file" in text
    assert f"--cache_dir {tmp_path / 'file'} is a file" in text
    text = preflight_error(config(tiny_sd, tmp_path / "inst", tmp_path / "file" / "out"))
    assert "lies under a file" in text


def test_unwritable_and_full_folders_are_found_before_any_model_loads(tmp_path, tiny_sd,
                                                                      no_model_loads, monkeypatch):
    captioned(tmp_path / "inst")
    # /proc takes no new files, even for root (permission bits alone would not show it).
    text = preflight_error(config(tiny_sd, tmp_path / "inst", "/proc/dbtools-out", cache_dir="/proc/dbtools-cache",
                                  with_prior_preservation=True, class_prompt="a toy",
                                  class_data_dir="/proc/dbtools-class", num_class_images=2))
    for flag in ("--output_dir /proc/dbtools-out", "--logging_dir", "--cache_dir /proc/dbtools-cache",
                 "class_data_dir /proc/dbtools-class"):
        assert f"{flag}" in text and "cannot write" in text, flag

    import dbtools.train.folders as F

    monkeypatch.setattr(F.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 5, 5))
    text = preflight_error(config(tiny_sd, tmp_path / "inst", tmp_path / "out"))
    assert f"--output_dir {tmp_path / 'out'}: not enough free space" in text and "needed" in text


def test_disk_full_while_saving_is_one_message_with_the_space_needed(tmp_path, tiny_sd, monkeypatch):
    captioned(tmp_path / "inst")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "save_weights", full)
    with pytest.raises(TrainError, match="disk is full") as info:
        T.train(config(tiny_sd, tmp_path / "inst", tmp_path / "out", max_train_steps=1))
    assert str(tmp_path / "out") in str(info.value) and "needs about" in str(info.value)


@pytest.mark.parametrize("error", [RuntimeError("Error while serializing: I/O error: No space left on device "
                                                "(os error 28)"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_disk_full_as_the_writers_report_it(tmp_path, monkeypatch, error):
    """safetensors names errno 28 in text; torch.save does not, so the free space decides."""
    import types

    import torch

    run = types.SimpleNamespace(cfg=TrainConfig(output_dir=str(tmp_path)), models=Components(SD1, dict(
        unet=torch.nn.Linear(1000, 1000), text_encoder=torch.nn.Linear(1, 1), vae=torch.nn.Linear(1, 1)), None))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(TrainError, match="disk is full.*needs about 4 MiB"), O.disk_full_message(run):
        raise error
    # With room to spare, only an error that names errno 28 is still taken for a full disk.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 0, 10**11))
    expected = TrainError if "os error 28" in str(error) else RuntimeError
    with pytest.raises(expected) as info, O.disk_full_message(run):
        raise error
    assert type(info.value) is expected


# --------------------------------------------------------------------------- data mixed into training


def test_instance_images_never_come_from_class_or_output_folders(tmp_path, caplog):
    inst = tmp_path / "inst"
    captioned(inst, "a.png")
    captioned(inst, "sub/b.png")
    for i in range(3):
        captioned(inst, f"class/{i}-x.jpg", "a toy")
    captioned(inst, "out/1/samples/0.png", "sample")
    concept = Concept(str(inst), class_prompt="a toy", class_data_dir=str(inst / "class"))
    caplog.set_level(logging.INFO, logger="dbtools.train.data")
    plan, problems = scan_concepts([concept], read_prompts_from_txts=True, output_dir=str(inst / "out"))
    assert problems == []
    assert sorted(e.path.relative_to(inst).as_posix() for e in plan.instance) == ["a.png", "sub/b.png"]
    assert "skipped sub-folder class" in caplog.text and f"skipped sub-folder {os.path.join('out')}" in caplog.text


def test_equal_instance_and_class_folders_or_output_folder_are_refused(tmp_path):
    inst = tmp_path / "inst"
    captioned(inst)
    concept = Concept(str(inst), class_prompt="a toy", class_data_dir=str(tmp_path / "x" / ".." / "inst"))
    _, problems = scan_concepts([concept], read_prompts_from_txts=True, with_prior_preservation=True)
    assert any("class_data_dir and instance_data_dir are the same folder" in p for p in problems)
    _, problems = scan_concepts([Concept(str(inst))], read_prompts_from_txts=True, output_dir=str(inst))
    assert any("--output_dir is the instance folder" in p for p in problems)


def test_concepts_type_and_template_errors_are_messages_not_tracebacks(tmp_path, tiny_sd,
                                                                       no_model_loads, capsys):
    captioned(tmp_path / "inst")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"instance_data_dir": 5, "instance_prompt": "x"},
        {"instance_data_dir": str(tmp_path / "inst"), "prompt_template": "{nope} {caption}"}]))
    code = cli.main(["train", "--pretrained_model_name_or_path", str(tiny_sd), "--concepts_list", str(concepts),
                   "--read_prompts_from_txts", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "'instance_data_dir' must be a string" in err and "unknown field(s) ['nope']" in err


# --------------------------------------------------------------------------- another run in the folder


def test_fresh_run_in_a_folder_holding_another_run_is_refused_with_the_ways_out(tmp_path, tiny_sd,
                                                                                no_model_loads, weights_factory):
    captioned(tmp_path / "inst")
    out = tmp_path / "out"
    weights_factory(out, "500")
    text = preflight_error(config(tiny_sd, tmp_path / "inst", out))
    for way in ("--resume_from_checkpoint latest", "new --output_dir", "--overwrite_output_dir"):
        assert way in text
    shutil.rmtree(out / "500")
    weights_factory(out, "checkpoint-7")
    assert "another run" in preflight_error(config(tiny_sd, tmp_path / "inst", out))
    # Resuming is not refused as another run (this stand-in checkpoint has no optimizer state: it is damaged).
    text = preflight_error(config(tiny_sd, tmp_path / "inst", out, resume_from_checkpoint="latest"))
    assert "another run" not in text and "checkpoint-7 is damaged or incomplete" in text
    shutil.rmtree(out / "checkpoint-7")
    weights_factory(out, "9")  # weights but nothing to resume from
    text = preflight_error(config(tiny_sd, tmp_path / "inst", out, resume_from_checkpoint="latest"))
    assert "no checkpoint to resume from" in text and "--overwrite_output_dir" in text
    S.preflight(config(tiny_sd, tmp_path / "inst", out, overwrite_output_dir=True))
    shutil.rmtree(out)
    (out / "0" / "logs").mkdir(parents=True)  # logs alone are not a run
    S.preflight(config(tiny_sd, tmp_path / "inst", out))


def test_overwrite_output_dir_into_a_new_folder_moves_nothing_aside(tmp_path, tiny_sd):
    """The demo and the notebook pass --overwrite_output_dir on a first run too: nothing of the
    run itself (its progress.json) is taken for an earlier run."""
    inst = tmp_path / "inst"
    captioned(inst, "a.png")
    T.train(config(tiny_sd, inst, tmp_path / "out", max_train_steps=1, overwrite_output_dir=True))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out-previous-")] == []


def test_overwrite_output_dir_moves_the_old_run_aside_and_trains_non_utf8_names(tmp_path, tiny_sd,
                                                                                weights_factory):
    """`--overwrite_output_dir` keeps every old file (moved next to the folder); an image whose
    name is not UTF-8 trains like any other."""
    inst = tmp_path / "inst"
    captioned(inst, os.fsdecode(b"caf\xe9 cr\xe8me.png"))
    out = tmp_path / "out"
    old = weights_factory(out, "2")
    weights_factory(out, "checkpoint-2")
    (out / "0" / "logs").mkdir(parents=True)  # an older run's logs
    (out / "logs").mkdir()
    for name in ("generated", "gradio"):
        (out / name).mkdir()
    for name in ("out-2.safetensors", "preview.png", "metrics.jsonl"):  # export, preview, scores of the old run
        (out / name).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    result = T.train(config(tiny_sd, inst, out, max_train_steps=1, overwrite_output_dir=True))
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out-previous-")]
    assert len(moved) == 1
    assert sorted(p.name for p in moved[0].iterdir()) == ["0", "2", "checkpoint-2", "generated", "gradio", "logs",
                                                          "metrics.jsonl", "out-2.safetensors", "preview.png"]
    assert (moved[0] / "2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"x" * 100
    assert not old.exists() and (out / "notes.txt").read_text() == "mine"
    # the new run's progress stays with the new run, not with the old one moved aside
    assert not (moved[0] / "0" / "progress.json").exists()
    assert json.loads((out / "0" / "progress.json").read_text())["state"] == "finished"
    assert result.weights_dir == out / "1" and (out / "1" / "model_index.json").is_file()


def test_notebook_training_cell_offers_overwrite_output_dir(tmp_path):
    argv = nb.training_command("m", tmp_path / "out", tmp_path / "c.json", overwrite_output_dir=True)
    assert "--overwrite_output_dir" in argv
    assert "--overwrite_output_dir" not in nb.training_command("m", tmp_path / "out", tmp_path / "c.json")
    cells = json.loads((ROOT / "KaliYuga_DreamBooth.ipynb").read_text(encoding="utf-8"))["cells"]
    training = ["".join(c["source"]) for c in cells if "nb.train_live(" in "".join(c["source"])]
    assert len(training) == 1
    assert "overwrite_output_dir = False  #@param" in training[0]
    assert "overwrite_output_dir=overwrite_output_dir" in training[0]


# --------------------------------------------------------------------------- latent cache


def test_latent_cache_key_follows_the_vae_weights_not_their_path(tmp_path):
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"A" * 1000)
    os.utime(weights, ns=(10**18, 10**18))
    key = weights_key([weights], {"block_out_channels": [32]}, "m", None)
    assert key == weights_key([weights], {"block_out_channels": [32]}, "m", None)
    weights.write_bytes(b"B" * 1000)  # same path, same size, same mtime: only the contents differ
    os.utime(weights, ns=(10**18, 10**18))
    assert weights_key([weights], {"block_out_channels": [32]}, "m", None) != key
    assert weights_key([weights], {"block_out_channels": [64]}, "m", None) != \
        weights_key([weights], {"block_out_channels": [32]}, "m", None)


def test_swapped_vae_weights_at_the_same_path_are_encoded_again(tmp_path, tiny_sd, caplog):
    import torch
    from diffusers import AutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    captioned(tmp_path / "inst")
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="dbtools.train.setup")
    T.train(config(model, tmp_path / "inst", tmp_path / "a", max_train_steps=1, cache_dir=str(cache)))
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.5)
    vae.save_pretrained(model / "vae")
    caplog.clear()
    T.train(config(model, tmp_path / "inst", tmp_path / "b", max_train_steps=1, cache_dir=str(cache)))
    assert f"latents: 1 encoded, 0 read from {cache}" in caplog.text


# --------------------------------------------------------------------------- caption files


@pytest.mark.parametrize("data", ["café crème".encode(), codecs.BOM_UTF8 + "café crème".encode(),
                                  "café crème".encode("utf-16"),
                                  codecs.BOM_UTF16_BE + "café crème".encode("utf-16-be")])
def test_caption_files_in_utf8_or_utf16_with_bom_read_the_same(data):
    assert decode_caption(data) == "café crème"


@pytest.mark.parametrize("data,hint", [("café crème".encode("latin-1"), "not UTF-8"),
                                       ("café crème".encode("utf-16-le"), "UTF-16 without a byte-order mark")])
def test_other_caption_encodings_are_refused_naming_the_file_and_the_fix(data, hint):
    with pytest.raises(CaptionEncodingError, match=hint) as info:
        decode_caption(data, "x/a.png.txt")
    assert "x/a.png.txt" in str(info.value) and "save it as UTF-8" in str(info.value)


def test_training_extract_and_editor_share_the_caption_reader(tmp_path, image_factory):
    inst = tmp_path / "inst"
    good = image_factory(inst / "good.png")
    Path(f"{good}.txt").write_bytes("café crème".encode("utf-16"))
    bad = image_factory(inst / "bad.png")
    Path(f"{bad}.txt").write_bytes("café crème".encode("latin-1"))
    plan, problems = scan_concepts([Concept(str(inst))], read_prompts_from_txts=True)
    assert [e.prompt for e in plan.instance] == ["café crème"]
    assert len(problems) == 1 and "bad.png.txt" in problems[0] and "UTF-8" in problems[0]
    assert read_caption(good, "sidecar") == "café crème"
    with pytest.raises(CaptionEncodingError, match="bad.png.txt"):
        read_caption(bad, "sidecar")
    # Extract compares the text: the UTF-16 file already holds its plan; the latin-1 one is reported.
    (inst / "café crème_1.png").write_bytes(good.read_bytes())
    Path(f"{inst / 'café crème_1.png'}.txt").write_bytes("café crème".encode("utf-16"))
    Path(f"{inst / 'café crème_1.png'}.txt").touch()
    summary = run_extract([Concept(str(inst))], ExtractConfig(progress=False))
    assert [p.name for p, _ in summary.failed] == ["bad.png.txt"]
    assert "save it as UTF-8" in summary.failed[0][1]
    assert summary.counts["unchanged"] == 1


# --------------------------------------------------------------------------- names


def test_long_image_name_finds_its_stem_caption(tmp_path, image_factory):
    stem = "a" * 249
    img = image_factory(tmp_path / f"{stem}.png")  # 253 bytes: `<name>.txt` would be 257
    (tmp_path / f"{stem}.txt").write_text("long one")
    assert find_caption_file(img) == tmp_path / f"{stem}.txt"
    plan, problems = scan_concepts([Concept(str(tmp_path))], read_prompts_from_txts=True)
    assert problems == [] and plan.instance[0].prompt == "long one"


def test_step_seed_takes_names_that_are_not_utf8():
    name = os.fsdecode(b"caf\xe9.png")
    assert step_seed(1, 0, f"crop:{name}") != step_seed(1, 0, "crop:caf\u00e9.png")
    assert sys.getfilesystemencoding() == "utf-8"
