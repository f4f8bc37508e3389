"""Flux.1's memory and precision rules that a run or a generate command depends on: the
dtype a flow model generates in on a GPU, and a run whose text encoders are gone before its
transformer loads."""

from __future__ import annotations

import pytest
import torch

from dbtools.after import generate as G
from dbtools.families import models as M
from tests.test_flux_train import flux_config, train_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Loaded(Exception):
    """Raised by the stand-in loader once it has seen what it was asked for."""


@pytest.fixture()
def on_cuda(monkeypatch):
    """A CUDA device as far as the loaders can tell (no GPU here); `load_pipeline` records the
    dtype it is asked for and stops."""
    asked = []

    def load_pipeline(name, **kwargs):
        asked.append(kwargs["torch_dtype"])
        raise Loaded

    monkeypatch.setattr(M, "pick_device", lambda device=None: "cuda")
    monkeypatch.setattr(M, "load_pipeline", load_pipeline)
    return asked


def watch_run(monkeypatch, encoder_class) -> tuple[list, dict]:
    """Spies on a run: `events` lists each part loaded ("load <part>"), and ("encode" | "step" |
    "sample", how many text encoders are alive then); `read_onto` each part's read device."""
    import weakref

    from dbtools.train import loop as T

    events: list = []
    encoders: list = []
    load = M._PartLoader.model

    def spy_load(self, class_path, component, *, quantize=None):
        module = load(self, class_path, component, quantize=quantize)
        events.append(f"load {component}")
        if component.startswith("text_encoder"):
            encoders.append(weakref.ref(module))
        return module

    def alive() -> int:
        return sum(ref() is not None for ref in encoders)

    def spy(name: str, real):
        return lambda *a, **k: events.append((name, alive())) or real(*a, **k)

    monkeypatch.setattr(M._PartLoader, "model", spy_load)
    read_onto: dict = {}
    read = M._from_pretrained

    def spy_read(cls, name, sub, *args, device=None):
        read_onto[sub] = device  # the device it is read onto (None: the CPU, moved later)
        return read(cls, name, sub, *args, **({"device": device} if device is not None else {}))

    monkeypatch.setattr(M, "_from_pretrained", spy_read)
    monkeypatch.setattr(encoder_class, "_forward", spy("encode", encoder_class._forward))
    monkeypatch.setattr(T, "train_step", spy("step", T.train_step))
    monkeypatch.setattr(G, "generate", spy("sample", G.generate))
    return events, read_onto


def assert_prompts_first(events: list) -> None:
    """Every prompt encoded before the transformer loaded; no text encoder alive at a step or sample."""
    names = [e if isinstance(e, str) else e[0] for e in events]
    assert names.index("load transformer") > max(i for i, n in enumerate(names) if n == "encode")
    assert {"step", "sample"} <= set(names)
    assert [e for e in events if isinstance(e, tuple) and e[0] != "encode" and e[1]] == []


def test_generate_on_cuda_loads_flux_in_bf16_and_sd_in_fp16(tmp_path, on_cuda, tiny_flux, tiny_sd):
    for model in (tiny_flux, tiny_sd):
        with pytest.raises(Loaded):
            G.main(["--model", str(model), "--prompt", "a cat", "--out_dir", str(tmp_path)])
    assert on_cuda == [torch.bfloat16, torch.float16]


def test_class_images_on_cuda_take_the_family_half_precision(on_cuda, tiny_flux, tiny_sd):
    from dbtools.train.classgen import pipeline_loader_for

    for model in (tiny_flux, tiny_sd):
        with pytest.raises(Loaded):
            pipeline_loader_for(str(model))()
    assert on_cuda == [torch.bfloat16, torch.float16]


def test_flux_run_frees_its_text_encoders_before_the_transformer_loads(tmp_path, captioned_factory, tiny_flux,
                                                                      monkeypatch):
    """Every prompt (captions, dropout's empty one, held-out, sample and validation prompts) is
    encoded before the transformer loads; then T5 and CLIP are gone (not on a device, not in
    host memory) through every step, the validation loss, the samples and the validation images."""
    from dbtools.families.flux import FluxPromptEncoder

    events, read_onto = watch_run(monkeypatch, FluxPromptEncoder)
    data = captioned_factory(tmp_path / "inst")
    out = tmp_path / "out"
    cfg = flux_config(tiny_flux, data, out, quantize_base="nf4", save_interval=2, caption_dropout=0.5,
                      save_sample_prompt="a photo of sks toy", n_save_sample=1, save_infer_steps=2,
                      validation_prompt="sks toy on a beach", validation_steps=2, num_validation_images=1,
                      validation_data_dir=str(data))
    assert train_main(cfg) == 0
    assert_prompts_first(events)
    assert (out / "4" / "samples" / "0.png").is_file() and (out / "validation" / "4" / "0.png").is_file()
    # The encoders are read straight onto the device they encode on (host memory never holds
    # T5-XXL whole on the way to a GPU); here that device is the CPU.
    assert {sub: str(device) for sub, device in read_onto.items()} == {"text_encoder": "cpu", "text_encoder_2": "cpu",
                                                                       "vae": "None"}


def test_a_restarted_flux_run_reads_its_prompts_from_cache_dir_and_loads_no_text_encoder(tmp_path, captioned_factory,
                                                                                          tiny_flux, monkeypatch):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    loaded: list[str] = []
    load = M._PartLoader.model
    monkeypatch.setattr(M._PartLoader, "model", lambda self, cls, component, *, quantize=None: loaded.append(
        component) or load(self, cls, component, quantize=quantize))
    data = captioned_factory(tmp_path / "inst")
    kw = dict(cache_dir=str(tmp_path / "cache"), caption_dropout=0.5, save_sample_prompt="a photo of sks toy",
              n_save_sample=1, save_infer_steps=2)
    runs = {}
    for name, extra in (("first", {}), ("restarted", {}), ("shorter prompts", {"max_sequence_length": 8})):
        loaded.clear()
        assert train_main(flux_config(tiny_flux, data, tmp_path / name, **kw, **extra)) == 0
        runs[name] = [c for c in loaded if c.startswith("text_encoder")]
    assert runs == {"first": ["text_encoder", "text_encoder_2"], "restarted": [],
                    "shorter prompts": ["text_encoder", "text_encoder_2"]}
    # The restarted run is the same run: the same adapters and the same sample.
    a, b = (load_file(str(tmp_path / n / "4" / "pytorch_lora_weights.safetensors")) for n in ("first", "restarted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = [np.asarray(Image.open(tmp_path / name / "4" / "samples" / "0.png")) for name in ("first", "restarted")]
    assert np.array_equal(*pixels)


def test_flux_saves_are_scored_from_cached_prompts(tmp_path, captioned_factory, tiny_flux, tiny_scorers):
    """`--score_saves` generates from its eval prompts (and the instance prompt's defaults) after
    the encoders are gone: they were encoded with the rest."""
    import json

    from dbtools.train import loop as T

    out = tmp_path / "out"
    cfg = flux_config(tiny_flux, captioned_factory(tmp_path / "inst"), out, save_interval=2, n_save_sample=1,
                      save_sample_prompt="a photo of sks toy", save_infer_steps=2, score_saves=True,
                      likeness_model=str(tiny_scorers["dinov2"]), clip_model=str(tiny_scorers["clip"]),
                      eval_num_samples=1, eval_prompts=["a photo of sks toy on a beach"])
    T.train(cfg)
    scored = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in scored if "prompt_fidelity" in r] == [2, 4]
