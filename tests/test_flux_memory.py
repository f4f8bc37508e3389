"""Flux.1's memory and precision rules that a run or a generate command depends on: the
dtype a flow model generates in on a GPU."""

from __future__ import annotations

import pytest
import torch

from dbtools.after import generate as G
from dbtools.families import models as M


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
