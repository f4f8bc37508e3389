"""Benchmark our Flux.1 LoRA training step against a bare flow-matching loop on the same transformer.

    python bench/train_flux.py [--steps 20] [--warmup 3] [--resolution 64] [--model tiny|small|dev]
                               [--quantize_base none|nf4] [--gpu_flags] [--rank 4] [--repeat 2]

Both sides run in their own subprocess (peak memory is each side's own), on the same model folder:

- ours: `dbtools.train.loop.train()` with `--use_lora` on a few generated images: latents and
  prompt embeddings (CLIP + T5) cached, the encoders off the device, the flow-matching step
  through the Flux family (the code path users run);
- bare: the transformer alone with the same LoRA adapters (and the same quantized base):
  sigmas, noisy input, 2x2 packing, forward with the guidance embedding, MSE against
  noise - x, backward, gradient clipping, AdamW step, on latents and embeddings made before
  the clock starts.

Speed: the fastest time between the starts of consecutive steps after `--warmup` steps;
memory: CUDA `max_memory_allocated` during the steps on a GPU, max RSS of the process on the
CPU. Targets (issue): ours <= 1.1x the bare step time and <= 1.1x its memory.

Models: `tiny` is `dbtools.tiny`'s Flux; `small` a Flux-shaped transformer (2 double, 4 single
blocks, 256 wide) on the tiny encoders and VAE, for a CPU; `dev` is Flux.1 [dev]'s real
transformer config (11.9B, random weights, written in bf16: about 24 GB of disk and a few
minutes) on the tiny encoders and VAE, for a GPU. The Flux.1 [dev]-sized memory benchmark of
the issue (rank 16, 1024 px, batch 1, NF4 base, cached embeddings, gradient checkpointing,
8-bit AdamW, bf16) is

    python bench/train_flux.py --model dev --resolution 1024 --quantize_base nf4 --gpu_flags \\
        --rank 16 --steps 10 --warmup 2 --repeat 1 --sides ours bare

(`--gpu_flags`: bf16 mixed precision, gradient checkpointing and 8-bit AdamW on both sides.)
Host memory while that run loads (target: <= 12 GB, a free Colab runtime) is the peak RSS of
our side's process, which GNU time reports for the largest child ("Maximum resident set size",
in KiB):

    /usr/bin/time -v python bench/train_flux.py --model dev --resolution 1024 --quantize_base nf4 \\
        --gpu_flags --rank 16 --steps 10 --warmup 2 --repeat 1 --sides ours

(bench/load_flux.py measures the load order's peak on a CPU with a scaled model.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from train import (  # bench/train.py: the SD benchmark's clock, images and driver
    StepClock,
    add_side_flags,
    alternating,
    make_images,
    report_sides,
    side_result,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRANSFORMERS = {
    "small": dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=8,
                  axes_dims_rope=(8, 12, 12)),
    "dev": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                axes_dims_rope=(16, 56, 56), joint_attention_dim=4096, pooled_projection_dim=768),
}


def build_model(folder: Path, kind: str) -> Path:
    """The tiny Flux pipeline; for `small` with a bigger transformer, for `dev` with Flux.1
    [dev]'s transformer, CLIP-L and T5-XXL encoder configs and a narrow VAE that downscales 8x
    as the real one does (random weights, made on the GPU in bf16 when there is one)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from dbtools.tiny import build_tiny_flux

    build_tiny_flux(folder)
    if kind == "tiny":
        return folder
    pipe = FluxPipeline.from_pretrained(folder)
    cfg = {k: v for k, v in {**pipe.transformer.config, **TRANSFORMERS[kind]}.items() if not k.startswith("_")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if kind == "dev" else torch.float32)
    with torch.device(device):
        pipe.transformer = FluxTransformer2DModel(**cfg)
        if kind == "dev":
            real_encoders_and_vae(pipe)
    torch.set_default_dtype(torch.float32)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def real_encoders_and_vae(pipe) -> None:
    """CLIP-L (123M) and T5-XXL's encoder (4.76B) configs on the tiny tokenizers' vocabularies;
    a VAE with 16 latent channels that downscales 8x (so 1024 px is 4096 tokens), narrow."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    pipe.vae = AutoencoderKL.from_config({**pipe.vae.config, "block_out_channels": (8, 16, 32, 32),
                                          "down_block_types": ("DownEncoderBlock2D",) * 4,
                                          "up_block_types": ("UpDecoderBlock2D",) * 4})
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**{
        **pipe.text_encoder.config.to_dict(), "hidden_size": 768, "num_attention_heads": 12,
        "intermediate_size": 3072, "num_hidden_layers": 12}))
    pipe.text_encoder_2 = T5EncoderModel(T5Config(**{
        **pipe.text_encoder_2.config.to_dict(), "d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240,
        "num_layers": 24, "relative_attention_num_buckets": 32}))


# --------------------------------------------------------------------------- the two sides


def run_ours(a: argparse.Namespace) -> dict:
    from dbtools.train import loop as T

    clock = StepClock()
    real_step, real_finish = T.train_step, T.finish

    def timed_step(run, step):
        clock.tick()
        return real_step(run, step)

    T.train_step = timed_step
    T.finish = lambda run, step, skipped=0: clock.tick()  # stop the clock; saving is not part of the loop
    cfg = T.TrainConfig(pretrained_model_name_or_path=a.model_dir, instance_data_dir=a.images,
                        instance_prompt="a photo of sks thing", output_dir=str(Path(a.work) / "ours-out"),
                        resolution=a.resolution, train_batch_size=1, max_train_steps=a.steps + 1, learning_rate=1e-4,
                        lr_warmup_steps=0, seed=0, report_to="none", checkpointing_steps=10**9, save_interval=10**9,
                        use_lora=True, lora_rank=a.rank, quantize_base=a.quantize_base,
                        mixed_precision="bf16" if a.gpu_flags else "no", gradient_checkpointing=a.gpu_flags,
                        use_8bit_adam=a.gpu_flags, max_sequence_length=a.max_sequence_length)
    T.train(cfg)
    T.train_step, T.finish = real_step, real_finish
    return clock.report(a.warmup)


def bare_transformer(a: argparse.Namespace, device: str):
    """The transformer (quantized as ours when asked) with LoRA adapters in float32."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    dtype = torch.bfloat16 if a.gpu_flags else torch.float32
    if a.quantize_base != "none":
        from dbtools.families.quantize import load_quantized

        model = load_quantized(FluxTransformer2DModel, a.model_dir, a.quantize_base, dtype=dtype, device=device,
                               subfolder="transformer")
    else:
        model = FluxTransformer2DModel.from_pretrained(a.model_dir, subfolder="transformer", torch_dtype=dtype)
        model.to(device).requires_grad_(False)
    model.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if a.gpu_flags:
        model.enable_gradient_checkpointing()
    return model.train(), params


def run_bare(a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import FluxPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, params = bare_transformer(a, device)
    if a.gpu_flags:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    side = a.resolution // 8 if a.model == "dev" else a.resolution // 2  # the tiny VAE halves, the real one 8x
    latents = torch.randn(1, cfg.in_channels // 4, side, side, generator=gen).to(device)
    embeds = torch.randn(1, a.max_sequence_length, cfg.joint_attention_dim, generator=gen).to(device)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=gen).to(device)
    text_ids = torch.zeros(a.max_sequence_length, 3, device=device)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, device, torch.float32)
    guidance = torch.ones(1, device=device)
    clock = StepClock()
    for _ in range(a.steps + 1):
        clock.tick()
        noise = torch.randn(latents.shape, generator=gen).to(device)
        sigma = torch.rand(1, generator=gen).to(device)
        noisy = (1 - sigma) * latents + sigma * noise
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bool(a.gpu_flags)):
            out = model(hidden_states=FluxPipeline._pack_latents(noisy, 1, noisy.shape[1], side, side), timestep=sigma,
                        guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                        img_ids=img_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(out, side, side, 1)
        loss = F.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock.tick()
    return clock.report(a.warmup)


# --------------------------------------------------------------------------- driver


def run_side(side: str, a: argparse.Namespace, work: Path, model_dir: Path, images: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--model_dir", str(model_dir),
           "--images", str(images), "--model", a.model, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--resolution", str(a.resolution), "--quantize_base", a.quantize_base, "--rank", str(a.rank),
           "--max_sequence_length", str(a.max_sequence_length)] + (["--gpu_flags"] if a.gpu_flags else [])
    return side_result(side, cmd)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--model", choices=["tiny", "small", "dev"], default="tiny")
    p.add_argument("--quantize_base", choices=["none", "nf4", "int8"], default="none")
    p.add_argument("--gpu_flags", action="store_true", help="bf16 + gradient checkpointing + 8-bit AdamW")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--max_sequence_length", type=int, default=32)
    add_side_flags(p)
    a = p.parse_args()
    if a.side:
        import logging

        logging.disable(logging.WARNING)
        result = run_ours(a) if a.side == "ours" else run_bare(a)
        print("RESULT " + json.dumps(result))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", a.model)
        images = make_images(work / "images", 4, a.resolution)
        results = alternating(a.sides, a.repeat, lambda side: run_side(side, a, work, model_dir, images))
    print(f"model={a.model} resolution={a.resolution} steps={a.steps} quantize_base={a.quantize_base} "
          f"gpu_flags={a.gpu_flags} rank={a.rank} device={device}")
    best = report_sides(results)
    if len(best) == 2:
        print(f"  step time ours/bare: {best['ours']['best_step_s'] / best['bare']['best_step_s']:.3f}x "
              "(target <= 1.1)")

if __name__ == "__main__":
    main()
