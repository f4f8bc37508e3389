"""DreamBooth training on the tiny models (CPU, a few steps, 32-64 px)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbtools import cli
from dbtools.core.redact import public_settings
from dbtools.families.prompts import PromptEncoder
from dbtools.train import checkpoints as C
from dbtools.train import config as TC
from dbtools.train import loop as T
from dbtools.train import outputs as O
from dbtools.train import setup as S
from dbtools.train.config import TrainConfig
from dbtools.train.setup import TrainError
from tests.conftest import train_config as config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.fixture
def dataset(tmp_path, captioned_factory):
    """Three captioned instance images of different shapes, plus a junk file."""
    inst = captioned_factory(tmp_path / "inst", sizes=[(64, 48), (48, 64), (64, 64)],
                             colors=[(200, 0, 0), (0, 200, 0), (0, 0, 200)], name="a red car_{i}.png",
                             caption="a photo of sks toy, red, number {i}")
    (inst / "Thumbs.db").write_bytes(b"junk")
    return inst


def weights(folder: Path, component: str = "unet") -> dict:
    sub = folder / component
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(str(sub / name))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --------------------------------------------------------------------------- command line


SHIVAM_DEFAULTS = dict(
    pretrained_vae_name_or_path=None, revision=None, tokenizer_name=None, instance_data_dir=None,
    class_data_dir=None, instance_prompt=None, class_prompt=None, save_sample_prompt=None,
    save_sample_negative_prompt=None, n_save_sample=4, save_guidance_scale=7.5, save_infer_steps=20,
    pad_tokens=False, with_prior_preservation=False, prior_loss_weight=1.0, num_class_images=100,
    output_dir="text-inversion-model", seed=None, center_crop=False, train_text_encoder=False,
    train_batch_size=4, sample_batch_size=4, num_train_epochs=1, max_train_steps=None,
    gradient_accumulation_steps=1, gradient_checkpointing=False, learning_rate=5e-6, scale_lr=False,
    lr_scheduler="constant", lr_warmup_steps=500, use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.999,
    adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0, push_to_hub=False, hub_token=None,
    hub_model_id=None, logging_dir="logs", log_interval=10, save_interval=10_000, save_min_steps=0,
    not_cache_latents=False, hflip=False, local_rank=-1, concepts_list=None, read_prompts_from_txts=False)
# Shivam's --resolution default is 512; ours is the model family's own size (decided at training time).
OUR_DEFAULTS = dict(resolution=None)
DIFFUSERS_DEFAULTS = dict(
    # diffusers saves checkpoints every 500 steps by default; Shivam (the default here) never does
    checkpointing_steps=None, checkpoints_total_limit=None, resume_from_checkpoint=None, validation_prompt=None,
    num_validation_images=4, validation_steps=100, snr_gamma=None, offset_noise=False,
    pre_compute_text_embeddings=False, report_to="tensorboard", allow_tf32=False,
    enable_xformers_memory_efficient_attention=False, set_grads_to_none=False, prior_generation_precision=None,
    variant=None, lr_num_cycles=1, lr_power=1.0, dataloader_num_workers=0, tokenizer_max_length=None,
    text_encoder_use_attention_mask=False)


def test_parser_accepts_both_flag_sets_with_their_defaults(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = TC.parse_args(["--pretrained_model_name_or_path", "m"])
    for name, default in {**SHIVAM_DEFAULTS, **DIFFUSERS_DEFAULTS, **OUR_DEFAULTS}.items():
        assert getattr(args, name) == default, name
    cfg = TrainConfig.from_args(args)
    assert cfg.mixed_precision is None and cfg.pretrained_model_name_or_path == "m"
    sys.path.insert(0, str(ROOT))
    import train_dreambooth

    assert vars(train_dreambooth.parse_args(["--mixed_precision", "bf16", "--use_lora", "--lora_rank", "8"])) == \
        vars(TC.parse_args(["--mixed_precision", "bf16", "--use_lora", "--lora_rank", "8"]))


def test_args_json_never_holds_secrets():
    cfg = TrainConfig(hub_token=TOKEN, save_sample_prompt=f"leaked {TOKEN}", pad_tokens=True, keep_tokens=2)
    text = json.dumps(public_settings(cfg))
    assert TOKEN not in text and "hub_token" not in text
    assert '"pad_tokens": true' in text and '"keep_tokens": 2' in text


def test_mixed_precision_falls_back_without_cuda():
    precision, warning = TC.resolve_mixed_precision("fp16", cuda=False)
    assert precision == "no" and "needs a CUDA GPU" in warning
    assert TC.resolve_mixed_precision("fp16", cuda=True) == ("fp16", None)
    assert TC.resolve_mixed_precision("bf16", cuda=False) == ("bf16", None)
    assert TC.resolve_mixed_precision(None, cuda=True) == ("no", None)


def test_8bit_adam_falls_back_to_adamw_with_a_warning(monkeypatch, caplog):
    params = [torch.nn.Parameter(torch.zeros(3))]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    opt = S.make_optimizer(TrainConfig(use_8bit_adam=True), params, "cpu")
    assert type(opt) is torch.optim.AdamW
    assert "bitsandbytes cannot run" in caplog.text


def test_latest_weights_and_checkpoint_see_only_complete_folders(tmp_path):
    for name in ("0/logs", "2", "10", ".tmp-30-abc", "checkpoint-5", "checkpoint-20", ".tmp-checkpoint-40-x"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("2", "10", ".tmp-30-abc"):
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "0" / "model_index.json").unlink(missing_ok=True)
    assert C.latest_weights(tmp_path) == tmp_path / "10"
    assert C.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert C.checkpoints_to_remove(tmp_path, 1) == [tmp_path / "checkpoint-5"]
    assert C.latest_weights(tmp_path / "nothing") is None


def test_preflight_lists_every_problem_before_loading_a_model(tmp_path, dataset, tiny_sd, monkeypatch, capsys):
    import dbtools.families.models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the pre-flight finished")

    monkeypatch.setattr(dbtools.families.models, "load_sd_components", no_loading)
    import importlib.util

    no_xformers = importlib.util.find_spec("xformers") is None
    (dataset / "a red car_1.png.txt").unlink()
    (dataset / "a red car_2.png.txt").write_text("  ")
    (dataset / "bad.png").write_bytes(b"\x89PNG not really")
    Path(f"{dataset / 'bad.png'}.txt").write_text("bad")
    code = cli.main(["train", "--pretrained_model_name_or_path", str(tiny_sd), "--instance_data_dir", str(dataset),
                   "--output_dir", str(tmp_path / "out"), "--read_prompts_from_txts", "--with_prior_preservation",
                   "--use_lora", "--use_ema", "--caption_dropout", "2",
                   *(["--enable_xformers_memory_efficient_attention"] if no_xformers else [])])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for expected in ("a red car_1.png: no caption file", "a red car_2.png.txt: caption file is empty",
                     "bad.png", "class_data_dir", "--use_ema", "--caption_dropout"):
        assert expected in err, expected
    assert not no_xformers or "xformers is not installed" in err
    assert not (tmp_path / "out").exists()


def test_empty_instance_folder_and_bad_model_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    code = cli.main(["train", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--instance_data_dir",
                   str(tmp_path / "empty"), "--instance_prompt", "sks"])
    err = capsys.readouterr().err
    assert code == 2 and "contains no images" in err and "no-model" in err and "does not exist" in err


# --------------------------------------------------------------------------- training runs


def test_seed_notebook_command_runs_unchanged(tmp_path, dataset, tiny_sd):
    """The seed notebook's training cell, with only paths and step counts made small."""
    concepts = tmp_path / "concepts_list.json"
    concepts.write_text(json.dumps([{"instance_prompt": "sks toy", "class_prompt": "a toy",
                                     "instance_data_dir": str(dataset), "class_data_dir": str(tmp_path / "class")}]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_dreambooth.py"),
           f"--pretrained_model_name_or_path={tiny_sd}", f"--pretrained_vae_name_or_path={tiny_sd / 'vae'}",
           f"--output_dir={out}", "--revision=fp16", "--with_prior_preservation", "--prior_loss_weight=1.0",
           "--seed=1337", "--resolution=32", "--train_batch_size=1", "--train_text_encoder",
           "--mixed_precision=fp16", "--use_8bit_adam", "--read_prompts_from_txts",
           "--gradient_accumulation_steps=1", "--learning_rate=1e-7", "--lr_scheduler=constant",
           "--lr_warmup_steps=0", "--num_class_images=1", "--sample_batch_size=4", "--max_train_steps=2",
           "--save_interval=1", "--save_sample_prompt=a photo of sks toy", f"--concepts_list={concepts}",
           f"--hub_token={TOKEN}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp16 mixed precision needs a CUDA GPU" in proc.stderr
    assert len(list((tmp_path / "class").glob("*.jpg"))) == 1
    for step in ("1", "2"):
        folder = out / step
        assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
        args = json.loads((folder / "args.json").read_text())
        assert args["revision"] == "fp16" and "hub_token" not in args
    assert list((out / "0" / "logs").rglob("events.out.tfevents*"))
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yml", ".yaml", ".txt") or "tfevents" in f.name:
            assert TOKEN.encode() not in f.read_bytes(), f
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out / "2")
    assert not list(out.glob(".tmp-*"))


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, dataset, tiny_sd):
    kw = dict(train_text_encoder=True, checkpointing_steps=2, max_train_steps=4, hflip=True,
              caption_dropout=0.3, save_single_file=True)
    full = T.train(config(tiny_sd, dataset, tmp_path / "full", **kw))
    assert full.weights_dir == tmp_path / "full" / "4" and full.global_step == 4
    assert (tmp_path / "full" / "checkpoint-2").is_dir() and (tmp_path / "full" / "checkpoint-4").is_dir()
    assert set(load_file(str(full.single_file))) and full.single_file.parent == full.weights_dir

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    (resumed_dir / ".tmp-checkpoint-3-halfwritten").mkdir()  # what a kill mid-save leaves
    resumed = T.train(config(tiny_sd, dataset, resumed_dir, resume_from_checkpoint="latest", **kw))
    assert resumed.global_step == 4 and resumed.resumed_from == resumed_dir / "checkpoint-2"
    assert not (resumed_dir / ".tmp-checkpoint-3-halfwritten").exists()
    base = weights(tiny_sd)
    assert any(not torch.equal(base[k], v) for k, v in weights(full.weights_dir).items())
    assert_same(weights(full.weights_dir), weights(resumed.weights_dir))
    assert_same(weights(full.weights_dir, "text_encoder"), weights(resumed.weights_dir, "text_encoder"))


@pytest.mark.slow
def test_sigkill_mid_checkpoint_then_resume_latest_matches(tmp_path, dataset, tiny_sd):
    """Kill -9 while checkpoint-4 is being written; `latest` resumes from checkpoint-2."""
    out = tmp_path / "killed"
    flags = [f"--pretrained_model_name_or_path={tiny_sd}", f"--instance_data_dir={dataset}",
             "--read_prompts_from_txts", "--resolution=32", "--train_batch_size=1", "--max_train_steps=5",
             "--seed=3", "--learning_rate=1e-3", "--lr_warmup_steps=0", "--report_to=none",
             "--checkpointing_steps=2", "--checkpoints_total_limit=1", "--save_interval=1000"]
    wrapper = tmp_path / "stall.py"
    wrapper.write_text(textwrap.dedent(f"""
        import sys, time
        import accelerate
        sys.path.insert(0, {str(ROOT)!r})
        import train_dreambooth
        real = accelerate.Accelerator.save_state
        def stalling(self, output_dir=None, **kw):
            if "checkpoint-4" in str(output_dir):
                open(output_dir + "/partial", "w").write("x")
                time.sleep(600)
            return real(self, output_dir, **kw)
        accelerate.Accelerator.save_state = stalling
        sys.exit(train_dreambooth.main(train_dreambooth.parse_args()))
    """))
    proc = subprocess.Popen([sys.executable, str(wrapper), f"--output_dir={out}", *flags], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not list(out.glob(".tmp-checkpoint-4-*/partial")):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert C.latest_checkpoint(out) == out / "checkpoint-2"
    resumed = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), f"--output_dir={out}",
                              "--resume_from_checkpoint=latest", *flags], env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'}" in resumed.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    assert not list(out.glob(".tmp-*"))
    # The reference runs in this process: use the subprocesses' single thread, since float
    # reductions may be ordered differently with another thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = T.train(config(tiny_sd, dataset, tmp_path / "straight", max_train_steps=5,
                                  checkpointing_steps=2))
    finally:
        torch.set_num_threads(threads)
    assert_same(weights(straight.weights_dir), weights(out / "5"))


def test_sd2_vprediction_with_buckets_ema_snr_and_validation(tmp_path, dataset, tiny_sd2):
    out = tmp_path / "out"
    result = T.train(config(
        tiny_sd2, dataset, out, resolution=64, aspect_ratio_bucketing=True, hflip=True, snr_gamma=5.0,
        offset_noise=True, use_ema=True, gradient_accumulation_steps=2, gradient_checkpointing=True,
        not_cache_latents=True, dataloader_num_workers=1, shuffle_captions=True, keep_tokens=1,
        max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=1, validation_prompt="a toy",
        validation_steps=3, num_validation_images=1,
        save_sample_prompt="sks toy", pad_tokens=True, report_to="tensorboard"))
    assert result.global_step == 3 and result.skipped_steps == 0
    assert list((out / "0" / "logs").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert (out / "validation" / "3" / "0.png").is_file()
    saved = weights(result.weights_dir)
    raw = load_file(str(out / "checkpoint-3" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = weights(tiny_sd2)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # saved weights are the EMA ones
    assert any(not torch.equal(saved[k], base[k]) for k in saved)
    sched = json.loads((result.weights_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    from PIL import Image

    assert Image.open(result.weights_dir / "samples" / "0.png").size == (64, 64)


def test_lora_weights_load_with_diffusers(tmp_path, dataset, tiny_sd):
    result = T.train(config(tiny_sd, dataset, tmp_path / "lora", use_lora=True, lora_rank=2,
                            train_text_encoder=True, save_sample_prompt="sks toy"))
    folder = result.weights_dir
    assert (folder / C.LORA_WEIGHTS).is_file() and not (folder / "unet").exists()
    assert (folder / "samples" / "0.png").is_file() and C.latest_weights(tmp_path / "lora") == folder
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(folder)
    saved = load_file(str(folder / C.LORA_WEIGHTS))
    assert any(k.startswith("unet.") for k in saved) and any(k.startswith("text_encoder.") for k in saved)
    lora_b = {k: v for k, v in pipe.unet.state_dict().items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # trained, not the zero init


# The first three losses of the seeded tiny run below (computed once, then pinned). Every
# random choice is a function of the seed and the file names, so any process gives them.
FIRST_LOSSES = [1.13901, 1.12645, 1.50943]


def test_first_three_losses_of_a_seeded_run_are_pinned(tmp_path, dataset, tiny_sd, monkeypatch):
    """Any change to noise, timesteps, target, weighting or data order moves these numbers."""
    losses = []
    real = T.train_step
    monkeypatch.setattr(T, "train_step", lambda run, step: losses.append(real(run, step)) or losses[-1])
    T.train(config(tiny_sd, dataset, tmp_path / "pinned", max_train_steps=3))
    assert losses == pytest.approx(FIRST_LOSSES, abs=1e-4)


def test_nonfinite_loss_is_skipped_then_aborts(tmp_path, dataset, tiny_sd, monkeypatch):
    real = T.compute_loss
    bad = {1}
    def sometimes_nan(run, i):
        return real(run, i) * (float("nan") if i in bad else 1.0)

    monkeypatch.setattr(T, "compute_loss", sometimes_nan)
    result = T.train(config(tiny_sd, dataset, tmp_path / "one", max_train_steps=3))
    assert result.skipped_steps == 1 and result.global_step == 3
    assert all(torch.isfinite(v).all() for v in weights(result.weights_dir).values())

    bad.update(range(100))
    with pytest.raises(TrainError, match="not finite.*3 steps in a row"):
        T.train(config(tiny_sd, dataset, tmp_path / "all", max_train_steps=10, max_nonfinite_steps=3))
    assert C.latest_weights(tmp_path / "all") is None


def test_push_to_hub_uses_upload_folder_and_login_token(tmp_path, monkeypatch):
    """Every call `push_to_hub` makes must fit `HfApi`'s real signatures (checked with
    `inspect.signature(...).bind`), so a renamed or removed parameter fails here."""
    import inspect

    import huggingface_hub
    from huggingface_hub import HfApi

    calls = []

    class CheckedApi(HfApi):
        def __init__(self, *args, **kwargs):
            inspect.signature(HfApi.__init__).bind(self, *args, **kwargs)
            calls.append(("init", kwargs.get("token", args[1] if len(args) > 1 else None)))

        def create_repo(self, *args, **kwargs):
            bound = inspect.signature(HfApi.create_repo).bind(self, *args, **kwargs)
            calls.append(("create_repo", bound.arguments["repo_id"]))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/me/{bound.arguments['repo_id']}")

        def upload_folder(self, *args, **kwargs):
            bound = inspect.signature(HfApi.upload_folder).bind(self, *args, **kwargs)
            calls.append(("upload_folder", bound.arguments["repo_id"], bound.arguments["folder_path"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", CheckedApi)
    repo = O.push_to_hub(TrainConfig(output_dir=str(tmp_path / "my-model")), tmp_path / "my-model" / "7")
    assert repo == "me/my-model"
    assert calls == [("init", None), ("create_repo", "my-model"),
                     ("upload_folder", "me/my-model", str(tmp_path / "my-model" / "7"))]


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path, dataset, tiny_sd):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(ROOT / "train_dreambooth.py"),
         f"--pretrained_model_name_or_path={tiny_sd}", f"--instance_data_dir={dataset}", "--read_prompts_from_txts",
         f"--output_dir={out}", "--resolution=32", "--train_batch_size=1", "--max_train_steps=2", "--seed=1",
         "--report_to=none", "--checkpointing_steps=2", "--train_text_encoder", "--use_ema"],
        env={**env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training on 2 process(es)" in proc.stderr
    assert (out / "2" / "model_index.json").is_file() and (out / "checkpoint-2").is_dir()
    # The EMA lives on the main process only, which saves it with the checkpoint.
    assert (out / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()


def test_cached_prompt_states_equal_encoding_the_batch_padded_to_its_longest(tiny_sd):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval()
    prompts = ["a red car", "a photo of a dog sitting in a green forest", ""]
    cached = PromptEncoder(tok, pad_tokens=False, max_length=None, use_attention_mask=False, cache=True)
    with torch.no_grad():
        ids = tok(prompts, padding="longest", return_tensors="pt").input_ids
        direct = te(ids)[0]
        got = cached.encode(prompts, te, "cpu")
        again = cached.encode(prompts[:1], te, "cpu")  # from the cache, cut to its own length
    assert got.shape == direct.shape and torch.allclose(got, direct, atol=1e-5)
    assert again.shape[1] == len(tok(prompts[0]).input_ids)
    padded = PromptEncoder(tok, pad_tokens=True, max_length=None, use_attention_mask=False, cache=False)
    with torch.no_grad():
        assert padded.encode(prompts[:1], te, "cpu").shape[1] == tok.model_max_length


# --------------------------------------------------------------------------- latent cache on disk


def _latents_log(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("latents:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_cache_dir_is_reused_by_a_new_run_and_only_edited_images_are_encoded(tmp_path, dataset, tiny_sd,
                                                                              monkeypatch, caplog):
    import logging

    from diffusers import AutoencoderKL

    caplog.set_level(logging.INFO, logger="dbtools.train.setup")
    cache = tmp_path / "latent-cache"
    real_encode = AutoencoderKL.encode
    encoded: list[int] = []

    def counting_encode(self, x, *a, **k):
        encoded.append(x.shape[0])
        return real_encode(self, x, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    first = T.train(config(tiny_sd, dataset, tmp_path / "first", cache_dir=str(cache)))
    assert _latents_log(caplog) == f"latents: 3 encoded, 0 read from {cache}"
    assert sum(encoded) == 3 and len(list(cache.rglob("*.safetensors"))) == 3

    def no_encoding(self, *a, **k):
        raise AssertionError("the VAE encoded an image whose latents are in the cache")

    caplog.clear()
    monkeypatch.setattr(AutoencoderKL, "encode", no_encoding)
    second = T.train(config(tiny_sd, dataset, tmp_path / "second", cache_dir=str(cache)))
    assert _latents_log(caplog) == f"latents: 0 encoded, 3 read from {cache}"
    assert_same(weights(first.weights_dir), weights(second.weights_dir))

    # Edit one image (new content, later mtime): exactly that one is encoded again.
    from PIL import Image

    edited = dataset / "a red car_1.png"
    Image.new("RGB", (48, 64), (10, 120, 240)).save(edited)
    os.utime(edited, ns=(time.time_ns(), time.time_ns() + 10**9))
    caplog.clear()
    encoded.clear()
    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    T.train(config(tiny_sd, dataset, tmp_path / "third", cache_dir=str(cache)))
    assert _latents_log(caplog) == f"latents: 1 encoded, 2 read from {cache}"
    assert sum(encoded) == 1 and len(list(cache.rglob("*.safetensors"))) == 4
    assert not list(cache.rglob(".tmp-*"))


# --------------------------------------------------------------------------- gradient clipping


def test_gradient_clipping_is_applied_to_every_trained_parameter_each_step(tmp_path, dataset, tiny_sd,
                                                                          monkeypatch):
    import accelerate
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    real = accelerate.Accelerator.clip_grad_norm_
    calls = []

    def spy(self, parameters, max_norm, norm_type=2):
        params = list(parameters)
        grads = [p.grad for p in params if p.grad is not None]
        before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        total = real(self, params, max_norm, norm_type)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        trained = {id(p) for m in self._models for p in m.parameters() if p.requires_grad}
        calls.append(dict(max_norm=max_norm, ids={id(p) for p in params}, trained=trained, n_models=len(
            self._models), n_grads=len(grads), before=float(before), total=float(total), after=float(after)))
        return total

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", spy)
    n_params = sum(1 for _ in UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").parameters()) + \
        sum(1 for _ in CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").parameters())
    T.train(config(tiny_sd, dataset, tmp_path / "small", max_grad_norm=1e-4, train_text_encoder=True,
                   gradient_accumulation_steps=2, max_train_steps=2, learning_rate=1.0))
    assert len(calls) == 2  # once per optimizer step, not per micro-batch
    for c in calls:
        assert c["max_norm"] == 1e-4
        assert c["n_models"] == 2 and c["ids"] == c["trained"] and len(c["ids"]) == n_params
        assert c["n_grads"] == n_params
        assert c["total"] == pytest.approx(c["before"], rel=1e-4) and c["total"] > 1e-3
        assert c["after"] <= 1e-4 * (1 + 1e-4)

    calls.clear()
    T.train(config(tiny_sd, dataset, tmp_path / "large", max_grad_norm=1e6, max_train_steps=1))
    (c,) = calls
    assert c["max_norm"] == 1e6 and c["n_models"] == 1 and c["ids"] == c["trained"]
    assert c["after"] == pytest.approx(c["before"], rel=1e-5)  # below the limit: untouched


def test_clipped_step_moves_the_weights_by_at_most_lr_times_max_norm(tmp_path, dataset, tiny_sd):
    """With adam_epsilon 1 and no weight decay, AdamW's first update of each weight is
    lr * g / (|g| + 1), whose norm is at most lr * ||g|| <= lr * max_grad_norm."""
    base = weights(tiny_sd)

    def change(max_grad_norm, out):
        result = T.train(config(tiny_sd, dataset, tmp_path / out, max_train_steps=1, learning_rate=1.0,
                                adam_epsilon=1.0, adam_weight_decay=0.0, max_grad_norm=max_grad_norm))
        trained = weights(result.weights_dir)
        return float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(trained[k].double() - base[k].double()) for k in base])))

    clipped, free = change(1e-4, "clipped"), change(0.0, "unclipped")
    assert 0 < clipped <= 1e-4 * 1.01
    assert free > 10 * clipped
