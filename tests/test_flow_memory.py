"""Z-Image and Flux.2 [klein] runs whose Qwen3 text encoder is gone before the transformer
loads: every prompt (captions, dropout's empty prompt, sample and validation prompts, and the
empty negative prompt of classifier-free guidance) is encoded first."""

from __future__ import annotations

import pytest

from dbtools.families.qwen import QwenPromptEncoder
from tests.test_flux_memory import assert_prompts_first, watch_run
from tests.test_flux_train import flux_config, train_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["tiny_zimage", "tiny_flux2"])
def test_qwen_run_frees_its_text_encoder_before_the_transformer_loads(tmp_path, captioned_factory, monkeypatch,
                                                                     request, name):
    model = request.getfixturevalue(name)
    events, read_onto = watch_run(monkeypatch, QwenPromptEncoder)
    data = captioned_factory(tmp_path / "inst")
    out = tmp_path / "out"
    cfg = flux_config(model, data, out, save_interval=2, caption_dropout=0.5, save_sample_prompt="a photo of sks toy",
                      n_save_sample=1, save_infer_steps=2, save_guidance_scale=3.0,
                      validation_prompt="sks toy on a beach", validation_steps=2, num_validation_images=1,
                      validation_data_dir=str(data))
    assert train_main(cfg) == 0
    assert_prompts_first(events)
    assert (out / "4" / "samples" / "0.png").is_file() and (out / "validation" / "4" / "0.png").is_file()
    assert str(read_onto["text_encoder"]) == "cpu"


@pytest.mark.parametrize("name", ["tiny_zimage", "tiny_flux2"])
def test_a_restarted_qwen_run_reads_its_prompts_from_cache_dir_and_loads_no_text_encoder(tmp_path, captioned_factory,
                                                                                         monkeypatch, request, name):
    """The guided sample's empty negative prompt is stored with the rest, so the restarted run
    loads no text encoder and makes the same sample."""
    import numpy as np
    from PIL import Image

    model = request.getfixturevalue(name)
    events, _ = watch_run(monkeypatch, QwenPromptEncoder)
    data = captioned_factory(tmp_path / "inst")
    kw = dict(cache_dir=str(tmp_path / "cache"), save_sample_prompt="a photo of sks toy", n_save_sample=1,
              save_infer_steps=2, save_guidance_scale=3.0)
    loaded = {}
    for run in ("first", "restarted"):
        events.clear()
        assert train_main(flux_config(model, data, tmp_path / run, **kw)) == 0
        loaded[run] = [e for e in events if e == "load text_encoder"]
    assert loaded == {"first": ["load text_encoder"], "restarted": []}
    pixels = [np.asarray(Image.open(tmp_path / run / "4" / "samples" / "0.png")) for run in ("first", "restarted")]
    assert np.array_equal(*pixels)
