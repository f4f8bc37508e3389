"""Training's held-out validation loss, scores at each save, and samples that `generate` reproduces."""

from __future__ import annotations

from dbtools.train_config import TrainConfig, flag_problems, parse_args


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
    assert "--eval_num_samples must be at least 1" in text
    assert "--score_saves needs a prompt" in text and f"--likeness_model {tmp_path / 'no-dino'}" in text
