"""Evaluation (`dbtools.after.evaluate`): scores, validation loss and split, best step, files, command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dbtools.after import evaluate as ev
from dbtools.after.evaluate import EvalConfig, EvaluateError, best_step
from dbtools.families.base import Conditioning
from dbtools.families.sd import SD1


def noise_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def near_copy(img: Image.Image, seed: int = 1, amount: int = 8) -> Image.Image:
    arr = np.asarray(img).astype(int)
    jitter = np.random.default_rng(seed).integers(-amount, amount + 1, arr.shape)
    return Image.fromarray(np.clip(arr + jitter, 0, 255).astype(np.uint8))


def stripes() -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[::8] = 255
    arr[:, :20, 2] = 200
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def dino(tiny_scorers):
    return ev.load_likeness_model(str(tiny_scorers["dinov2"]))


# --------------------------------------------------------------------------- likeness


def test_likeness_of_an_image_with_itself_is_one(dino):
    img = noise_image(0)
    assert ev.likeness(dino, [img], [img]) == pytest.approx(1.0, abs=1e-5)


def test_likeness_ranks_near_copy_above_a_different_image(dino):
    img = noise_image(0)
    close = ev.likeness(dino, [img], [near_copy(img)])
    far = ev.likeness(dino, [img], [stripes()])
    assert 0.95 < close < 1.0
    assert far < close - 0.1


def test_likeness_takes_the_best_reference_for_each_sample_and_averages(dino):
    a, b = noise_image(0), stripes()
    # a matches itself among [b, a]: 1.0; b matches itself: 1.0
    assert ev.likeness(dino, [a, b], [b, a], batch_size=1) == pytest.approx(1.0, abs=1e-5)
    refs = ev.image_embeddings(dino, [b, a])  # embeddings computed once give the same answer
    assert ev.likeness(dino, [a, b], refs) == ev.likeness(dino, [a, b], [b, a])
    one_far = ev.likeness(dino, [a, b], [a])
    cross = ev.likeness(dino, [b], [a])
    assert one_far == pytest.approx((1.0 + cross) / 2, abs=1e-5)


def test_likeness_needs_images(dino):
    with pytest.raises(EvaluateError):
        ev.likeness(dino, [], [noise_image(0)])


# --------------------------------------------------------------------------- prompt fidelity


def test_prompt_fidelity_prefers_the_matching_caption(tiny_scorers):
    """The text projection is set so that "red car" embeds exactly like the red image and
    "blue dog" like the blue one: the answer is known."""
    clip = ev.load_clip_model(str(tiny_scorers["clip"]))
    red, blue = Image.new("RGB", (48, 48), (220, 20, 20)), noise_image(3)
    img = ev.image_embeddings(clip, [red, blue])  # unit rows e_red, e_blue
    tokens = clip.processor.tokenizer(["red car", "blue dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = clip.model.text_model(**tokens).pooler_output  # (2, hidden)
        # W @ pooled_i = e_i for both texts: W = E^T pinv(P^T)
        clip.model.text_projection.weight.copy_(img.T @ torch.linalg.pinv(pooled.T))
    match = ev.prompt_fidelity(clip, [red], ["red car"])
    other = ev.prompt_fidelity(clip, [red], ["blue dog"])
    assert match == pytest.approx(1.0, abs=1e-4)
    assert other == pytest.approx(float(img[0] @ img[1]), abs=1e-4)
    assert other < match - 0.05
    both = ev.prompt_fidelity(clip, [red, blue], ["red car", "blue dog"], batch_size=1)
    assert both == pytest.approx(1.0, abs=1e-4)


def test_prompt_fidelity_needs_one_prompt_per_image(tiny_scorers):
    clip = ev.load_clip_model(str(tiny_scorers["clip"]))
    with pytest.raises(EvaluateError, match="one prompt per image"):
        ev.prompt_fidelity(clip, [noise_image(0)], ["a", "b"])


def test_missing_local_score_model_is_a_user_error_naming_the_flag(tmp_path):
    with pytest.raises(EvaluateError, match="--likeness_model"):
        ev.load_likeness_model(str(tmp_path / "nope"))
    with pytest.raises(EvaluateError, match="--clip_model"):
        ev.load_clip_model(str(tmp_path / "nope"))


def test_default_eval_prompts_place_the_instance_prompt_in_new_scenes():
    prompts = ev.default_eval_prompts("a photo of sks dog.")
    assert prompts[0] == "a photo of sks dog on a beach"
    assert len(prompts) == len(ev.CONTEXTS) and all(p.startswith("a photo of sks dog ") for p in prompts)


# --------------------------------------------------------------------------- best step


def rows(likeness=None, fidelity=None, loss=None, steps=None, drift=None):
    n = len(next(x for x in (likeness, fidelity, loss, drift) if x is not None))
    steps = steps or [100 * (i + 1) for i in range(n)]
    out = []
    for i, s in enumerate(steps):
        r = {"step": s}
        for key, vals in (("likeness", likeness), ("prompt_fidelity", fidelity), ("validation_loss", loss),
                          ("class_drift", drift)):
            if vals is not None and vals[i] is not None:
                r[key] = vals[i]
        out.append(r)
    return out


def test_best_step_stops_before_fidelity_falls_past_the_tolerance():
    curves = rows(likeness=[0.2, 0.4, 0.6, 0.8, 0.9], fidelity=[0.30, 0.32, 0.27, 0.22, 0.18])
    assert best_step(curves, tolerance=0.05) == 300  # 0.27 >= 0.30 - 0.05; 0.22 is not
    assert best_step(curves, tolerance=0.005) == 200
    assert best_step(curves, tolerance=1.0) == 500


def test_best_step_uses_the_base_models_fidelity_when_known():
    curves = rows(likeness=[0.2, 0.4, 0.6, 0.8], fidelity=[0.30, 0.32, 0.27, 0.22])
    assert best_step(curves, tolerance=0.05, base_fidelity=0.35) == 200  # 0.27 < 0.30
    assert best_step(curves, tolerance=0.05, base_fidelity=0.25) == 400


def test_flat_validation_loss_excludes_nothing():
    curves = rows(likeness=[0.1, 0.5, 0.7], fidelity=[0.3, 0.3, 0.3], loss=[0.12, 0.12, 0.12])
    assert best_step(curves) == 300


def test_rising_validation_loss_excludes_the_step():
    curves = rows(likeness=[0.1, 0.5, 0.7, 0.9], loss=[0.20, 0.15, 0.16, 0.151])
    # 0.16 > 1.01 * 0.15 has risen; 0.151 is within 1 % of the lowest so far
    assert best_step(curves) == 400
    assert best_step(curves[:3]) == 200
    assert best_step(curves[:3], loss_tolerance=0.1) == 300


def test_steps_whose_class_drift_rose_past_the_tolerance_are_not_suggested():
    curves = rows(likeness=[0.2, 0.5, 0.7, 0.9], drift=[0.30, 0.33, 0.36, 0.45])
    # reference: the first save's drift 0.30; 0.33 is within 0.05, 0.36 and 0.45 are not
    assert best_step(curves) == 200
    assert best_step(curves, drift_tolerance=0.1) == 300
    assert best_step(curves, drift_tolerance=0.2) == 400
    assert best_step(curves, base_drift=0.2) is None  # every save drifted from the base model's 0.2
    assert best_step(curves, base_drift=0.32) == 300
    summary = ev.summarize(curves, drift_tolerance=0.1, base_drift=0.3)
    assert summary["best_step"] == 300 and "class_drift" in summary["rule"]
    assert (summary["drift_tolerance"], summary["base_drift"]) == (0.1, 0.3)


def test_ties_go_to_the_earliest_step():
    curves = rows(likeness=[0.5, 0.8, 0.6, 0.8], fidelity=[0.3, 0.3, 0.3, 0.3])
    assert best_step(curves) == 200
    assert best_step(list(reversed(curves))) == 200  # input order does not matter


def test_best_step_with_missing_scores_and_nothing_eligible():
    assert best_step([]) is None
    assert best_step(rows(fidelity=[0.3, 0.31])) == 100  # no likeness: earliest eligible
    assert best_step(rows(likeness=[0.5, None, 0.4])) == 100  # a step without likeness ranks last
    assert best_step(rows(likeness=[0.5, 0.6], fidelity=[0.1, 0.1]), base_fidelity=0.5) is None


# --------------------------------------------------------------------------- validation loss and split


class ZeroUnet:
    """Predicts zeros: the loss is then the mean square of the target."""

    def __call__(self, noisy, timesteps, states):
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()


def scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def test_validation_timesteps_are_a_fixed_grid():
    assert ev.validation_timesteps(1000, 4) == [125, 375, 625, 875]
    assert ev.validation_timesteps(1000, 1) == [500]


def test_validation_loss_uses_fixed_noise_on_the_grid():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(7)
    expected = np.mean([torch.randn(latents.shape, generator=gen).pow(2).mean().item() for _ in range(3)])
    got = ev.validation_loss(ZeroUnet(), latents, Conditioning(embeds=None), scheduler(), family=SD1, seed=7,
                            num_timesteps=3)
    assert got == pytest.approx(expected, rel=1e-6)


def test_validation_loss_follows_v_prediction():
    sched, latents = scheduler("v_prediction"), torch.ones(1, 4, 8, 8)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([500])
    expected = sched.get_velocity(latents, noise, t).pow(2).mean().item()
    assert ev.validation_loss(ZeroUnet(), latents, Conditioning(embeds=None), sched, family=SD1, seed=0,
                              num_timesteps=1) == pytest.approx(expected)


def test_validation_loss_is_identical_across_calls_and_leaves_the_training_rng_alone(tiny_sd):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    sched = DDPMScheduler.from_pretrained(tiny_sd / "scheduler")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    states = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    cond = Conditioning(embeds=states)
    first = ev.validation_loss(unet, latents, cond, sched, family=SD1, seed=42, num_timesteps=2)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(10)  # the training RNG moves on between validations
    assert ev.validation_loss(unet, latents, cond, sched, family=SD1, seed=42, num_timesteps=2) == first
    assert ev.validation_loss(unet, latents, cond, sched, family=SD1, seed=43, num_timesteps=2) != first


# --------------------------------------------------------------------------- files and plot


def test_metrics_lines_merge_per_step_and_summary_is_written(tmp_path):
    ev.append_metrics(tmp_path, {"step": 4, "validation_loss": 0.2})
    ev.append_metrics(tmp_path, {"step": 2, "likeness": 0.5, "prompt_fidelity": 0.3, "validation_loss": None})
    ev.append_metrics(tmp_path, {"step": 4, "likeness": 0.7, "prompt_fidelity": 0.29})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [4, 2, 4]
    assert "validation_loss" not in json.loads(lines[1])  # unknown scores are left out
    per_step = ev.read_metrics(tmp_path)
    assert per_step == [{"step": 2, "likeness": 0.5, "prompt_fidelity": 0.3},
                        {"step": 4, "validation_loss": 0.2, "likeness": 0.7, "prompt_fidelity": 0.29}]
    ev.write_summary(tmp_path, ev.summarize(per_step, tolerance=0.05))
    summary = json.loads((tmp_path / "metrics-summary.json").read_text())
    assert summary["best_step"] == 4 and summary["per_step"] == per_step
    assert "highest likeness" in summary["rule"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics-summary.json", "metrics.jsonl"]


def test_read_metrics_skips_broken_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "likeness": 0.1}\n{"step": 2, "lik')
    assert ev.read_metrics(tmp_path) == [{"step": 1, "likeness": 0.1}]
    ev.append_metrics(tmp_path, {"step": 3, "likeness": 0.3})  # a new line after a cut-off one
    assert [r["step"] for r in ev.read_metrics(tmp_path)] == [1, 3]


def test_plot_draws_every_curve_and_marks_the_best_step(tmp_path):
    per_step = rows(likeness=[0.2, 0.6, 0.9], fidelity=[0.3, 0.28, 0.2], loss=[0.2, 0.18, 0.19],
                    drift=[0.3, 0.31, 0.4])
    path = ev.save_plot(tmp_path, per_step, best=200)
    img = Image.open(path).convert("RGB")
    assert img.size == (ev.PLOT_WIDTH, 4 * ev.PANEL_HEIGHT + 44)
    arr = np.asarray(img)
    for color in ev.COLORS.values():
        assert (arr == color).all(axis=2).sum() > 50
    x = round((ev.MARGIN + 10 + ev.PLOT_WIDTH - 20) / 2)  # step 200 is the middle of 100..300
    column = arr[:, x - 1:x + 2]
    assert (column == ev.BEST_COLOR).all(axis=2).sum() >= 3 * 100


def test_plot_axes_tell_close_values_apart_and_label_the_steps():
    assert ev.axis_labels(-0.17512, -0.17488) == ("-0.1749", "-0.1751")  # was "-0.175" twice
    assert ev.axis_labels(0.2, 0.9) == ("0.9", "0.2")
    assert ev.axis_labels(0.5, 0.5) == ("0.5", None)
    assert ev.step_ticks([300, 100, 200]) == [100, 200, 300]
    ticks = ev.step_ticks(range(500, 20001, 500))
    assert len(ticks) == 8 and ticks[0] == 500 and ticks[-1] == 20000
    img = np.asarray(ev.plot_curves(rows(likeness=[0.2, 0.6, 0.9], fidelity=[0.3, 0.28, 0.2],
                                         loss=[0.2, 0.18, 0.19])).convert("L"))
    axis = len(ev.METRICS) * ev.PANEL_HEIGHT - 24
    below = img[axis + 1:axis + 20]  # tick marks and step numbers under the last panel
    assert (below < 128).sum(axis=0).nonzero()[0].size > 20


# --------------------------------------------------------------------------- the command


@pytest.fixture
def trained_output(tmp_path, tiny_sd, image_factory):
    """Two saved steps (2 and 4, the same tiny weights) with samples and args.json."""
    inst = tmp_path / "inst"
    for i in range(2):
        image_factory(inst / f"{i}.png", color=(40 * i, 200, 30))
    out = tmp_path / "out"
    args = {"instance_data_dir": str(inst), "instance_prompt": "sks toy", "save_sample_prompt": "sks toy",
            "save_infer_steps": 2, "save_guidance_scale": 3.0, "resolution": 32}
    for step in (2, 4):
        shutil.copytree(tiny_sd, out / str(step))
        (out / str(step) / "args.json").write_text(json.dumps(args))
        (out / str(step) / "samples").mkdir()
        Image.open(inst / "0.png").save(out / str(step) / "samples" / "0.png")
    return out


def test_evaluate_scores_every_step_and_writes_summary_and_plot(trained_output, tiny_scorers, capsys):
    from dbtools.cli import main

    argv = ["evaluate", "--output_dir", str(trained_output), "--likeness_model", str(tiny_scorers["dinov2"]),
            "--clip_model", str(tiny_scorers["clip"]), "--num_samples", "1", "--eval_prompts", "sks toy on a beach"]
    assert main(argv) == 0
    lines = [json.loads(x) for x in (trained_output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    for r in lines:
        assert r["likeness"] == pytest.approx(1.0, abs=1e-5)  # the sample is an instance image
        assert -1 <= r["prompt_fidelity"] <= 1
    assert lines[0]["prompt_fidelity"] == lines[1]["prompt_fidelity"]  # same weights, same seeds
    summary = json.loads((trained_output / "metrics-summary.json").read_text())
    assert summary["best_step"] == 2  # a tie goes to the earliest step
    assert Image.open(trained_output / "metrics.png").size[0] == ev.PLOT_WIDTH
    assert "best step: 2" in capsys.readouterr().out
    assert main(argv) == 0  # scored steps are not scored again
    assert len((trained_output / "metrics.jsonl").read_text().splitlines()) == 2


def test_evaluate_measures_class_drift_from_the_class_prompt(trained_output, tiny_scorers, capsys):
    from dbtools.after.preview import row_lines
    from dbtools.cli import main

    argv = ["evaluate", "--output_dir", str(trained_output), "--likeness_model", str(tiny_scorers["dinov2"]),
            "--clip_model", str(tiny_scorers["clip"]), "--num_samples", "1", "--eval_prompts", "sks toy on a beach",
            "--class_prompts", "a toy"]
    assert main(argv) == 0
    records = ev.read_metrics(trained_output)
    drifts = [r["class_drift"] for r in records]
    assert all(-1 <= d < 0.9999 for d in drifts)  # images of "a toy", not the instance image itself
    assert drifts[0] == drifts[1]  # same weights, same seeds: the same drift
    assert f"drift {drifts[0]:.3f}" in row_lines(2, records[0])
    # the class prompt comes from args.json when not given
    for step in (2, 4):
        args = json.loads((trained_output / str(step) / "args.json").read_text())
        (trained_output / str(step) / "args.json").write_text(json.dumps({**args, "class_prompt": "a toy"}))
    plan = ev.plan_evaluation(EvalConfig(str(trained_output)))
    assert plan.class_prompts == ["a toy"]


def test_evaluate_generates_likeness_samples_when_a_step_has_none(trained_output, tiny_scorers):
    shutil.rmtree(trained_output / "4" / "samples")
    cfg = EvalConfig(str(trained_output), likeness_model=str(tiny_scorers["dinov2"]),
                     clip_model=str(tiny_scorers["clip"]), num_samples=1, steps=[4])
    summary = ev.evaluate(cfg, progress=False)
    (record,) = summary["per_step"]
    assert record["step"] == 4 and 0 < record["likeness"] < 0.9999
    assert len(ev.plan_evaluation(cfg).eval_prompts) == len(ev.CONTEXTS)


def test_evaluate_input_problems_are_user_errors_before_loading(tmp_path, trained_output, capsys):
    from dbtools.cli import main

    assert main(["evaluate", "--output_dir", str(tmp_path / "missing")]) == 2
    assert "--output_dir" in capsys.readouterr().err
    with pytest.raises(EvaluateError, match="--instance_data_dir"):
        ev.plan_evaluation(EvalConfig(str(trained_output), instance_data_dir=str(tmp_path / "none")))
    with pytest.raises(EvaluateError, match="--steps"):
        ev.plan_evaluation(EvalConfig(str(trained_output), steps=[3]))


def test_refresh_summary_suggests_only_scored_steps(tmp_path):
    """Training logs validation loss at steps without weights; they are plotted, never suggested."""
    ev.append_metrics(tmp_path, {"step": 1, "validation_loss": 0.1})
    ev.append_metrics(tmp_path, {"step": 2, "validation_loss": 0.2, "likeness": 0.5, "prompt_fidelity": 0.3})
    ev.append_metrics(tmp_path, {"step": 3, "validation_loss": 0.3})
    summary = ev.refresh_summary(tmp_path)
    assert summary["best_step"] == 2 and [r["step"] for r in summary["per_step"]] == [1, 2, 3]
    assert ev.suggested_step(tmp_path) == 2 and (tmp_path / ev.PLOT_FILE).is_file()
