"""Peak host memory (RSS) while a Flux.1 [dev] LoRA run loads, in the run's order against
loading every part at once, on a CPU with a Flux.1 [dev]-shaped model cut to a few blocks.

    python bench/load_flux.py [--folder /tmp/dbtools-flux-scaled] [--t5_layers 4] [--double 2] [--single 4] [--keep]

Writes a diffusers Flux folder with Flux.1 [dev]'s real widths and random bf16 weights: CLIP-L
(123 M), a T5-XXL encoder with `--t5_layers` of its 24 layers, a transformer with `--double` of
its 19 double and `--single` of its 38 single blocks (the tiny VAE and tokenizers). Then, each
in a fresh process, reads every weight once (as the move to a GPU does) and prints the peak RSS:

- at once: `load_models` of every part, then the weights read (what a run held before the
  text encoders left before the transformer loaded);
- the run's order: `load_models` without the transformer (`before_denoiser`), the encoders'
  weights read, the encoders freed (`cache_prompts_first` frees them), then the transformer.

On a CPU the "device" is host memory too, so the run's order peaks at the larger of (text
encoders + VAE) and (VAE + transformer) instead of their sum. On a GPU the text encoders and
the quantized transformer are read straight onto it (NF4 is quantized as its weights arrive), so
host memory holds no whole model: the process itself, the VAE and memory-mapped file pages
(clean, which the kernel can drop); read onto the host first, T5-XXL alone would be 9.5 GB.
The real measurement (the full model, needs about 34 GB of disk and a GPU) is the peak RSS
that bench/train_flux.py reports for `--model dev` (see its help).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from load_sdxl import _stream_safetensors, built  # bench/load_sdxl.py: random weights, a kept folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, dropout_rate=0.0)
FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def build(folder: Path, t5_layers: int, double: int, single: int) -> dict:
    """The scaled Flux folder (random bf16 weights); returns each part's bytes."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from dbtools.tiny import build_tiny_flux

    build_tiny_flux(folder)  # tokenizers, scheduler, VAE, model_index.json; the rest is replaced below
    parts = {"text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)),
             "text_encoder_2": lambda: T5EncoderModel(T5Config(num_layers=t5_layers, **T5_XXL)),
             "transformer": lambda: FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_DEV)}
    sizes = {}
    for sub, make in parts.items():
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        with torch.device("meta"):
            model = make()
        if hasattr(model, "save_config"):
            model.save_config(folder / sub)
            name = "diffusion_pytorch_model.safetensors"
        else:
            model.config.save_pretrained(folder / sub)
            name = "model.safetensors"
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        sizes[sub] = _stream_safetensors(shapes, folder / sub / name, dtype="BF16")
    return sizes


def measure(folder: Path, order: str) -> dict:
    """Load as `order` says ("at once" or "run"), reading every weight; peak RSS and bytes held."""
    import gc

    import torch

    from dbtools.train.config import TrainConfig
    from dbtools.train.data import DataPlan
    from dbtools.train.setup import before_denoiser, load_models

    cfg = TrainConfig(pretrained_model_name_or_path=str(folder), use_lora=True, mixed_precision="bf16")

    def read(models) -> int:
        return sum(p.numel() * p.element_size() for m in models.parts.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters() if p.detach().float().sum() is not None)

    if order == "at once":
        held = read(load_models(cfg, torch.bfloat16))
    else:
        models = load_models(cfg, torch.bfloat16, only=before_denoiser(cfg, DataPlan([], []), torch.bfloat16, []))
        held = read(models)
        models = models.replace(text_encoder=None, text_encoder_2=None)
        gc.collect()
        held = max(held, read(models.replace(transformer=load_models(
            cfg, torch.bfloat16, only=lambda family: [family.denoiser]).denoiser)))
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "held_bytes": held}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/dbtools-flux-scaled"))
    p.add_argument("--t5_layers", type=int, default=4)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--keep", action="store_true", help="keep the folder (and reuse it next time)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the measuring process
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.folder, args.measure)))
        return 0
    sizes = built(args.folder, "bf16_bytes.json", lambda: build(args.folder, args.t5_layers, args.double, args.single))
    try:
        results = {order: json.loads(subprocess.run(
            [sys.executable, __file__, "--measure", order, "--folder", str(args.folder)], capture_output=True,
            text=True, check=True).stdout.strip().splitlines()[-1]) for order in ("at once", "run")}
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    print("bf16 weights: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in sizes.items()))
    for order, r in results.items():
        print(f"{order:8s}: peak RSS {r['peak_rss_bytes'] / GB:.2f} GB, largest set of weights held at once "
              f"{r['held_bytes'] / GB:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
