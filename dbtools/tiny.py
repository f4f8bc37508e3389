"""Tiny, deterministic, offline models for tests and the demo.

They have the real architectures (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, the
Flux.1 transformer with a T5 encoder, BLIP, BLIP-2, Florence-2, an Idefics3/SmolVLM-style
VLM, and an ONNX WD14-style tagger) with very small configs and random weights, and
generated tokenizer files. They are written with `save_pretrained` and read back with `from_pretrained`,
the same path a Hub model takes. Their outputs are noise: they exist to exercise code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from dbtools.core.errors import UserError

logger = logging.getLogger(__name__)


class MissingExtra(ImportError):
    """A tiny model needs an optional package that is not installed; the message says which."""


# A small English corpus from which the tiny BPE merges are learnt, so that common
# caption words become single tokens, as they do with the real CLIP tokenizer.
CORPUS = (
    "a an the of on in with and photo painting drawing picture portrait style art of a "
    "red green blue yellow black white orange purple pink brown grey car cat dog person "
    "man woman girl boy house tree flower sky sea mountain city street forest river "
    "smiling sitting standing running close up detailed high quality sks toy figure "
    "illustration watercolor oil digital render landscape face eyes hair hat dress"
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def learn_bpe(words: list[str], num_merges: int, end: str = "</w>") -> list[tuple[str, str]]:
    """Learn up to `num_merges` BPE merges from `words` (greedy, most frequent pair first)."""
    vocab = Counter(tuple(w[:-1]) + (w[-1] + end,) for w in words if w)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, freq in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        vocab = Counter({_merge(symbols, best): f for symbols, f in vocab.items()})
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_clip_tokenizer(folder: Path, num_merges: int = 200) -> int:
    """Write a small CLIP BPE tokenizer (`vocab.json`, `merges.txt`); return its size."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges = learn_bpe(CORPUS.split(), num_merges)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def tiny_sd_configs(flavor: str = "sd1", vocab_size: int = 1000) -> dict:
    """Configs for a tiny SD pipeline. `sd1`: epsilon; `sd2`: v-prediction, linear proj."""
    sd2 = flavor == "sd2"
    unet = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    return dict(unet=unet, vae=vae, text=text, scheduler=scheduler)


def build_tiny_sd(out: str | Path, flavor: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny StableDiffusionPipeline folder to `out`; return its path."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    tok_dir = out / "tokenizer"
    vocab_size = write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    cfg = tiny_sd_configs(flavor, vocab_size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("tiny %s Stable Diffusion pipeline written to %s", flavor, out)
    return out


def tiny_sdxl_configs(vocab_size: int = 1000) -> dict:
    """Configs for a tiny SDXL pipeline: two text encoders (CLIP-style with `quick_gelu`, 32
    wide, then OpenCLIP-style with GELU, 64 wide, projecting to 32) whose hidden states
    together are the UNet's 96-wide cross-attention input, and a UNet with SDXL's
    `text_time` added conditioning. The encoders differ in width, as the real ones do
    (768, 1280): single-file readers tell them apart by it."""
    base = tiny_sd_configs("sd1", vocab_size)
    text_2 = dict(base["text"], hidden_act="gelu", hidden_size=64, intermediate_size=74, projection_dim=32)
    time_dim = 8
    unet = dict(
        base["unet"],
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=base["text"]["hidden_size"] + text_2["hidden_size"],
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_2["projection_dim"],
    )
    vae = dict(base["vae"], scaling_factor=0.13025, force_upcast=True)
    scheduler = {k: v for k, v in base["scheduler"].items() if k != "clip_sample"}
    scheduler.update(timestep_spacing="leading", interpolation_type="linear")
    return dict(unet=unet, vae=vae, text=base["text"], text_2=text_2, scheduler=scheduler)


def build_tiny_sdxl(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny StableDiffusionXLPipeline folder to `out`; return its path."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    vocab_size = write_clip_tokenizer(out / "tokenizer")
    write_clip_tokenizer(out / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", model_max_length=77)
    # SDXL's second tokenizer pads with "!" rather than the end-of-text token
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2", model_max_length=77, pad_token="!")
    cfg = tiny_sdxl_configs(vocab_size)
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**cfg["unet"]),
        scheduler=EulerDiscreteScheduler(**cfg["scheduler"]),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("tiny Stable Diffusion XL pipeline written to %s", out)
    return out


def t5_tokenizer(model_max_length: int = 512):
    """A small T5-style (SentencePiece Unigram) tokenizer built in memory: the corpus words as
    whole pieces after the word-start mark, their letters as fallback pieces, and T5's
    `<pad>` 0, `</s>` 1 (appended to every text) and `<unk>` 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5Tokenizer

    words = sorted(set(CORPUS.split()))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in sorted(set("".join(words)))]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                       extra_ids=0, model_max_length=model_max_length)


def tiny_flux_configs(clip_width: int = 32) -> dict:
    """Configs for a tiny Flux.1 [dev]-style pipeline: a transformer with one double and one
    single block and the guidance embedding, a 16-channel VAE with Flux's shift and scaling
    factors (no quant convs), a 32-wide T5 encoder, and Flux.1 [dev]'s flow-matching
    scheduler settings. Latents are packed 2x2 into 64 channels, as the real model's."""
    transformer = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=clip_width,
                       guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               layers_per_block=1, norm_num_groups=4, sample_size=32, shift_factor=0.1159, scaling_factor=0.3611,
               use_quant_conv=False, use_post_quant_conv=False)
    t5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
              feed_forward_proj="gated-gelu", dropout_rate=0.0)
    scheduler = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, t5=t5, scheduler=scheduler)


def build_tiny_flux(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny FluxPipeline folder (Flux.1 [dev]'s parts: CLIP-L-style and T5-style text
    encoders, the transformer with guidance embedding, a 16-channel VAE) to `out`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    out = Path(out)
    vocab_size = write_clip_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", model_max_length=77)
    text = tiny_sd_configs("sd1", vocab_size)["text"]
    tokenizer_2 = t5_tokenizer()
    cfg = tiny_flux_configs(text["hidden_size"])
    torch.manual_seed(seed)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **cfg["t5"])),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**cfg["transformer"]),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("tiny Flux.1 pipeline written to %s", out)
    return out


# A Qwen3-style chat template (the layout the Qwen tokenizers ship): one
# `<|im_start|>role\ncontent<|im_end|>` turn per message, the assistant turn opened by the
# generation prompt, and an empty thinking block when thinking is switched off.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def qwen_tokenizer(folder: Path, model_max_length: int = 512):
    """Write and load a small Qwen2-style byte-level BPE tokenizer with Qwen's special tokens
    (`<|endoftext|>` pads) and a Qwen3-style chat template."""
    from transformers import Qwen2Tokenizer

    write_opt_tokenizer(folder, specials=QWEN_SPECIALS)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_config(vocab_size: int, num_layers: int, width: int = 32) -> dict:
    """A small Qwen3 text model: `width` wide, grouped-query attention (4 heads, 2 key/value heads)."""
    return dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, max_position_embeddings=1024,
                pad_token_id=0, tie_word_embeddings=True)


def tiny_zimage_configs(text_width: int = 32) -> dict:
    """Configs for a tiny Z-Image pipeline: a single-stream transformer (2x2 patches of the
    16-channel latents, one refiner and one main layer, rope axes summing to the head size)
    fed the text encoder's hidden states (`cap_feat_dim`), Flux.1's 16-channel VAE with its
    shift and scaling factors, and Z-Image's static-shift (3.0) flow-matching scheduler."""
    flux = tiny_flux_configs()
    transformer = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1,
                       n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=text_width,
                       axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
    scheduler = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return dict(transformer=transformer, vae=flux["vae"], scheduler=scheduler)


def build_tiny_zimage(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny ZImagePipeline folder (Z-Image's parts: a Qwen3 text encoder read at its
    second-to-last layer, the single-stream transformer, a 16-channel VAE) to `out`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    out = Path(out)
    tokenizer = qwen_tokenizer(out / "tokenizer")
    cfg = tiny_zimage_configs()
    torch.manual_seed(seed)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=Qwen3Model(Qwen3Config(**tiny_qwen3_config(len(tokenizer), num_layers=2))),
        tokenizer=tokenizer,
        transformer=ZImageTransformer2DModel(**cfg["transformer"]),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("tiny Z-Image pipeline written to %s", out)
    return out


# Flux.2 [klein] reads its Qwen3 encoder's hidden states after layers 9, 18 and 27 (the
# pipeline's default), so the tiny encoder has 27 layers, each very small.
FLUX2_TEXT_LAYERS = 27


def tiny_flux2_configs(text_width: int = 16) -> dict:
    """Configs for a tiny Flux.2 [klein] pipeline: a transformer with one double and one
    single block and no guidance embedding (klein), fed three stacked encoder layers
    (`joint_attention_dim` = 3 x the encoder width); Flux.2's 32-channel VAE whose 2x2
    patches (128 channels) are normalised by its batch-norm statistics; a flow-matching
    scheduler with dynamic shifting, as the pipeline computes `mu` per image size."""
    transformer = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=3 * text_width, timestep_guidance_channels=32,
                       axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
    vae = dict(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(8, 16),
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               layers_per_block=1, norm_num_groups=4, sample_size=32)
    scheduler = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return dict(transformer=transformer, vae=vae, scheduler=scheduler)


def build_tiny_flux2_klein(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny Flux2KleinPipeline folder (Flux.2 [klein]'s parts: a Qwen3 causal LM
    text encoder, the Flux.2 transformer, the 32-channel `AutoencoderKLFlux2`) to `out`.
    The VAE's batch-norm statistics are set away from 0/1 so that code which forgets the
    normalisation gives different latents."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    tokenizer = qwen_tokenizer(out / "tokenizer")
    text_width = 16
    cfg = tiny_flux2_configs(text_width)
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**cfg["vae"])
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.num_features))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    text_config = Qwen3Config(**tiny_qwen3_config(len(tokenizer), FLUX2_TEXT_LAYERS, text_width))
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        vae=vae,
        text_encoder=Qwen3ForCausalLM(text_config),
        tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(**cfg["transformer"]),
        is_distilled=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("tiny Flux.2 [klein] pipeline written to %s", out)
    return out


# Extra words for the tiny captioners' vocabularies (BERT word pieces, OPT BPE).
CAPTION_WORDS = (
    "there is are two three small large big old young wooden stone glass metal table "
    "chair window door road grass water beach snow field park room wall floor bed "
    "building background front top side near next to holding wearing looking at "
    "from by under over it its his her their this that shirt jacket sunglasses "
    "bird horse bike boat plane train bus truck food plate cup bottle book phone "
    "light dark bright colorful night day sunset cloud clouds sun moon star"
)
WORD_PIECES = ("s", "es", "ed", "ing", "er", "est", "ly", "y", "n", "'", "ful")


def write_bert_vocab(folder: Path) -> list[str]:
    """Write a small BERT WordPiece `vocab.txt` (BLIP's special tokens + a few hundred
    pieces); return the vocabulary in id order. `[DEC]` is BLIP's decoder start token."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(",.-'!?:;()&/\"")
    words = (CORPUS + " " + CAPTION_WORDS).split()
    pieces = ["##" + p for p in (*WORD_PIECES, *letters, *digits)]
    vocab = list(dict.fromkeys(specials + letters + digits + punct + words + pieces + ["[DEC]"]))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return vocab


def tiny_blip_config(vocab: list[str], image_size: int = 32):
    """A tiny `BlipConfig` whose special token ids agree with `vocab`."""
    from transformers import BlipConfig

    ids = {tok: i for i, tok in enumerate(vocab)}
    vision = dict(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                  num_attention_heads=4, image_size=image_size, patch_size=8,
                  initializer_range=0.02)
    text = dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32,
                intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128,
                bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"],
                eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"])
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32,
                      image_text_hidden_size=32)


def build_tiny_blip(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny `BlipForConditionalGeneration` + `BlipProcessor` folder to `out`.

    Same layout as `Salesforce/blip-image-captioning-*`: BERT tokenizer with `[DEC]` as
    its bos token, 32x32 images. Loadable with `from_pretrained`; captions are noise.
    """
    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    out = Path(out)
    vocab = write_bert_vocab(out)
    tokenizer = BertTokenizer.from_pretrained(out, bos_token="[DEC]", model_max_length=128)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(tiny_blip_config(vocab)).eval()
    model.save_pretrained(out, safe_serialization=True)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    logger.info("tiny BLIP captioner written to %s", out)
    return out


def write_opt_tokenizer(folder: Path, num_merges: int = 300,
                        specials: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")) -> int:
    """Write a small GPT-2/OPT byte-level BPE tokenizer (`vocab.json`, `merges.txt`) with
    `specials` first (OPT's: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3); return its size."""
    folder.mkdir(parents=True, exist_ok=True)
    space = bytes_to_unicode()[ord(" ")]
    words = (CORPUS + " " + CAPTION_WORDS).split()
    merges = learn_bpe([space + w for w in words] + words, num_merges, end="")
    vocab_list = list(specials) + list(bytes_to_unicode().values())
    vocab_list += ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def build_tiny_blip2(out: str | Path, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """Write a tiny `Blip2ForConditionalGeneration` (OPT language model) + `Blip2Processor`.

    Same layout as `Salesforce/blip2-opt-2.7b`: an `<image>` token repeated
    `num_query_tokens` times by the processor, 32x32 images. Captions are noise.
    """
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, GPT2Tokenizer
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    out = Path(out)
    write_opt_tokenizer(out)
    tokenizer = GPT2Tokenizer.from_pretrained(
        out, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True, model_max_length=128)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=num_query_tokens)  # adds the <image> token
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=len(processor.tokenizer), hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            encoder_hidden_size=32, max_position_embeddings=128),
        text_config=dict(model_type="opt", vocab_size=len(processor.tokenizer), hidden_size=32,
                         num_hidden_layers=2, ffn_dim=37, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=32,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Shrink the (tied) embeddings of special and single-byte tokens so that random
        # weights still prefer whole-word tokens: readable, never-empty noise captions.
        emb = model.get_input_embeddings().weight
        first_merge = 4 + 256
        emb[:first_merge] *= 0.01
        emb[image_token:] *= 0.01
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    logger.info("tiny BLIP-2 captioner written to %s", out)
    return out


def _shrink_byte_tokens(model, first_merge: int, specials_from: int) -> None:
    """Make random weights prefer whole-word tokens: readable, never-empty noise text."""
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:first_merge] *= 0.01
        emb[specials_from:] *= 0.01


def build_tiny_florence2(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny `Florence2ForConditionalGeneration` + `Florence2Processor` folder.

    transformers' native Florence-2 layout (no remote code): a BART tokenizer with the
    `<image>` token, a two-stage DaViT vision tower, 32x32 images (17 image tokens).
    """
    import torch
    from transformers import BartTokenizer, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    write_opt_tokenizer(out)
    tokenizer = BartTokenizer.from_pretrained(out, extra_special_tokens={"image_token": "<image>"},
                                              model_max_length=128)
    tokenizer.add_tokens(["<mask>"], special_tokens=True)
    # 32 px through strides 4 and 2 gives 4x4 patches, plus one pooled token.
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False,
                                            crop_size={"height": 32, "width": 32}, image_seq_length=17)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    text = dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37,
                decoder_ffn_dim=37, max_position_embeddings=128, bos_token_id=0, pad_token_id=1,
                eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2],
                  num_groups=[2, 2], window_size=2, projection_dim=32)
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    _shrink_byte_tokens(model, 4 + 256, tokenizer.image_token_id)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    logger.info("tiny Florence-2 captioner written to %s", out)
    return out


# A SmolVLM-like chat template: "User:<image> instruction<end_of_utterance>\nAssistant:".
VLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}"
    "{% else %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def build_tiny_vlm(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny SmolVLM-style `Idefics3ForConditionalGeneration` + `Idefics3Processor`
    with a chat template; `AutoModelForImageTextToText` loads it. 32x32 images, no
    splitting, 4 image tokens per image."""
    import torch
    from transformers import GPT2TokenizerFast, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    out = Path(out)
    write_opt_tokenizer(out)
    tokenizer = GPT2TokenizerFast.from_pretrained(
        out, bos_token="<s>", eos_token="<end_of_utterance>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]})
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=VLM_CHAT_TEMPLATE)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    _shrink_byte_tokens(model, 4 + 256, len(tokenizer) - 4)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    logger.info("tiny instruction VLM written to %s", out)
    return out


# Tag names in the real `selected_tags.csv` style: ratings, general tags, characters.
TAGGER_TAGS = (
    [("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9)]
    + [(t, 0) for t in (
        "1girl", "solo", "long_hair", "smile", "looking_at_viewer", "short_hair", "blue_eyes",
        "open_mouth", "simple_background", "white_background", "red_hair", "holding", "outdoors",
        "sky", "cloud", "tree", "flower", "watercolor_(medium)", "traditional_media", "no_humans",
        "scenery", "^_^", "o_o", ">_<", "x_x", "hat", "dress", "sitting", "standing", "cat")]
    + [(t, 4) for t in ("hatsune_miku", "kirisame_marisa", "original_character_(test)")]
)


def write_tags_csv(path: Path, tags=TAGGER_TAGS) -> None:
    """`selected_tags.csv` in the real file's columns: tag_id,name,category,count."""
    lines = ["tag_id,name,category,count"]
    lines += [f'{1000 + i},"{name}",{cat},{10000 - i}' for i, (name, cat) in enumerate(tags)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_tagger(out: str | Path, seed: int = 0, size: int = 32, logits=None) -> Path:
    """Write a tiny WD14-style tagger: `model.onnx` + `selected_tags.csv`.

    Like SmilingWolf's models it takes `(batch, size, size, 3)` BGR float32 pixels in
    0-255 and outputs one sigmoid probability per tag. Here the scores are the mean
    colour times a small random matrix plus a bias; `logits` (one per tag) sets the
    bias and zeroes the matrix, so every image gets exactly `sigmoid(logits)`.
    """
    import numpy as np

    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise MissingExtra("it needs the onnx package: pip install onnx (or pip install -e .[tiny])") from exc

    out = Path(out)
    n = len(TAGGER_TAGS)
    rng = np.random.default_rng(seed)
    if logits is None:
        weight = rng.normal(0, 0.02, (3, n)).astype(np.float32)
        bias = rng.normal(-1.0, 1.5, n).astype(np.float32)
    else:
        weight = np.zeros((3, n), np.float32)
        bias = np.asarray(logits, np.float32)
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "weight"], ["scaled"]),
             helper.make_node("Add", ["scaled", "bias"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["output"])]
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
             numpy_helper.from_array(weight / 255.0, "weight"), numpy_helper.from_array(bias, "bias")]
    graph = helper.make_graph(
        nodes, "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # readable by onnxruntime releases of the last two years
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out / "model.onnx")
    write_tags_csv(out / "selected_tags.csv")
    logger.info("tiny WD14-style tagger written to %s", out)
    return out


def build_tiny_dinov2(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny `Dinov2Model` + image processor (32x32 crops) to `out`.

    Same layout as `facebook/dinov2-small`, loadable with `AutoModel` and
    `AutoImageProcessor`. The weights are random, with a wider initialisation than the
    default so that the pooled embedding depends on the image, not mostly on the CLS token.
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    out = Path(out)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                          image_size=32, patch_size=8, initializer_range=0.2)
    torch.manual_seed(seed)
    Dinov2Model(config).eval().save_pretrained(out, safe_serialization=True)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    logger.info("tiny DINOv2 written to %s", out)
    return out


def build_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny `CLIPModel` + `CLIPProcessor` (small BPE tokenizer, 32x32 images) to
    `out`, the layout of `openai/clip-vit-base-patch32`. Its scores are noise."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    vocab_size = write_clip_tokenizer(out)
    tokenizer = CLIPTokenizer.from_pretrained(out, model_max_length=77)
    text = dict(tiny_sd_configs("sd1", vocab_size)["text"])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    logger.info("tiny CLIP written to %s", out)
    return out


BUILDERS = {
    "sd": lambda out, seed: build_tiny_sd(out, "sd1", seed),
    "sd2": lambda out, seed: build_tiny_sd(out, "sd2", seed),
    "sdxl": lambda out, seed: build_tiny_sdxl(out, seed),
    "flux": lambda out, seed: build_tiny_flux(out, seed),
    "z-image": lambda out, seed: build_tiny_zimage(out, seed),
    "flux2-klein": lambda out, seed: build_tiny_flux2_klein(out, seed),
    "blip": lambda out, seed: build_tiny_blip(out, seed=seed),
    "blip2": lambda out, seed: build_tiny_blip2(out, seed=seed),
    "florence2": lambda out, seed: build_tiny_florence2(out, seed=seed),
    "wd-tagger": lambda out, seed: build_tiny_tagger(out, seed=seed),
    "vlm": lambda out, seed: build_tiny_vlm(out, seed=seed),
    "dinov2": lambda out, seed: build_tiny_dinov2(out, seed=seed),
    "clip": lambda out, seed: build_tiny_clip(out, seed=seed),
}
"""Each tiny model's folder name under `--out` and how it is built."""


def build_all(out: str | Path, seed: int = 0, skipped: dict[str, str] | None = None) -> dict[str, Path]:
    """Write every tiny model under `out`: `sd`, `sd2`, `sdxl`, `flux`, `z-image`,
    `flux2-klein`, the captioners and the scorers.

    A model whose optional package is missing (the tagger needs onnx, the `tiny` extra) is
    left out; with `skipped` given, its name and the reason are put there instead of raising.
    """
    out, built = Path(out), {}
    for name, build in BUILDERS.items():
        try:
            built[name] = build(out / name, seed)
        except MissingExtra as exc:
            if skipped is None:
                raise
            skipped[name] = str(exc)
    return built


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools tiny --out DIR`: write the tiny offline models."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m dbtools tiny", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder to write sd/, sd2/, sdxl/, blip/ ... into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file: give a folder (it is made if missing).")
    skipped: dict[str, str] = {}
    for name, path in build_all(args.out, args.seed, skipped).items():
        print(f"{name}: {path}")
    for name, why in skipped.items():
        print(f"{name}: not built, {why}; the other models were written.", file=sys.stderr)
    print("These are tiny models with random weights: for tests and demos, not for real images.")
    return 0
