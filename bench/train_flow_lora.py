"""Peak GPU memory and speed of a LoRA step on a full-size Z-Image or Flux.2 [klein] transformer.

    python bench/train_flow_lora.py --family zimage --quantize int8      # target: peak <= 12 GiB
    python bench/train_flow_lora.py --family flux2 --quantize none       # klein 4B, target <= 10 GiB
    python bench/train_flow_lora.py --family zimage --tiny --device cpu  # a smoke run of the script

What it runs is one training step of the family's own code (`dbtools.families.zimage` /
`.flux2`: sigmas, noisy input, the transformer's prediction, the flow-matching target) at
1024 px, batch 1, LoRA rank 16 on the family's targets, gradient checkpointing, 8-bit AdamW on a
GPU, the frozen transformer in bf16 or quantized (`--quantize nf4|int8`, through the same
loader as training). The text embeddings are random tensors of the real shape: training caches
them and the 4-8 B Qwen3 encoder leaves the GPU before the first step, so it is not loaded.
The transformer has the real architecture (its config's values) and random weights, written
once to `--folder` in bf16 (12 GB for Z-Image, 8 GB for klein 4B; nothing is downloaded).
Prints one JSON line: peak allocated GiB, seconds per step after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3

# The real architectures (the released configs' values); text width and tokens of a cached prompt.
REAL = {
    "zimage": dict(config=dict(), text=(2560, 300), latent_channels=16),
    "flux2": dict(config=dict(num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
                              joint_attention_dim=7680, in_channels=128, guidance_embeds=False),
                  text=(7680, 512), latent_channels=128),
}


def tiny(family: str) -> dict:
    from dbtools import tiny as t

    if family == "zimage":
        return dict(config=t.tiny_zimage_configs()["transformer"], text=(32, 20), latent_channels=16)
    return dict(config=t.tiny_flux2_configs()["transformer"], text=(48, 512), latent_channels=128)


def write_transformer(family: str, config: dict, folder: Path) -> Path:
    """A transformer folder with random bf16 weights (skipped when it is already there)."""
    import torch
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel

    cls = {"zimage": ZImageTransformer2DModel, "flux2": Flux2Transformer2DModel}[family]
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = cls(**config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load(family: str, folder: Path, quantize: str, device: str):
    import torch
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel

    from dbtools.families.quantize import load_quantized

    cls = {"zimage": ZImageTransformer2DModel, "flux2": Flux2Transformer2DModel}[family]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if quantize != "none":
        return load_quantized(cls, str(folder), quantize, dtype=dtype, device=device)
    return cls.from_pretrained(folder, torch_dtype=dtype).to(device).requires_grad_(False)


def run(args) -> dict:
    import torch
    from peft import LoraConfig

    from dbtools.families import flux2, zimage
    from dbtools.families.base import Conditioning

    family = {"zimage": zimage.ZIMAGE, "flux2": flux2.FLUX2}[args.family]
    spec = tiny(args.family) if args.tiny else REAL[args.family]
    folder = write_transformer(args.family, spec["config"], Path(args.folder) / args.family / "transformer")
    transformer = load(args.family, folder, args.quantize, args.device)
    transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=family.lora_targets("transformer", transformer)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    if args.device == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    width, tokens = spec["text"]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cond = Conditioning(embeds=torch.randn(1, tokens, width, device=args.device, dtype=dtype),
                        lengths=torch.tensor([tokens], device=args.device))
    side = args.resolution // (16 if args.family == "flux2" else 8)
    latents = torch.randn(1, spec["latent_channels"], side, side, device=args.device)
    scheduler = family.noise_scheduler({"num_train_timesteps": 1000, "shift": 3.0,
                                        "use_dynamic_shifting": args.family == "flux2"})
    generator = torch.Generator().manual_seed(0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        sigmas = family.timesteps(scheduler, 1, generator).to(args.device)
        noise = torch.randn_like(latents)
        with torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"):
            pred = family.predict(transformer, family.noisy(scheduler, latents, noise, sigmas), sigmas, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), family.target(scheduler, latents, noise, sigmas))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if args.device == "cuda" else None
    return {"family": args.family, "quantize": args.quantize, "resolution": args.resolution, "rank": args.rank,
            "tiny": args.tiny, "peak_allocated_gib": peak, "s_per_step": sum(times) / len(times),
            "it_per_s": len(times) / sum(times), "loss": loss.item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--family", choices=("zimage", "flux2"), required=True)
    parser.add_argument("--quantize", choices=("none", "nf4", "int8"), default="none")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--folder", default="/tmp/dbtools-flow-bench")
    parser.add_argument("--tiny", action="store_true", help="the tiny test architecture (a smoke run)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
