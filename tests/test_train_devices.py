"""Training paths that matter on GPUs, checked on the CPU with stand-ins.

The `meta` device stands in for `cuda` where a tensor must stay on the device, probes
such as `torch.cuda.is_bf16_supported` are monkeypatched, and reentrant checkpointing
is forced where an older transformers would use it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch

from dbtools.families.base import Components
from dbtools.families.sd import SD1
from dbtools.train import loop as T
from dbtools.train import outputs as O
from dbtools.train import setup as S
from dbtools.train.config import TrainConfig


@pytest.fixture
def dataset(tmp_path, image_factory):
    """Two captioned instance images."""
    inst = tmp_path / "inst"
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0)]):
        img = image_factory(inst / f"toy_{i}.png", size=(32, 32), color=colour)
        Path(f"{img}.txt").write_text(f"a photo of sks toy, red, number {i}", encoding="utf-8")
    return inst


def config(model, data, out, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(data), output_dir=str(out),
                read_prompts_from_txts=True, resolution=32, train_batch_size=1, max_train_steps=1, seed=3,
                learning_rate=1e-3, lr_warmup_steps=0, report_to="none", checkpointing_steps=1000,
                save_interval=1000, n_save_sample=1, save_infer_steps=1)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- processes and precision


def test_process_group_waits_hours_not_the_ten_minute_default(tmp_path):
    acc = S.make_accelerator(TrainConfig(output_dir=str(tmp_path), report_to="none"))
    assert acc.init_handler is not None and acc.init_handler.timeout >= timedelta(hours=1)


def _probe(monkeypatch, native: bool) -> list:
    """`is_bf16_supported` of a GPU that runs bf16 natively or, like a T4, only emulates it."""
    calls = []

    def probe(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", probe)
    return calls


def test_gpu_is_asked_about_bf16_only_when_bf16_is_requested(monkeypatch):
    calls = _probe(monkeypatch, native=True)
    for requested in ("no", "fp16"):
        assert S.usable_precision(requested, cuda=True) == (requested, None)
    assert calls == []  # asking wakes CUDA on GPU 0 in every process
    assert S.usable_precision("bf16", cuda=True) == ("bf16", None)
    assert calls == [False]


def test_emulated_bf16_is_not_support(monkeypatch):
    _probe(monkeypatch, native=False)
    precision, warning = S.usable_precision("bf16", cuda=True)
    assert precision == "no" and "does not support bf16" in warning


@pytest.mark.slow
def test_two_processes_share_class_image_generation(tmp_path, dataset, tiny_sd):
    import os
    import subprocess
    import sys

    from dbtools.train.classgen import image_index

    root = Path(__file__).resolve().parents[1]
    out, classes = tmp_path / "ddp", tmp_path / "class"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", str(root / "train_dreambooth.py"),
         f"--pretrained_model_name_or_path={tiny_sd}", f"--instance_data_dir={dataset}", "--read_prompts_from_txts",
         f"--output_dir={out}", "--resolution=32", "--train_batch_size=1", "--max_train_steps=1", "--seed=1",
         "--report_to=none", "--with_prior_preservation", f"--class_data_dir={classes}",
         "--class_prompt=a photo of a toy", "--num_class_images=4", "--sample_batch_size=1"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root),
             "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("class images: generating 2 for") == 2  # each process made half
    assert sorted(image_index(p) for p in classes.iterdir()) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- memory savers


def _prepared(tiny_sd, tmp_path, **kw):
    from types import SimpleNamespace

    cfg = config(tiny_sd, tmp_path, tmp_path / "out", **kw)
    models = S.load_models(cfg)
    params = S.prepare_modules(cfg, models, SimpleNamespace(device=torch.device("cpu")), torch.float32)
    return models, params


def test_text_encoder_lora_gets_gradients_under_reentrant_checkpointing(tiny_sd, tmp_path, monkeypatch):
    """transformers 4.57 checkpoints reentrantly unless told otherwise and, for adapters added
    by peft directly, does not make the inputs require grad: LoRA then never trains."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers import PreTrainedModel

    def enable_as_in_4_57(self, gradient_checkpointing_kwargs=None):
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": True}
        self._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=partial(checkpoint, **kwargs))

    monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable")
    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", enable_as_in_4_57)
    models, _ = _prepared(tiny_sd, tmp_path, use_lora=True, lora_rank=2, train_text_encoder=True,
                          gradient_checkpointing=True)
    te = models.text_encoder
    ids = models.tokenizer(["a photo of sks toy"], padding="max_length", return_tensors="pt").input_ids
    te(ids)[0].float().pow(2).mean().backward()
    lora = {n: p for n, p in te.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert [n for n, p in lora.items() if p.grad is None] == []
    # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's is not.
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)


def test_no_deprecation_or_float32_messages_while_preparing_and_moving(tiny_sd, tmp_path):
    import logging
    import warnings

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")  # it does not propagate to the root logger
    diffusers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            models, _ = _prepared(tiny_sd, tmp_path, train_text_encoder=True, gradient_checkpointing=True)
            S.move_module(models.vae, "cpu", torch.bfloat16)
            S.move_module(models.vae, "cpu", torch.float32)
    finally:
        diffusers_logger.removeHandler(handler)
    assert models.vae.dtype == torch.float32 and models.text_encoder.is_gradient_checkpointing
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
    assert not [r for r in records if "kept in float32" in r.getMessage()]


def test_xformers_that_cannot_run_falls_back_to_sdpa_with_a_warning(tiny_sd, tmp_path, monkeypatch, caplog):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    def broken(self, attention_op=None):
        raise RuntimeError("xformers was built for torch 2.1.0+cu121, you have another")

    monkeypatch.setattr(UNet2DConditionModel, "enable_xformers_memory_efficient_attention", broken)
    models, _ = _prepared(tiny_sd, tmp_path, enable_xformers_memory_efficient_attention=True)
    assert "xformers cannot run here (xformers was built for torch 2.1.0+cu121" in caplog.text
    assert "SDPA" in caplog.text
    assert all(isinstance(p, AttnProcessor2_0) for p in models.unet.attn_processors.values())


# --------------------------------------------------------------------------- prompt cache


def _prompt_encoder(tiny_sd, tmp_path, **kw):
    from types import SimpleNamespace

    from transformers import CLIPTextModel, CLIPTokenizer

    from dbtools.families.base import Components
    from dbtools.families.sd import SD1

    models = Components(SD1, dict(tokenizer=CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
                                  text_encoder=CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval()),
                        noise_scheduler=None)
    items = [SimpleNamespace(example=SimpleNamespace(prompt=f"sks toy, red, round, number {i}", path=f"{i}.png"))
             for i in range(3)]
    data = SimpleNamespace(all_items=lambda: items)
    cfg = config(tiny_sd, tmp_path, tmp_path / "out", caption_dropout=0.1, **kw)
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    return S.make_prompt_encoder(cfg, models, data, accelerator), models.text_encoder


def test_shuffled_captions_do_not_grow_the_prompt_cache(tiny_sd, tmp_path):
    import random

    enc, te = _prompt_encoder(tiny_sd, tmp_path, shuffle_captions=True)
    assert enc.cache is not None and "" in enc.cache  # dropped captions still come from the cache
    before = len(enc.cache)
    rng = random.Random(0)
    tags = ["sks toy", "red", "round", "shiny", "small", "on a table"]
    with torch.no_grad():
        for _ in range(20):
            prompts = [", ".join(rng.sample(tags, len(tags))) for _ in range(2)]
            got = enc.encode(prompts, te, "cpu")
            ids = enc.tokenize(prompts)[0]
            assert torch.allclose(got, te(ids)[0][:, :got.shape[1]], atol=1e-5)
    assert len(enc.cache) == before <= 4

    fixed, _ = _prompt_encoder(tiny_sd, tmp_path)  # unshuffled prompts repeat: every one is cached
    assert len(fixed.cache) == 4 and fixed.grow


# --------------------------------------------------------------------------- the hot loop (meta stands in for cuda)


META = torch.device("meta")


class _MetaAccelerator:
    """What `train_step` uses of an Accelerator, on the `meta` device: any read of a
    value from the device (`bool`, `float`, `.item()`) raises."""

    device, num_processes, process_index, scaler = META, 1, 0, None

    def backward(self, loss):
        pass

    def clip_grad_norm_(self, params, max_norm):
        return torch.ones((), device=META)

    def unwrap_model(self, model):
        return model


def _meta_run(accum: int):
    from types import SimpleNamespace

    noop = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None)
    return SimpleNamespace(accelerator=_MetaAccelerator(), cfg=SimpleNamespace(
        gradient_accumulation_steps=accum, max_grad_norm=1.0, train_text_encoder=False),
        params=[], optimizer=noop, lr_scheduler=noop, ema=None, unet=None)


def test_loss_and_finite_flags_are_read_once_per_optimizer_step(monkeypatch):
    import contextlib

    reads = []
    monkeypatch.setattr(T, "compute_loss", lambda run, micro: torch.ones((), device=META, requires_grad=True) * 2)
    monkeypatch.setattr(T, "_no_sync", lambda run: contextlib.nullcontext())
    monkeypatch.setattr(T, "_read_step", raising=False, value=lambda acc, total, nonfinite: reads.append(
        (total.device, nonfinite.device, nonfinite.dtype)) or (0.25, True))
    assert T.train_step(_meta_run(accum=3), 0) == 0.25
    assert reads == [(META, META, torch.bool)]


def test_one_read_gives_the_mean_loss_and_the_finite_verdict():
    from types import SimpleNamespace

    acc = SimpleNamespace(num_processes=1)
    assert T._read_step(acc, torch.tensor(0.5), torch.tensor(False)) == (0.5, True)
    assert T._read_step(acc, torch.tensor(float("nan")), torch.tensor(True))[1] is False


def test_uncached_latents_are_sampled_on_the_device(monkeypatch):
    from types import SimpleNamespace

    import numpy as np

    def encode(pixels):
        assert pixels.device == META and pixels.dtype == torch.float16
        mean = torch.zeros(1, 4, 4, 4, device=META)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=mean + 1))

    vae = SimpleNamespace(encode=encode, config=SimpleNamespace(scaling_factor=0.18215))
    run = SimpleNamespace(accelerator=SimpleNamespace(device=META), models=Components(SD1, dict(vae=vae), None),
                          weight_dtype=torch.float16)
    latents = T._latents(run, {"pixels": np.zeros((1, 3, 32, 32), np.float32)}, torch.Generator().manual_seed(0))
    assert latents.device == META and latents.shape == (1, 4, 4, 4) and latents.dtype == torch.float32


# --------------------------------------------------------------------------- the end of training


def test_single_file_export_runs_after_leaving_the_inference_setup(tiny_sd, tmp_path, dataset, monkeypatch):
    """Inside it the float32 VAE and text encoder sit on the GPU and, with EMA, a CPU copy
    of the trained UNet is held: gigabytes the export does not need."""
    import contextlib

    import dbtools.after.export

    state = {"inside": False, "runs": []}
    real_setup, real_export = O._for_inference, dbtools.after.export.export_single_file

    @contextlib.contextmanager
    def spied_setup(run):
        state["run"] = run
        with real_setup(run):
            state["inside"] = True
            try:
                yield
            finally:
                state["inside"] = False

    def spied_export(folder, out, *a, **kw):
        state["runs"].append((state["inside"], state["run"].ema.temp_stored_params is None))
        return real_export(folder, out, *a, **kw)

    monkeypatch.setattr(O, "_for_inference", spied_setup)
    monkeypatch.setattr(dbtools.after.export, "export_single_file", spied_export)
    result = T.train(config(tiny_sd, dataset, tmp_path / "out", use_ema=True, save_single_file=True))
    assert state["runs"] == [(False, True)]
    assert result.single_file.is_file()


# --------------------------------------------------------------------------- several processes: no waste


def test_processes_wait_for_each_other_only_at_steps_that_save(monkeypatch):
    from types import SimpleNamespace

    waits, written = [], []
    cfg = TrainConfig(checkpointing_steps=3, save_interval=4, validation_steps=100)
    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: waits.append(step))
    run = SimpleNamespace(cfg=cfg, accelerator=acc, max_train_steps=8, held_out=None)
    for name in ("save_checkpoint", "save_weights", "log_validation_loss", "save_validation"):
        monkeypatch.setattr(O, name, lambda run, step, name=name: written.append((step, name)))
    for step in range(1, 9):
        O.periodic_saves(run, step)
    assert written == [(3, "save_checkpoint"), (4, "save_weights"), (6, "save_checkpoint")]
    assert waits == [3, 4, 6]  # the final step's weights are saved by `finish`


def test_the_ema_updates_all_tensors_at_once(tiny_sd):
    from types import SimpleNamespace

    from dbtools.families.models import load_sd_components

    models = load_sd_components(str(tiny_sd))
    ema = S.make_ema(TrainConfig(use_ema=True), models, SimpleNamespace(is_main_process=True, device="cpu"))
    assert ema.foreach


def test_each_process_encodes_its_share_of_the_latents(tmp_path):
    from dbtools.train.data import DataConfig, DataPlan, DreamBoothData, Example, LatentCache
    from tests.conftest import make_image

    examples = [Example(make_image(tmp_path / f"{i}.png", size=(32, 32)), f"p{i}") for i in range(5)]
    items = DreamBoothData(DataPlan(examples, []), DataConfig(resolution=32)).all_items()
    caches, encoded = [LatentCache("k"), LatentCache("k")], [[], []]
    for rank, cache in enumerate(caches):
        def encode(px, rank=rank):
            encoded[rank].append(len(px))
            return px[:, :1] * 0 + rank, px[:, :1] * 0 + 1

        cache.fill(items, (False, True), encode, rank=rank, world=2, progress=False)
    assert [c.encoded for c in caches] == [5, 5] and sum(map(sum, encoded)) == 10  # each entry once
    for cache in caches:
        cache.add_shared(caches[0].own_share() + caches[1].own_share())
        assert len(cache.entries) == 10
    first, second = caches[0].entries, caches[1].entries
    assert first.keys() == second.keys()
    assert all((first[k][0] == second[k][0]).all() for k in first)  # both hold what its encoder made


# --------------------------------------------------------------------------- saves and samples: memory


def _inference_run(models, dtype):
    from types import SimpleNamespace

    acc = SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", dtype=dtype),
                          unwrap_model=lambda m: m)
    return SimpleNamespace(accelerator=acc, models=models, cfg=TrainConfig(), weight_dtype=dtype, ema=None,
                           unet=models.unet)


def test_saves_and_samples_keep_frozen_parts_in_the_training_dtype_under_autocast(tiny_sdxl):
    """bf16 on the CPU stands in for fp16 on a GPU: frozen text encoders are not upcast to
    float32 for samples and saves, and a VAE that overflows in half precision decodes in
    float32 outside autocast, one image at a time."""
    from dbtools.families.models import load_sd_components

    bf16 = torch.bfloat16
    models = load_sd_components(str(tiny_sdxl))
    for encoder in (models.text_encoder, models.text_encoder_2):
        encoder.to(bf16)
    models.vae.register_to_config(force_upcast=True)  # SDXL's own VAE
    with O._for_inference(_inference_run(models, bf16)):
        seen = (models.text_encoder.dtype, models.text_encoder_2.dtype, models.vae.dtype, models.vae.use_slicing,
                torch.is_autocast_enabled("cpu"))
        image = models.vae.decode(torch.randn(2, 4, 8, 8, dtype=bf16)).sample
    assert seen == (bf16, bf16, torch.float32, True, True)
    assert image.dtype == torch.float32
    assert not models.vae.use_slicing and "decode" not in vars(models.vae)  # all undone
    models.vae.register_to_config(force_upcast=False)  # e.g. the fp16-fix VAE
    with O._for_inference(_inference_run(models, bf16)):
        assert models.vae.dtype == bf16


def test_held_out_images_are_encoded_a_few_at_a_time(tmp_path):
    from types import SimpleNamespace

    from dbtools.train.data import DataConfig, DataPlan, DreamBoothData, Example
    from tests.conftest import make_image

    examples = [Example(make_image(tmp_path / f"{i}.png", size=(32, 32)), f"p{i}") for i in range(6)]
    items = DreamBoothData(DataPlan(examples, []), DataConfig(resolution=32)).all_items()
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels[:, :1]))

    vae = SimpleNamespace(dtype=torch.float32, config=SimpleNamespace(scaling_factor=1.0), encode=encode)
    run = SimpleNamespace(models=Components(SD1, dict(vae=vae), None),
                          accelerator=SimpleNamespace(device=torch.device("cpu")))
    (latents, prompts, _), = O.HeldOut(items)._latents(run)
    assert calls == [4, 2] and len(latents) == len(prompts) == 6


def test_scores_at_sdxl_size_generate_one_image_per_call(monkeypatch):
    from dbtools.after import evaluate as E
    from dbtools.after import generate as G

    batches = []
    monkeypatch.setattr(G, "generate", lambda pipe, prompt, **kw: batches.append(kw["batch_size"]) or [])
    monkeypatch.setattr(E, "prompt_fidelity", lambda *a: 0.0)
    for size in (1024, 512):
        plan = E.training_plan("sks", ["sks on a beach"], [], 2, 7.5, size)
        E.score_pipeline(None, [], plan, E.EvalConfig("out", batch_size=16), None, None)
    assert batches == [1, 16]


def test_class_images_are_decoded_one_at_a_time(tiny_sd):
    from dbtools.train.classgen import pipeline_loader_for

    assert pipeline_loader_for(str(tiny_sd), device="cpu")().vae.use_slicing


def test_frozen_parts_load_straight_in_the_training_dtype(tiny_sdxl, tmp_path, monkeypatch):
    """bf16 stands in for fp16: a LoRA run reads the UNet and the text encoders in half
    precision (no float32 copy in host memory); only the adapters are float32."""
    from types import SimpleNamespace

    from dbtools.families import models as M

    read = {}
    real = M._from_pretrained

    def spy(cls, name, sub, revision, variant, dtype):
        read[sub] = dtype
        return real(cls, name, sub, revision, variant, dtype)

    monkeypatch.setattr(M, "_from_pretrained", spy)
    bf16, fp32 = torch.bfloat16, torch.float32
    cfg = config(tiny_sdxl, tmp_path, tmp_path / "out", use_lora=True, lora_rank=2)
    models = S.load_models(cfg, bf16)
    assert read == {"text_encoder": bf16, "text_encoder_2": bf16, "vae": fp32, "unet": bf16}
    params = S.prepare_modules(cfg, models, SimpleNamespace(device=torch.device("cpu")), bf16)
    assert params and all(p.dtype == fp32 for p in params)
    assert {p.dtype for n, p in models.unet.named_parameters() if "lora_" not in n} == {bf16}
    # a full fine-tune reads the UNet (and the text encoders it trains) in float32
    S.load_models(config(tiny_sdxl, tmp_path, tmp_path / "out", train_text_encoder=True), bf16)
    assert read == {"text_encoder": fp32, "text_encoder_2": fp32, "vae": fp32, "unet": fp32}
    S.load_models(config(tiny_sdxl, tmp_path, tmp_path / "out"), bf16)
    assert read == {"text_encoder": bf16, "text_encoder_2": bf16, "vae": fp32, "unet": fp32}


def test_a_saved_pipeline_is_float32_though_its_frozen_parts_train_in_half_precision(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.text_encoder.to(torch.bfloat16)
    pipe.vae.to(torch.bfloat16)
    O._save_pipeline(pipe, tmp_path / "step")
    for part in ("text_encoder", "vae", "unet"):
        (file,) = (tmp_path / "step" / part).glob("*.safetensors")
        with safe_open(str(file), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}, part
    assert pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16  # back as they were
