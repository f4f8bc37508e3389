"""What one training step, the held-out loss and the save schedule promise, pinned on the
tiny models or on small stand-ins driven through the training code itself (CPU)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dbtools.train import loop as T
from dbtools.train import outputs as O
from dbtools.train import setup as S
from dbtools.train.config import TrainConfig
from dbtools.train.watch import Watch
from tests.conftest import train_config as config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def images(tmp_path, captioned_factory) -> dict[str, Path]:
    """Two captioned instance images, and three held-out ones in two shapes (two size groups)."""
    return {"inst": captioned_factory(tmp_path / "inst", sizes=[(64, 48), (48, 64)],
                                      colors=[(200, 0, 0), (200, 40, 0)]),
            "held": captioned_factory(tmp_path / "held", sizes=[(64, 32), (64, 32), (32, 64)],
                                      colors=[(0, 0, 200), (0, 60, 200), (0, 120, 200)], name="held_{i}.png",
                                      caption="a photo of sks toy, held {i}")}


def make_run(model, images, out, **kw) -> T.Run:
    """A run set up as `train` sets it up (pre-flight, accelerator, models, data), before step 0."""
    cfg = config(model, images["inst"], out, **kw)
    _, plan = S.preflight(cfg)
    return T.setup(cfg, plan, S.make_accelerator(cfg))


# --------------------------------------------------------------------------- held-out loss


def test_validation_loss_uses_the_ema_weights_when_ema_is_on(tmp_path, images, tiny_sd):
    run = make_run(tiny_sd, images, tmp_path / "out", use_ema=True, validation_data_dir=str(images["held"]))
    ema_loss = run.held_out.loss(run)  # before any step the EMA equals the UNet
    with torch.no_grad():
        for p in run.unet.parameters():  # the trained weights move; the EMA does not
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained_loss = run.held_out.loss(run)
    assert abs(trained_loss - ema_loss) > 1e-3 * ema_loss
    assert O.log_validation_loss(run, 1) == pytest.approx(ema_loss, rel=1e-6)
    assert run.held_out.loss(run) == trained_loss  # the trained weights are back in the UNet
    # Without --use_ema (setup makes no EMA) the trained weights are scored.
    assert O.log_validation_loss(dataclasses.replace(run, ema=None), 2) == pytest.approx(trained_loss, rel=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["validation_loss"]) for r in logged] == [(1, pytest.approx(ema_loss, rel=1e-6)),
                                                                  (2, pytest.approx(trained_loss, rel=1e-6))]


def test_held_out_loss_is_the_mean_over_images_whatever_their_size_groups(tmp_path, images, tiny_sd, monkeypatch):
    import dbtools.after.evaluate

    run = make_run(tiny_sd, images, tmp_path / "out", resolution=64, aspect_ratio_bucketing=True,
                   validation_data_dir=str(images["held"]))
    groups = []
    real = dbtools.after.evaluate.validation_loss

    def spy(unet, latents, *a, **k):
        groups.append((latents.shape[0], real(unet, latents, *a, **k)))
        return groups[-1][1]

    monkeypatch.setattr(dbtools.after.evaluate, "validation_loss", spy)
    loss = run.held_out.loss(run)
    assert sorted(n for n, _ in groups) == [1, 2]  # two wide images in one group, the tall one alone
    (n1, l1), (n2, l2) = groups
    assert abs(l1 - l2) > 1e-3  # so weighting by group size matters
    assert loss == pytest.approx((n1 * l1 + n2 * l2) / 3, rel=1e-9)


# --------------------------------------------------------------------------- a non-finite step


def _state(run: T.Run) -> dict:
    """Everything a step may change, copied: weights, optimizer state, EMA and schedule."""
    return {"weights": [p.detach().clone() for p in run.params],
            "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "ema": [p.clone() for p in run.ema.shadow_params] + [run.ema.optimization_step],
            "schedule": run.lr_scheduler.state_dict(), "lr": run.lr_scheduler.get_last_lr()}


def _identical(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_nonfinite_step_changes_nothing_and_holds_the_schedule(tmp_path, images, tiny_sd, monkeypatch):
    """Weights, AdamW state, EMA and the learning-rate schedule after a skipped step are
    bit-identical to before it; the schedule goes on from where it was at the next good step."""
    real_loss, real_step = T.compute_loss, T.train_step
    monkeypatch.setattr(T, "compute_loss", lambda run, i: real_loss(run, i) * (float("nan") if i == 1 else 1.0))
    states, lrs = [], []

    def recording(run, step):
        before = _state(run)
        loss = real_step(run, step)
        states.append((before, _state(run), loss))
        lrs.append(run.lr_scheduler.get_last_lr()[0])
        return loss

    monkeypatch.setattr(T, "train_step", recording)
    result = T.train(config(tiny_sd, images["inst"], tmp_path / "out", use_ema=True, max_train_steps=4,
                            lr_scheduler="linear", learning_rate=1e-3))
    assert result.skipped_steps == 1 and [loss is None for _, _, loss in states] == [False, True, False, False]
    before, after, _ = states[1]
    for key in before:
        assert _identical(before[key], after[key]), key
    for before, after, _ in (states[0], states[2]):  # a good step does change each of them
        assert all(not _identical(before[k], after[k]) for k in before)
    # Linear decay over 4 steps counts the 3 applied ones: 1e-3 x (1 - applied / 4).
    assert lrs == pytest.approx([7.5e-4, 7.5e-4, 5e-4, 2.5e-4], rel=1e-9)


# --------------------------------------------------------------------------- gradient accumulation


def _samples(n: int):
    gen = torch.Generator().manual_seed(0)
    return torch.randn((n, 4, 8, 8), generator=gen), torch.randn((n, 4, 8, 8), generator=gen)


def _accumulation_run(tmp_path, micro_batch: int, accum: int, max_grad_norm: float):
    """A stand-in run whose micro-batch `i` is samples `i*b .. i*b+b-1` of a fixed set, its
    gradients recorded as the optimizer receives them (AdamW would hide a wrong scale)."""
    from dbtools.families.losses import dreambooth_loss

    cfg = TrainConfig(output_dir=str(tmp_path / f"out{micro_batch}"), report_to="none", train_batch_size=micro_batch,
                      gradient_accumulation_steps=accum, max_grad_norm=max_grad_norm)
    acc = S.make_accelerator(cfg)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))
    received = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            received.append([p.grad.clone() for p in model.parameters()])
            return super().step(closure)

    model, opt = acc.prepare(model, Recording(model.parameters(), lr=1e-3))
    x, y = _samples(4)

    def loss_of(run, micro):
        rows = slice(micro * micro_batch, (micro + 1) * micro_batch)
        return dreambooth_loss(model(x[rows]), y[rows], is_prior=torch.zeros(micro_batch, dtype=torch.bool),
                               prior_loss_weight=1.0)

    run = SimpleNamespace(accelerator=acc, cfg=cfg, params=list(model.parameters()), optimizer=opt, unet=model,
                          lr_scheduler=SimpleNamespace(step=lambda: None), ema=None)
    return run, loss_of, received


@pytest.mark.parametrize("max_grad_norm", [1e6, 1e-2], ids=["clipping on, not reached", "clipping binding"])
def test_accumulated_micro_batches_give_the_gradients_of_one_batch(tmp_path, monkeypatch, max_grad_norm):
    runs = {}
    for micro_batch, accum in ((1, 4), (4, 1)):
        run, loss_of, received = _accumulation_run(tmp_path, micro_batch, accum, max_grad_norm)
        monkeypatch.setattr(T, "compute_loss", loss_of)
        runs[micro_batch] = (T.train_step(run, 0), received)
    (loss_k, (grads_k,)), (loss_1, (grads_1,)) = runs[1], runs[4]
    assert loss_k == pytest.approx(loss_1, rel=1e-6)
    for g_k, g_1 in zip(grads_k, grads_1, strict=True):
        assert torch.allclose(g_k, g_1, rtol=1e-5, atol=1e-8)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads_k])).item()
    assert norm == pytest.approx(1e-2, rel=1e-4) if max_grad_norm == 1e-2 else norm > 1e-2


# --------------------------------------------------------------------------- half-precision frozen base


@pytest.mark.parametrize("kw", [dict(use_lora=True, lora_rank=2, train_text_encoder=True),
                                dict(train_text_encoder=True)], ids=["LoRA adapters", "full text encoder"])
def test_trained_parameters_stay_float32_under_a_bf16_frozen_base(tiny_sd, tmp_path, kw):
    """bf16 stands in for fp16 on the CPU: the frozen base is cast, the trained weights are not,
    and a step under autocast with a gradient scaler unscales float32 gradients into them."""
    cfg = config(tiny_sd, tmp_path, tmp_path / "out", **kw)
    models = S.load_models(cfg)
    params = S.prepare_modules(cfg, models, SimpleNamespace(device=torch.device("cpu")), torch.bfloat16)
    trained = {id(p) for p in params}
    assert params and {p.dtype for p in params} == {torch.float32}
    frozen = {p.dtype for m in (models.unet, models.text_encoder) for p in m.parameters() if id(p) not in trained}
    assert frozen == ({torch.bfloat16} if cfg.use_lora else set())
    assert models.vae.dtype == S.vae_dtype(models.vae, torch.bfloat16)

    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ids = models.tokenizer(["a photo of sks toy"], padding="max_length", return_tensors="pt").input_ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = models.text_encoder(ids)[0]
        pred = models.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                           torch.tensor([500]), states).sample
    scaler.scale(pred.float().pow(2).mean()).backward()
    scaler.unscale_(opt)
    assert {p.grad.dtype for p in params} == {torch.float32}
    assert all(torch.isfinite(p.grad).all() for p in params)
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert {p.dtype for p in params} == {torch.float32}
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


# --------------------------------------------------------------------------- when saves happen


class _Accelerator:
    is_main_process, is_local_main_process = True, False

    def log(self, values, step):
        pass

    def wait_for_everyone(self):
        pass

    def end_training(self):
        pass


@pytest.mark.parametrize(("max_steps", "start", "weights", "checkpoints"), [
    (13, 0, [6, 9, 12, 13], [4, 8, 12]),  # save_min_steps 6 is a save step itself
    (12, 0, [6, 9, 12], [4, 8, 12]),  # the last step is an interval step: saved once
    (13, 7, [9, 12, 13], [8, 12]),  # resumed at 7: only what is still due
])
def test_saves_happen_exactly_at_the_steps_the_flags_say(tmp_path, monkeypatch, max_steps, start, weights,
                                                         checkpoints):
    saved, checkpointed = [], []

    def save_weights(run, step, final=False):
        saved.append(step)
        return tmp_path / str(step)

    monkeypatch.setattr(O, "save_weights", save_weights)
    monkeypatch.setattr(T, "save_weights", save_weights)
    monkeypatch.setattr(O, "save_checkpoint", lambda run, step: checkpointed.append(step))
    monkeypatch.setattr(T, "train_step", lambda run, step: 0.5)
    cfg = TrainConfig(output_dir=str(tmp_path), save_interval=3, save_min_steps=6, checkpointing_steps=4,
                      max_train_steps=max_steps)
    run = SimpleNamespace(cfg=cfg, accelerator=_Accelerator(), max_train_steps=max_steps, start_step=start,
                          batches=contextlib.nullcontext(), lr_scheduler=SimpleNamespace(get_last_lr=lambda: [1.0]),
                          held_out=None, scorer=None, resumed_from=None, watch=Watch.disabled())
    step, skipped = T.loop(run)
    T.finish(run, step, skipped)
    assert (saved, checkpointed) == (weights, checkpoints)
