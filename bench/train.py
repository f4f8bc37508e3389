"""Benchmark our training loop against a bare UNet loop on the same model.

    python bench/train.py [--steps 20] [--warmup 3] [--resolution 128] [--batch_size 1]
                          [--model small|sd15|sdxl|sdxl_real] [--gpu_flags] [--use_lora] [--repeat 2]
                          [--max_grad_norm 1.0 0] [--sides bare ours]

Both sides (prompts padded to 77 tokens) run in their own subprocess (so peak memory is each side's own), in the
same invocation, on the same UNet:

- ours: `dbtools.train.loop.train()` on a few generated images, latents and text
  embeddings cached, frozen text encoder, AdamW (the code path users run);
- bare: the UNet alone: noise + timesteps, `add_noise`, forward, MSE, backward, gradient
  clipping, AdamW step, on latents and embeddings made before the clock starts.

Both sides clip gradients to the same `--max_grad_norm` (0 turns clipping off on both);
by default both settings are measured, clipping on (1.0, our default) and off.

Speed is the fastest time between the starts of consecutive steps after `--warmup`
steps (the intrinsic cost; other processes on a shared machine only ever add time);
medians are printed too. Peak memory: CUDA
`max_memory_allocated` during the steps on a GPU; max RSS of the process on CPU.
Targets: ours >= 0.9x the bare steps/s, peak memory <= 1.1x.

Models: `small` is SD-shaped (4 UNet levels, cross-attention in the first three,
SD's block types) with small widths, feasible on a CPU; `sd15` is the real SD 1.5
UNet architecture with random weights (default when CUDA is present). `sdxl` is
SDXL-shaped (3 levels, no attention in the first, 1/2/2 transformer layers, `text_time`
added conditioning from pooled embeddings and `add_time_ids`) with small widths, for a
CPU; `sdxl_real` is the real SDXL UNet architecture with random weights (1024 px by
default). SDXL's bare loop passes `added_cond_kwargs` (pooled text embeddings and time
ids) as training does. `--gpu_flags` adds fp16 mixed precision, gradient checkpointing and
8-bit Adam to both sides; `--use_lora` trains rank-4 LoRA adapters on the UNet's attention
instead of all its weights (the frozen UNet in fp16 with `--gpu_flags`), on both sides:
with both, the SDXL run is the "SDXL LoRA, 16 GB" memory profile. `--sides` runs only
some sides (e.g. `bare` alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


SDXL_REAL_UNET = {"sample_size": 128, "layers_per_block": 2, "block_out_channels": (320, 640, 1280),
                  "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10)}
SDXL_SMALL_UNET = {"sample_size": 16, "layers_per_block": 2, "block_out_channels": (32, 64, 128),
                   "attention_head_dim": (2, 4, 8), "transformer_layers_per_block": (1, 2, 2), "norm_num_groups": 32}


def unet_config(kind: str, cross_dim: int) -> dict:
    if kind == "sd15":
        return dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    attention_head_dim=8, cross_attention_dim=cross_dim)
    return dict(sample_size=16, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
                attention_head_dim=8, cross_attention_dim=cross_dim, norm_num_groups=32)


def build_model(folder: Path, kind: str) -> Path:
    """A pipeline folder: the tiny VAE/tokenizer/scheduler with a benchmark UNet and text encoder."""
    if kind.startswith("sdxl"):
        return build_sdxl_model(folder, kind)
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dbtools.tiny import build_tiny_sd, tiny_sd_configs

    build_tiny_sd(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    cross = 768 if kind == "sd15" else 64
    text_cfg = tiny_sd_configs(vocab_size=pipe.text_encoder.config.vocab_size)["text"] | dict(
        hidden_size=cross, num_attention_heads=8)
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pipe.unet = UNet2DConditionModel(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **unet_config(kind, cross))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sdxl_model(folder: Path, kind: str) -> Path:
    """The tiny SDXL pipeline with an SDXL-shaped UNet; for `sdxl_real` the real UNet
    architecture and one-layer text encoders of the real widths (768 and 1280, pooled 1280)."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dbtools.tiny import build_tiny_sdxl

    build_tiny_sdxl(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    real = kind == "sdxl_real"
    widths = (768, 1280, 1280) if real else (32, 64, 32)  # encoder 1, encoder 2, pooled projection
    torch.manual_seed(0)
    if real:
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**{
            **pipe.text_encoder.config.to_dict(), "hidden_size": 768, "num_attention_heads": 12,
            "intermediate_size": 3072}))
        pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{
            **pipe.text_encoder_2.config.to_dict(), "hidden_size": 1280, "num_attention_heads": 20,
            "intermediate_size": 5120, "projection_dim": 1280}))
    time_dim = 256 if real else 8
    pipe.unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), use_linear_projection=True,
        cross_attention_dim=widths[0] + widths[1], addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + widths[2],
        **(SDXL_REAL_UNET if real else SDXL_SMALL_UNET))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_images(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


# --------------------------------------------------------------------------- the two sides


class StepClock:
    """Start time of every step, and peak CUDA memory from the first step on."""

    def __init__(self):
        self.starts: list[float] = []

    def tick(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            if not self.starts:
                torch.cuda.reset_peak_memory_stats()
        self.starts.append(time.perf_counter())

    def report(self, warmup: int) -> dict:
        import resource

        import torch

        gaps = [b - a for a, b in zip(self.starts[warmup:], self.starts[warmup + 1:])]
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"median_step_s": statistics.median(gaps), "best_step_s": min(gaps), "steps_per_s": 1 / min(gaps),
                "peak_bytes": peak, "memory": "cuda max_memory_allocated" if torch.cuda.is_available()
                else "max RSS"}


def run_ours(a: argparse.Namespace) -> dict:
    from dbtools.train import loop as T

    clock = StepClock()
    real_step = T.train_step

    def timed_step(run, step):
        clock.tick()
        return real_step(run, step)

    T.train_step = timed_step
    out = Path(a.work) / "ours-out"
    cfg = T.TrainConfig(pretrained_model_name_or_path=a.model_dir, instance_data_dir=a.images,
                        instance_prompt="a photo of sks thing", output_dir=str(out), resolution=a.resolution,
                        train_batch_size=a.batch_size, max_train_steps=a.steps + 1, learning_rate=1e-6,
                        lr_warmup_steps=0, seed=0, report_to="none", checkpointing_steps=10**9,
                        save_interval=10**9, mixed_precision="fp16" if a.gpu_flags else "no",
                        max_grad_norm=a.max_grad_norm,
                        gradient_checkpointing=a.gpu_flags, use_8bit_adam=a.gpu_flags, pad_tokens=True,
                        use_lora=a.use_lora)
    real_finish = T.finish
    T.finish = lambda run, step, skipped=0: clock.tick()  # stop the clock; saving is not part of the loop
    T.train(cfg)
    T.finish = real_finish
    return clock.report(a.warmup)


def bare_unet(a: argparse.Namespace, device: str):
    """The UNet and the parameters the bare loop trains (all, or rank-4 LoRA adapters on a
    frozen UNet, half precision with `--gpu_flags`, as training does)."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(a.model_dir, subfolder="unet").to(device).train()
    if not a.use_lora:
        return unet, list(unet.parameters())
    from peft import LoraConfig

    unet.requires_grad_(False)
    if a.gpu_flags:
        unet.to(dtype=torch.float16)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return unet, params


def bare_conditioning(unet, batch: int, resolution: int, gen, device: str) -> tuple:
    """Random prompt embeddings, plus SDXL's `added_cond_kwargs` (pooled embeddings, time ids)."""
    import torch

    embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen).to(device)
    if unet.config.addition_embed_type != "text_time":
        return embeds, None
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)
    return embeds, {"text_embeds": torch.randn(batch, pooled, generator=gen).to(device),
                    "time_ids": time_ids.to(device)}


def run_bare(a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet, params = bare_unet(a, device)
    sched = DDPMScheduler.from_pretrained(a.model_dir, subfolder="scheduler")
    if a.gpu_flags:
        unet.enable_gradient_checkpointing()
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-6, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2)
    scaler = torch.amp.GradScaler("cuda") if a.gpu_flags else None
    side = a.resolution // 8
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(a.batch_size, 4, side, side, generator=gen).to(device)
    embeds, added = bare_conditioning(unet, a.batch_size, a.resolution, gen, device)
    clock = StepClock()
    for _ in range(a.steps + 1):
        clock.tick()
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (a.batch_size,), generator=gen).to(device)
        with torch.autocast(device, dtype=torch.float16, enabled=bool(a.gpu_flags)):
            pred = unet(sched.add_noise(latents, noise, t), t, embeds, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        if scaler:
            scaler.scale(loss).backward()
            if a.max_grad_norm > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
            opt.step()
        opt.zero_grad(set_to_none=True)
    clock.tick()
    return clock.report(a.warmup)


# --------------------------------------------------------------------------- driver


def side_main(a: argparse.Namespace) -> None:
    import logging

    logging.disable(logging.WARNING)
    result = run_ours(a) if a.side == "ours" else run_bare(a)
    print("RESULT " + json.dumps(result))


def run_side(side: str, a: argparse.Namespace, work: Path, model_dir: Path, images: Path, clip: float) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--model_dir", str(model_dir),
           "--images", str(images), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--resolution", str(a.resolution), "--batch_size", str(a.batch_size), "--max_grad_norm", str(clip)]
    cmd += ["--gpu_flags"] if a.gpu_flags else []
    cmd += ["--use_lora"] if a.use_lora else []
    return side_result(side, cmd)


def side_result(side: str, cmd: list[str]) -> dict:
    """Run one side's subprocess and read back the result it prints (`RESULT <json>`)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{side} side failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def alternating(sides: list[str], repeat: int, run) -> dict:
    """`run(side)` `repeat` times per side, the order alternating between rounds: {side: [results]}."""
    results = {side: [] for side in sides}
    for r in range(repeat):
        for side in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
            if side in results:
                results[side].append(run(side))
    return results


def main() -> None:
    import torch

    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", type=int, default=None, help="default: 128 (small) / 512 (sd15)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--model", choices=["small", "sd15", "sdxl", "sdxl_real"], default=None)
    p.add_argument("--gpu_flags", action="store_true", help="fp16 + gradient checkpointing + 8-bit Adam")
    p.add_argument("--use_lora", action="store_true", help="rank-4 LoRA adapters on the UNet's attention")
    p.add_argument("--max_grad_norm", type=float, nargs="+", default=[1.0, 0.0],
                   help="gradient clipping on both sides; each value is measured (0: no clipping)")
    add_side_flags(p)
    a = p.parse_args()
    if a.side:
        a.max_grad_norm = a.max_grad_norm[0]
        return side_main(a)
    a.model = a.model or ("sd15" if torch.cuda.is_available() else "small")
    a.resolution = a.resolution or {"sd15": 512, "sdxl_real": 1024}.get(a.model, 128)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", a.model)
        images = make_images(work / "images", 4, a.resolution)
        for clip in a.max_grad_norm:
            results = alternating(a.sides, a.repeat,
                                  lambda side, clip=clip: run_side(side, a, work, model_dir, images, clip))
            report(a, device, clip, results)


def add_side_flags(p: argparse.ArgumentParser) -> None:
    """Which sides run and how often, and the hidden flags a side's subprocess is started with."""
    p.add_argument("--sides", nargs="+", choices=["bare", "ours"], default=["bare", "ours"])
    p.add_argument("--repeat", type=int, default=2, help="runs per side (alternating); best counts")
    p.add_argument("--side", choices=["ours", "bare"], help=argparse.SUPPRESS)
    for hidden in ("--work", "--model_dir", "--images"):
        p.add_argument(hidden, help=argparse.SUPPRESS)


def report(a: argparse.Namespace, device: str, clip: float, results: dict) -> None:
    print(f"model={a.model} resolution={a.resolution} batch={a.batch_size} steps={a.steps} "
          f"gpu_flags={a.gpu_flags} use_lora={a.use_lora} max_grad_norm={clip:g} "
          f"({'clipping on both sides' if clip > 0 else 'no clipping'}) device={device}")
    report_sides(results)


def report_sides(results: dict) -> dict:
    """Each side's best run and, with both, the ratios ours/bare; returns the best runs."""
    best = {side: max(runs, key=lambda x: x["steps_per_s"]) for side, runs in results.items()}
    for name, res in best.items():
        print(f"  {name}: {res['steps_per_s']:.3f} steps/s (best step {res['best_step_s']:.3f} s, median "
              f"{res['median_step_s']:.3f} s)  peak {res['peak_bytes'] / 2**20:.0f} MiB ({res['memory']})")
    if len(best) == 2:
        ours, bare = best["ours"], best["bare"]
        print(f"  ratio ours/bare: speed {ours['steps_per_s'] / bare['steps_per_s']:.3f}x (target >= 0.9), "
              f"peak memory {ours['peak_bytes'] / bare['peak_bytes']:.3f}x (target <= 1.1)")
    return best


if __name__ == "__main__":
    main()
