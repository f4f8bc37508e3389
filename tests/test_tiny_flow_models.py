"""The tiny Z-Image and Flux.2 [klein] models: written by `python -m dbtools tiny`, read back
through their pipelines' `from_pretrained` like a Hub download, and able to make an image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2KleinPipeline, ZImagePipeline
from transformers import Qwen3ForCausalLM, Qwen3Model

from dbtools import cli, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _generate(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, height=32, width=32, num_inference_steps=2, generator=generator,
                output_type="np").images[0]


def _check_generates(pipe) -> None:
    first = _generate(pipe, "a red car")
    assert first.shape == (32, 32, 3) and np.isfinite(first).all()
    assert np.array_equal(first, _generate(pipe, "a red car"))  # seeded: the same image again
    # the prompt reaches the transformer through the text encoder
    assert not np.array_equal(first, _generate(pipe, "a blue house in the forest"))


def test_tiny_writes_z_image_and_flux2_klein(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny, "BUILDERS", {k: tiny.BUILDERS[k] for k in ("z-image", "flux2-klein")})
    assert cli.main(["tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name, pipeline in (("z-image", "ZImagePipeline"), ("flux2-klein", "Flux2KleinPipeline")):
        assert f"{name}: {tmp_path / name}" in out
        index = json.loads((tmp_path / name / "model_index.json").read_text(encoding="utf-8"))
        assert index["_class_name"] == pipeline


def test_tiny_z_image_loads_and_generates(tiny_zimage):
    pipe = ZImagePipeline.from_pretrained(tiny_zimage)
    assert isinstance(pipe.text_encoder, Qwen3Model) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.transformer.config.cap_feat_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.shift_factor is not None and pipe.vae.config.latent_channels == 16
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 3.0
    _check_generates(pipe)


def test_tiny_flux2_klein_loads_and_generates(tiny_flux2):
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2)
    assert isinstance(pipe.text_encoder, Qwen3ForCausalLM) and isinstance(pipe.vae, AutoencoderKLFlux2)
    # the pipeline's default encoder layers (9, 18, 27) exist, stacked into the transformer's input
    assert pipe.text_encoder.config.num_hidden_layers >= 27
    assert pipe.transformer.config.joint_attention_dim == 3 * pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 128
    assert not pipe.transformer.config.guidance_embeds and not pipe.config.is_distilled
    assert not torch.allclose(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))
    _check_generates(pipe)


def test_tiny_qwen_tokenizer_has_the_chat_layout(tiny_zimage):
    tokenizer = ZImagePipeline.from_pretrained(tiny_zimage).tokenizer
    turn = [{"role": "user", "content": "a red car"}]
    thinking = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking == "<|im_start|>user\na red car<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert plain == thinking + "<think>\n\n</think>\n\n"
    ids = tokenizer(thinking).input_ids
    # special tokens stay whole; the pad token is Qwen's end of text
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.pad_token == "<|endoftext|>"
    assert len(ids) < len(thinking) // 2  # caption words are whole tokens, not bytes
