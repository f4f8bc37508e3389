"""Careless or unlucky inputs met through the user's entry points (`train_dreambooth.py`,
`python -m dbtools ...`): each gets one message naming the file or flag and the fix
(`error: ...` on stderr, exit 2, no traceback) before any model loads, or a note in the log."""

from __future__ import annotations

import codecs
import json
import logging
import pickle
import shutil
import sys
from pathlib import Path

import pytest

from dbtools import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_dreambooth  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models train fastest on one thread


def captioned(folder: Path, image_factory, name: str = "a.png", text: str = "sks toy") -> Path:
    img = image_factory(folder / name)
    Path(f"{img}.txt").write_text(text, encoding="utf-8")
    return img


def train_flags(model, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--output_dir", str(out), "--read_prompts_from_txts",
            "--resolution=32", "--train_batch_size=1", "--max_train_steps=1", "--learning_rate=1e-3",
            "--lr_warmup_steps=0", "--report_to=none", "--save_interval=1000", *map(str, extra)]


def run_train(argv: list[str], capsys) -> tuple[int, str]:
    """`train_dreambooth.py argv` in this process: its exit code and stderr."""
    code = train_dreambooth.main(train_dreambooth.parse_args(argv))
    return code, capsys.readouterr().err


def assert_one_message(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if training loads a model (everything must be caught before)."""
    import dbtools.families.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the pre-flight finished")

    monkeypatch.setattr(dbtools.families.models, "load_sd_components", refuse)


# --------------------------------------------------------------------------- concepts_list.json


def test_empty_concepts_list_is_one_message_in_training_and_class_images(tmp_path, tiny_sd, no_model_loads,
                                                                        capsys):
    concepts = tmp_path / "concepts_list.json"
    concepts.write_text("[]", encoding="utf-8")
    code, err = run_train(train_flags(tiny_sd, tmp_path / "out", "--concepts_list", concepts), capsys)
    assert_one_message(code, err, f"{concepts}: the list holds no concept")
    code = cli.main(["classgen", "--pretrained_model_name_or_path", str(tiny_sd), "--concepts_list", str(concepts)])
    err = capsys.readouterr().err
    assert_one_message(code, err, f"{concepts}: the list holds no concept")
    assert "already has" not in err


def test_concepts_list_with_a_bom_is_read(tmp_path, tiny_sd, image_factory, capsys):
    captioned(tmp_path / "inst", image_factory)
    concepts = tmp_path / "concepts_list.json"
    text = json.dumps([{"instance_data_dir": str(tmp_path / "inst"), "instance_prompt": "sks toy"}])
    concepts.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    code, err = run_train(train_flags(tiny_sd, tmp_path / "out", "--concepts_list", concepts), capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "1" / "model_index.json").is_file()


def test_the_same_concept_twice_is_refused_by_training_and_extract_alike(tmp_path, tiny_sd, image_factory,
                                                                         no_model_loads, capsys):
    captioned(tmp_path / "inst", image_factory)
    concept = {"instance_data_dir": str(tmp_path / "inst"), "instance_prompt": "sks toy"}
    concepts = tmp_path / "concepts_list.json"
    concepts.write_text(json.dumps([concept, dict(concept, instance_data_dir=f"{tmp_path / 'inst'}/")]))
    code, err = run_train(train_flags(tiny_sd, tmp_path / "out", "--concepts_list", concepts), capsys)
    assert_one_message(code, err, f"{tmp_path / 'inst'} is used by concepts 1 and 2", "List each folder once")
    code = cli.main(["extract", "--concepts_list", str(concepts)])
    assert_one_message(code, capsys.readouterr().err, f"{tmp_path / 'inst'} is used by concepts 1 and 2",
                       "List each folder once")


def test_missing_relative_folder_names_the_folder_it_was_resolved_against(tmp_path, tiny_sd, no_model_loads,
                                                                          capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    concepts = tmp_path / "concepts_list.json"
    concepts.write_text(json.dumps([{"instance_data_dir": "photos/me", "instance_prompt": "sks"}]))
    code, err = run_train(train_flags(tiny_sd, tmp_path / "out", "--concepts_list", concepts), capsys)
    assert_one_message(code, err, "photos/me", f"relative path, resolved against the current folder {tmp_path}")
    code = cli.main(["extract", "--concepts_list", str(concepts)])
    assert_one_message(code, capsys.readouterr().err, f"resolved against the current folder {tmp_path}")


def test_caption_file_that_is_a_folder_is_named_as_a_folder(tmp_path, tiny_sd, image_factory, no_model_loads,
                                                            capsys):
    img = image_factory(tmp_path / "inst" / "a.png")
    (tmp_path / "inst" / "a.png.txt").mkdir()
    code, err = run_train(train_flags(tiny_sd, tmp_path / "out", "--instance_data_dir", tmp_path / "inst"), capsys)
    assert_one_message(code, err, f"{img}.txt is a folder, not a caption file")
    assert "no caption file" not in err


# --------------------------------------------------------------------------- flags


def test_huge_resolution_is_refused_before_anything_loads(tmp_path, tiny_sd, image_factory, no_model_loads, capsys):
    captioned(tmp_path / "inst", image_factory)
    flags = train_flags(tiny_sd, tmp_path / "out", "--instance_data_dir", tmp_path / "inst")
    code, err = run_train([*flags, "--resolution=100000"], capsys)
    assert_one_message(code, err, "--resolution 100000: must be a multiple of 8 from 8 to 4096", "1024 for SDXL")
    assert err.count("--resolution") == 1


def test_resolution_whose_largest_bucket_cannot_fit_is_refused_with_the_estimate(tmp_path, tiny_sd, image_factory,
                                                                                 no_model_loads, capsys, monkeypatch):
    import dbtools.core.env

    monkeypatch.setattr(dbtools.core.env, "gpu_memory_gib", lambda index=0: None)
    monkeypatch.setattr(dbtools.core.env, "ram_gib", lambda: 3.0, raising=False)
    captioned(tmp_path / "inst", image_factory)
    flags = train_flags(tiny_sd, tmp_path / "out", "--instance_data_dir", tmp_path / "inst", "--aspect_ratio_bucketing")
    code, err = run_train([*flags, "--resolution=2048"], capsys)
    assert_one_message(code, err, "--resolution 2048: one image of the largest bucket (2048x2048 pixels) needs at "
                       "least 4.0 GiB to encode, more than this machine's 3.0 GiB of memory")
    monkeypatch.setattr(dbtools.core.env, "gpu_memory_gib", lambda index=0: 1.5)  # a GPU encodes in its own memory
    code, err = run_train([*flags, "--resolution=2048", "--mixed_precision=bf16"], capsys)
    assert_one_message(code, err, "needs at least 2.0 GiB to encode, more than this machine's 1.5 GiB of GPU")
    from dbtools.train.config import TrainConfig
    from dbtools.train.setup import bucket_memory_problems

    assert bucket_memory_problems(TrainConfig(resolution=1024, mixed_precision="bf16")) == []


def saved_unet(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_seed_minus_one_draws_a_seed_that_is_logged_saved_and_repeats_the_run(tmp_path, tiny_sd, image_factory,
                                                                              capsys, caplog):
    caplog.set_level(logging.INFO)
    captioned(tmp_path / "inst", image_factory)
    data = ["--instance_data_dir", tmp_path / "inst", "--hflip"]
    code, err = run_train(train_flags(tiny_sd, tmp_path / "drawn", *data, "--seed=-1"), capsys)
    assert code == 0, err
    seed = json.loads((tmp_path / "drawn" / "1" / "args.json").read_text())["seed"]
    assert 0 <= seed < 2**32
    assert f"seed: {seed} for --seed -1 (saved in args.json; --seed {seed} repeats this run)" in caplog.text
    code, err = run_train(train_flags(tiny_sd, tmp_path / "again", *data, f"--seed={seed}"), capsys)
    assert code == 0, err
    drawn, again = saved_unet(tmp_path / "drawn" / "1"), saved_unet(tmp_path / "again" / "1")
    assert all((drawn[k] == again[k]).all() for k in drawn)


def test_every_process_takes_the_main_process_drawn_seed_and_its_held_out_images(tmp_path, image_factory,
                                                                                  monkeypatch):
    """What `torchrun --nproc_per_node 2 train_dreambooth.py --seed -1` relies on: the main
    process's seed goes to every process, which chooses the held-out images with it."""
    import dataclasses
    import types

    import accelerate.utils

    from dbtools.train import setup as S
    from dbtools.train.config import TrainConfig

    for i in range(6):
        captioned(tmp_path / "inst", image_factory, f"{i}.png")
    cfg = TrainConfig(instance_data_dir=str(tmp_path / "inst"), read_prompts_from_txts=True, validation_split=0.5,
                      output_dir=str(tmp_path / "out"), seed=1)
    concepts = cfg.concepts()
    plan, _ = S.data_plan(cfg, concepts)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects, from_process=0: [2])
    agreed, agreed_plan = S.agree_on_seed(cfg, -1, types.SimpleNamespace(num_processes=2), concepts, plan)
    assert agreed.seed == 2 and agreed_plan.validation != plan.validation
    assert agreed_plan == S.data_plan(dataclasses.replace(cfg, seed=2), concepts)[0]


@pytest.mark.parametrize("seed", ["-2", str(2**32)])
def test_other_out_of_range_seeds_are_one_message(tmp_path, tiny_sd, image_factory, no_model_loads, capsys, seed):
    captioned(tmp_path / "inst", image_factory)
    code, err = run_train(train_flags(tiny_sd, tmp_path / "out", "--instance_data_dir", tmp_path / "inst",
                                      f"--seed={seed}"), capsys)
    assert_one_message(code, err, f"--seed {seed}: must be from -1 to 4294967295 (a seed from 0 to 4294967295, "
                                  "or -1 to draw one")


def test_captions_cut_by_the_text_encoder_are_counted_once_per_run(tmp_path, tiny_sd, image_factory, capsys, caplog):
    caplog.set_level(logging.INFO)
    captioned(tmp_path / "inst", image_factory, "short.png", "sks toy")
    long_one = captioned(tmp_path / "inst", image_factory, "long.png", ", ".join(["sks toy on a red table"] * 30))
    flags = train_flags(tiny_sd, tmp_path / "out", "--instance_data_dir", tmp_path / "inst")
    code, err = run_train([*flags, "--max_train_steps=2"], capsys)
    assert code == 0, err
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("captions: ")]
    assert len(notes) == 1, notes
    assert "captions: 1 of 2 are longer than the text encoder's 77 tokens and are cut (by " in notes[0]
    assert f"Shorten them; the longest is the prompt of {long_one} (" in notes[0]


# --------------------------------------------------------------------------- resuming


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_sd):
    """A 2-step run with checkpoints at steps 1 and 2: (its root, its training flags)."""
    from tests.conftest import make_image

    root = tmp_path_factory.mktemp("checkpointed")
    for i in range(2):
        img = make_image(root / "inst" / f"{i}.png")
        Path(f"{img}.txt").write_text(f"sks toy {i}", encoding="utf-8")
    flags = train_flags(tiny_sd, root / "out", "--instance_data_dir", root / "inst", "--seed=5",
                        "--checkpointing_steps=1")
    flags[flags.index("--max_train_steps=1")] = "--max_train_steps=2"
    assert train_dreambooth.main(train_dreambooth.parse_args(flags)) == 0
    return root, flags


def run_copy(checkpointed, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the checkpointed run's output folder, and flags that resume it from `latest`."""
    root, flags = checkpointed
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    flags = [f if f != str(root / "out") else str(out) for f in flags]
    return out, [*flags, "--resume_from_checkpoint=latest", "--max_train_steps=3"]


@pytest.mark.parametrize("damage,needle", [
    ("missing", "optimizer.bin: missing"),
    ("cut", "optimizer.bin: cut short"),
    ("empty", "scheduler.bin: empty"),
    ("weights", "diffusion_pytorch_model.safetensors: not a valid .safetensors file"),
])
def test_damaged_or_incomplete_checkpoint_is_named_so_in_preflight(checkpointed, tmp_path, no_model_loads, capsys,
                                                                  damage, needle):
    out, flags = run_copy(checkpointed, tmp_path)
    ckpt = out / "checkpoint-2"
    if damage == "missing":
        (ckpt / "optimizer.bin").unlink()
    elif damage == "cut":  # an incomplete Drive sync
        data = (ckpt / "optimizer.bin").read_bytes()
        (ckpt / "optimizer.bin").write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        (ckpt / "scheduler.bin").write_bytes(b"")
    else:
        (ckpt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4096)
    code, err = run_train(flags, capsys)
    assert_one_message(code, err, needle, f"{ckpt} is damaged or incomplete",
                       f"resume from an earlier checkpoint (--resume_from_checkpoint {out / 'checkpoint-1'}")
    assert "could run code" not in err and "tampered" not in err


def test_a_readable_file_that_would_run_code_is_still_a_security_refusal(checkpointed, tmp_path, no_model_loads,
                                                                         capsys):
    out, flags = run_copy(checkpointed, tmp_path)
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(pickle.dumps(print))
    code, err = run_train(flags, capsys)
    assert_one_message(code, err, "optimizer.bin: refused: loading it could run code")
    assert "damaged" not in err


def test_resume_with_settings_that_break_an_exact_resume_names_them(checkpointed, tmp_path, no_model_loads, capsys,
                                                                    image_factory):
    out, flags = run_copy(checkpointed, tmp_path)
    captioned(tmp_path / "other", image_factory)
    code, err = run_train([*flags, "--resolution=64", "--train_batch_size=2", "--instance_data_dir",
                           str(tmp_path / "other"), "--learning_rate=5e-4"], capsys)
    assert_one_message(code, err, f"{out / 'checkpoint-2'} was written with other settings",
                       "--resolution: 32 in the checkpoint, 64 now", "--train_batch_size: 1 in the checkpoint, 2 now",
                       f"--instance_data_dir: '{checkpointed[0] / 'inst'}' in the checkpoint, '{tmp_path / 'other'}' "
                       "now", "add --resume_with_changes")
    assert "--learning_rate" not in err  # learning-rate settings and the step count may change


def test_resume_with_changes_goes_on_with_a_warning(checkpointed, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out, flags = run_copy(checkpointed, tmp_path)
    code, err = run_train([*flags, "--resolution=64", "--resume_with_changes"], capsys)
    assert code == 0, err
    assert "with changed settings (--resume_with_changes): --resolution: 32 in the checkpoint, 64 now" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text and (out / "3" / "model_index.json").is_file()


def test_resume_with_seed_minus_one_takes_the_checkpoints_seed(checkpointed, tmp_path, capsys):
    out, flags = run_copy(checkpointed, tmp_path)
    code, err = run_train([f if f != "--seed=5" else "--seed=-1" for f in flags], capsys)
    assert code == 0, err
    assert json.loads((out / "3" / "args.json").read_text())["seed"] == 5


# --------------------------------------------------------------------------- generate --from_png


def edited_png(path: Path, image_factory, **changes) -> Path:
    """A PNG carrying generate's settings, edited by hand (`changes`)."""
    from PIL import Image

    from dbtools.after.generate import png_metadata

    settings = {**dict(prompt="a toy", negative_prompt="", seed=3, steps=2, guidance_scale=7.5, width=32, height=32,
                       scheduler="ddim", model="m"), **changes}
    image_factory(path)
    with Image.open(path) as img:
        img.load()
        img.save(path, pnginfo=png_metadata(settings))
    return path


@pytest.mark.parametrize("changes,needle", [
    (dict(width=100_000), "width=100000: use a multiple of 8 from 8 to 4096"),
    (dict(seed=2**70), f"seed={2**70}: use a seed from 0 to {2**64 - 1}"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan: use a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale=inf: use a finite number"),
    (dict(prompt="a toy " * 500_000), "prompt of 3,000,000 characters: at most 10,000"),
])
def test_generate_from_an_edited_png_gets_the_flags_range_checks(tmp_path, tiny_sd, image_factory, capsys,
                                                                 monkeypatch, changes, needle):
    import dbtools.after.generate

    def refuse(*a, **k):
        raise AssertionError("the pipeline was loaded for settings that cannot work")

    monkeypatch.setattr(dbtools.after.generate, "load_inference_pipeline", refuse)
    png = edited_png(tmp_path / "edited.png", image_factory, **changes)
    code = cli.main(["generate", "--model", str(tiny_sd), "--from_png", str(png), "--out_dir", str(tmp_path / "g")])
    assert_one_message(code, capsys.readouterr().err, f"--from_png {png}", needle)
    flag, value = next(iter(changes.items()))
    if flag != "prompt":  # the same value given as a flag gets the same message
        code = cli.main(["generate", "--model", str(tiny_sd), "--prompt", "a toy", f"--{flag}={value}"])
        assert_one_message(code, capsys.readouterr().err, needle)
