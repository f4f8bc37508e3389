"""Training flags declared once: the parser and the range checks are made from `TrainConfig`'s
fields, and the sub-configs are views of it."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from dbtools import cli
from dbtools.after.evaluate import EvalConfig
from dbtools.train.classgen import ClassGenConfig
from dbtools.train.config import (
    MAX_SEED,
    TrainConfig,
    build_parser,
    declared_flags,
    flag_problems,
    range_problems,
    view,
)
from dbtools.train.data import DataConfig

BEFORE = Path(__file__).parent / "data" / "train_flags_before.json"
"""How the hand-written parser (two statements per flag) parsed each flag: its defaults and, per
flag, a few command lines (a value, `--flag=value`, a wrong value, an abbreviation) and what
they gave ("error" for a refusal)."""


def parse(argv: list[str]) -> dict | str:
    parser = build_parser()
    try:
        return vars(parser.parse_args(argv))
    except SystemExit:
        return "error"


def test_every_old_flag_string_parses_to_the_same_value(capsys):
    before = json.loads(BEFORE.read_text(encoding="utf-8"))
    now = parse([])
    assert {k: now[k] for k in before["defaults"]} == before["defaults"]  # flags added since keep their own
    for argv, expected in before["cases"]:
        got = parse(argv)
        if got != "error":
            got = {k: v for k, v in got.items() if now[k] != v}
        assert got == expected, argv
    capsys.readouterr()  # argparse's messages for the refused ones


def test_each_field_is_its_flag_with_its_default_help_and_choices():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert [f.name for f, _ in declared_flags()] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(actions) == {f.name for f in dataclasses.fields(TrainConfig)}
    for f, spec in declared_flags():
        action = actions[f.name]
        assert (action.default, action.help, action.choices) == (f.default, spec.help.replace("%", "%%"),
                                                                  spec.choices), f.name
    assert TrainConfig.from_args(parser.parse_args([])) == TrainConfig()


# One value just outside each range the flags had before, and one just inside.
OUT_OF_RANGE = [
    ("resolution", 100_000, 4096), ("resolution", 100, 8), ("seed", -2, -1), ("seed", MAX_SEED + 1, MAX_SEED),
    ("train_batch_size", 0, 1), ("gradient_accumulation_steps", 0, 1), ("n_save_sample", 0, 1),
    ("save_interval", 0, 1), ("max_nonfinite_steps", 0, 1), ("lora_rank", 0, 1), ("sample_batch_size", 0, 1),
    ("checkpointing_steps", 0, 1), ("max_train_steps", 0, 1), ("checkpoints_total_limit", 0, 1),
    ("caption_dropout", 1.5, 1.0), ("keep_tokens", -1, 0), ("learning_rate", 0.0, 1e-9),
    ("learning_rate", float("nan"), 1e-4), ("adam_beta1", 1.0, 0.0), ("adam_beta2", float("inf"), 0.999),
    ("adam_weight_decay", -0.1, 0.0), ("adam_epsilon", -1e-8, 0.0), ("max_grad_norm", -1.0, 0.0),
    ("prior_loss_weight", float("nan"), 0.0), ("ema_decay", 1.5, 1.0), ("save_guidance_scale", -1.0, 0.0),
    ("lr_power", 0.0, 0.5), ("offset_noise_strength", -0.1, 0.0), ("snr_gamma", 0.0, 5.0),
    ("lr_warmup_steps", -3, 0), ("num_class_images", -1, 0), ("save_min_steps", -1, 0),
    ("save_infer_steps", -1, 0), ("num_train_epochs", -1, 0), ("lr_num_cycles", -1, 0),
    ("dataloader_num_workers", -1, 0), ("num_validation_images", -1, 0), ("log_interval", 0, 1),
    ("validation_steps", 0, 1), ("validation_split", 1.0, 0.0), ("best_step_tolerance", -1, 0),
    ("drift_tolerance", float("nan"), 0.0), ("eval_num_samples", 0, 1), ("lr_scheduler", "cosin", "cosine"),
    ("output_layout", "kohya", "diffusers"), ("mixed_precision", "fp8", "bf16"),
    ("prior_generation_precision", "fp8", "fp32"),
    # the flow-matching flags added since
    ("logit_std", 0.0, 0.5), ("logit_mean", float("inf"), -1.0), ("mode_scale", -1.0, 0.0),
    ("guidance_scale", -1.0, 0.0), ("max_sequence_length", 513, 512), ("max_sequence_length", 0, 1),
    ("weighting_scheme", "uniform", "logit_normal"), ("quantize_base", "fp8", "nf4"),
]


@pytest.mark.parametrize("name,bad,good", OUT_OF_RANGE)
def test_each_range_is_one_message_in_one_style_naming_the_flag(name, bad, good):
    assert range_problems(TrainConfig(**{name: good})) == []
    problems = range_problems(TrainConfig(**{name: bad}))
    assert len(problems) == 1 and problems[0].startswith(f"--{name} {bad}: must be "), problems
    assert problems[0].endswith("."), problems


def test_range_messages_say_the_range_and_the_fix():
    cfg = TrainConfig(resolution=100, learning_rate=float("nan"), validation_split=1.0, seed=-2, keep_tokens=-1,
                      checkpoints_total_limit=0, lr_scheduler="cosin")
    assert range_problems(cfg) == [
        "--resolution 100: must be a multiple of 8 from 8 to 4096 (the models' own sizes: 512 for SD 1.x, 768 for "
        "SD 2.x, 1024 for SDXL).",
        "--keep_tokens -1: must be at least 0.",
        f"--seed -2: must be from -1 to {MAX_SEED} (a seed from 0 to {MAX_SEED}, or -1 to draw one: it is logged "
        "and saved in args.json, so the run can be repeated).",
        "--learning_rate nan: must be a finite number above 0.",
        "--lr_scheduler cosin: must be one of linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup, piecewise_constant.",
        "--checkpoints_total_limit 0: must be at least 1 (or leave it out to keep all).",
        "--validation_split 1.0: must be a finite number from 0 to below 1 (a share of the instance images, "
        "e.g. 0.1).",
    ]
    assert all(p in flag_problems(cfg) for p in range_problems(cfg))


def test_a_flag_the_parser_refuses_is_refused_the_same_way_when_the_notebook_builds_the_config(tmp_path,
                                                                                              capsys):
    """The notebook and tests build `TrainConfig` without the parser: the choices still hold."""
    code = cli.main(["train", "--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir",
                     str(tmp_path), "--output_layout", "kohya"])
    assert code == 2 and "invalid choice: 'kohya'" in capsys.readouterr().err
    cfg = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", output_layout="kohya",
                      mixed_precision="fp8")
    assert flag_problems(cfg) == ["--mixed_precision fp8: must be one of no, fp16, bf16.",
                                  "--output_layout kohya: must be one of shivam, diffusers."]


def test_sub_configs_are_views_of_the_training_config():
    argv = shlex.split("--resolution 96 --aspect_ratio_bucketing --center_crop --hflip --train_batch_size 3 "
                       "--caption_dropout 0.2 --shuffle_captions --keep_tokens 2 --seed 7 --num_class_images 9 "
                       "--sample_batch_size 5 --prior_generation_precision bf16 --output_dir out --eval_prompts "
                       "a b --likeness_model dino --clip_model clip --eval_num_samples 6 --best_step_tolerance 0.2 "
                       "--drift_tolerance 0.3 --instance_prompt sks")
    cfg = TrainConfig.from_args(build_parser().parse_args(argv))
    assert view(DataConfig, cfg, bucket_step=16) == DataConfig(
        resolution=96, bucket_step=16, aspect_ratio_bucketing=True, center_crop=True, hflip=True,
        train_batch_size=3, caption_dropout=0.2, shuffle_captions=True, keep_tokens=2, seed=7)
    assert view(ClassGenConfig, cfg, precision=cfg.prior_generation_precision) == ClassGenConfig(
        num_class_images=9, sample_batch_size=5, seed=7, precision="bf16")
    assert view(EvalConfig, cfg, num_samples=cfg.eval_num_samples) == EvalConfig(
        "out", eval_prompts=["a", "b"], instance_prompt="sks", likeness_model="dino", clip_model="clip",
        num_samples=6, seed=7, drift_tolerance=0.3)
