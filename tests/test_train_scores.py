"""Training's held-out validation loss, scores at each save, and samples that `generate` reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbtools.train import loop as T
from dbtools.train.config import TrainConfig, flag_problems, parse_args


def test_validation_and_score_flags_are_parsed_and_checked(tmp_path):
    args = parse_args(["--pretrained_model_name_or_path=m", "--instance_data_dir=d", "--validation_split=0.1",
                       "--score_saves", "--eval_prompts", "sks on a beach", "sks in a forest",
                       "--eval_num_samples=2", "--best_step_tolerance=0.1"])
    cfg = TrainConfig.from_args(args)
    assert (cfg.validation_split, cfg.score_saves, cfg.eval_prompts, cfg.eval_num_samples,
            cfg.best_step_tolerance) == (0.1, True, ["sks on a beach", "sks in a forest"], 2, 0.1)
    assert not flag_problems(cfg)
    assert TrainConfig().score_saves is False and TrainConfig().validation_split == 0.0
    bad = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir="d", validation_split=1.0,
                      best_step_tolerance=-1, eval_num_samples=0, score_saves=True,
                      likeness_model=str(tmp_path / "no-dino"))
    text = "\n".join(flag_problems(bad))
    assert "--validation_split 1.0" in text and "--best_step_tolerance -1" in text
    assert "--eval_num_samples 0: must be at least 1." in text
    assert "--score_saves needs a prompt" in text and f"--likeness_model {tmp_path / 'no-dino'}" in text


@pytest.fixture
def toy_data(tmp_path, captioned_factory):
    """Four captioned instance images: one is held out with --validation_split 0.25."""
    return captioned_factory(tmp_path / "inst", sizes=[(40, 40)] * 4,
                             colors=[(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)])


def train_flags(model, inst, out, *extra) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={inst}", f"--output_dir={out}",
            "--read_prompts_from_txts", "--resolution=32", "--train_batch_size=1", "--seed=3",
            "--learning_rate=1e-3", "--lr_warmup_steps=0", "--report_to=none", "--validation_split=0.25",
            "--validation_steps=2", *extra]


def batch_prompts(monkeypatch) -> list[str]:
    """Every instance prompt that reaches a training micro-batch."""
    from dbtools.train.data import DreamBoothData

    seen: list[str] = []
    original = DreamBoothData.micro_batch

    def spy(self, i):
        batch = original(self, i)
        seen.extend(batch["instance"]["prompts"])
        return batch

    monkeypatch.setattr(DreamBoothData, "micro_batch", spy)
    return seen


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_saves_score_validate_and_samples_equal_generate(tmp_path, toy_data, tiny_sd, tiny_scorers, monkeypatch,
                                                         capsys):
    from diffusers import StableDiffusionPipeline

    from dbtools.after import generate as G
    from dbtools.after.export import export_single_file
    from dbtools.after.preview import BEST_LABEL, row_lines, sample_grid, step_scores
    from dbtools.dataset.split import validation_split
    from dbtools.train.metrics import read_metrics

    out = tmp_path / "out"
    seen = batch_prompts(monkeypatch)
    capsys.readouterr()
    assert T.main(train_flags(tiny_sd, toy_data, out, "--max_train_steps=4", "--save_interval=2",
                              "--save_sample_prompt=a photo of sks toy", "--n_save_sample=2", "--save_infer_steps=2",
                              "--score_saves", f"--likeness_model={tiny_scorers['dinov2']}",
                              f"--clip_model={tiny_scorers['clip']}", "--eval_num_samples=1",
                              "--eval_prompts", "a photo of sks toy on a beach", "--class_prompt=a toy")) == 0
    # held-out images never reach a training batch
    _, held = validation_split(sorted(toy_data.glob("*.png")), 0.25, 3)
    held_prompts = {Path(f"{p}.txt").read_text() for p in held}
    assert len(held) == 1 and seen and held_prompts.isdisjoint(seen)
    # saves at 2 and 4: metrics with both steps, a summary with a best step, the grid shows them
    records = read_metrics(out)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"likeness", "prompt_fidelity", "class_drift", "validation_loss"} <= r.keys()
    summary = json.loads((out / "metrics-summary.json").read_text())
    assert summary["best_step"] in (2, 4) and (out / "metrics.png").is_file()
    scores, best = step_scores(out)
    assert best == summary["best_step"] and BEST_LABEL in row_lines(best, scores[best], best)
    assert sample_grid(out, thumb=32).height > 2 * 32  # rows grew to hold the scores
    # each sample is made again, pixel for pixel, by generate from the weights folder ...
    for step in (2, 4):
        for png in sorted((out / str(step) / "samples").glob("*.png")):
            settings = G.settings_from_png(png)
            assert settings["scheduler"] == "ddim" and settings["width"] == settings["height"] == 32
            flags = [a for k, v in settings.items() for a in (f"--{k}", str(v))]
            assert G.main(["--model", str(out / str(step)), *flags, "--out_dir", str(tmp_path / "gen")]) == 0
            again = Path([line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")][-1])
            assert np.array_equal(pixels(again), pixels(png)), png
    # ... and from the exported single file
    single = export_single_file(out / "4", tmp_path / "model.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(out / "4"), safety_checker=None)
    for png in sorted((out / "4" / "samples").glob("*.png")):
        assert np.array_equal(np.asarray(G.reproduce(pipe, png).image), pixels(png)), png

    # the same seed gives the same validation loss in another run
    again = tmp_path / "again"
    assert T.main(train_flags(tiny_sd, toy_data, again, "--max_train_steps=2", "--save_interval=1000")) == 0
    assert read_metrics(again)[0]["validation_loss"] == records[0]["validation_loss"]
