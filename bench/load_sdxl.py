"""Peak host memory (RSS) while training loads full-size SDXL for an fp16 LoRA run.

    python bench/load_sdxl.py [--folder /tmp/dbtools-sdxl-fp16] [--keep] [--rank 32]

First writes a diffusers SDXL folder with the real architectures (UNet 2.57 B parameters,
CLIP ViT-L and OpenCLIP bigG text encoders, the VAE) and random weights, saved only as the
`fp16` variant, as a user's Hub download with `--variant fp16` is (about 6.9 GB on disk;
nothing is downloaded; the tokenizers are the tiny test ones). Then, in a fresh process,
does what training does before its first step on the CPU: `load_models` and
`prepare_modules` of an fp16 LoRA run (the "SDXL LoRA, 16 GB" profile, text encoders
frozen), reads every weight once (as the move to the GPU does), and prints the peak RSS of
that process against the size of the fp16 weights.
Target: at most 1.25x the fp16 weights (about 8.7 GB); loading every part in float32 and
casting afterwards peaks near 1.3x the float32 size (about 17 GB).

Needs about 7 GB of disk; writing the folder holds one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9

# The real SDXL base 1.0 architectures (their config files' values).
TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                    projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TEXT_ENCODER_2 = dict(TEXT_ENCODER, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)


def build(folder: Path) -> int:
    """The SDXL folder with random fp16 weights (fp16 variant files only); returns their bytes."""
    from dbtools.tiny import build_tiny_sdxl

    build_tiny_sdxl(folder)  # tokenizers, scheduler, model_index.json; its weights are replaced below
    total = 0
    for sub, make in _components().items():
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        total += _write_random_fp16(make, folder / sub)
    return total


def _components() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {"text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)),
            "vae": lambda: AutoencoderKL(**VAE), "unet": lambda: UNet2DConditionModel(**UNET)}


def _write_random_fp16(make, folder: Path) -> int:
    """Build the model on the meta device (no memory), write its config and random fp16 weights."""
    import torch

    with torch.device("meta"):
        model = make()
    if hasattr(model, "save_config"):
        model.save_config(folder)
        name = "diffusion_pytorch_model.fp16.safetensors"
    else:
        model.config.save_pretrained(folder)
        name = "model.fp16.safetensors"
    return _stream_safetensors({k: tuple(v.shape) for k, v in model.state_dict().items()}, folder / name)


def _stream_safetensors(shapes: dict[str, tuple], path: Path, dtype: str = "F16") -> int:
    """A safetensors file of random fp16 (or `dtype` "BF16") tensors, each made just before it is
    written, so the writer never holds more than one tensor (`save_file` would hold all of them twice)."""
    import math
    import struct

    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            x = torch.randn(shape, generator=gen).mul_(0.02)
            f.write((x.half() if dtype == "F16" else x.bfloat16().view(torch.int16)).numpy().tobytes())
    return offset


def load(folder: Path, rank: int) -> dict:
    """What training does before its first step on the CPU, for an fp16 LoRA run; peak RSS."""
    from types import SimpleNamespace

    import torch

    from dbtools.families.profiles import MEMORY_PROFILES, SDXL_LORA_16GB
    from dbtools.train.config import TrainConfig
    from dbtools.train.setup import load_models, prepare_modules

    flags = {k: v for k, v in MEMORY_PROFILES[SDXL_LORA_16GB].items() if k != "use_8bit_adam"}
    cfg = TrainConfig(pretrained_model_name_or_path=str(folder), lora_rank=rank, **flags)
    models = load_models(cfg, torch.float16)
    params = prepare_modules(cfg, models, SimpleNamespace(device=torch.device("cpu")), torch.float16)
    parts = [models.unet, models.text_encoder, models.text_encoder_2, models.vae]
    # Read every weight once, as the move to the GPU does: tensors read straight from the
    # file are memory-mapped and only count as resident once their pages are read.
    held = sum(p.numel() * p.element_size() for m in parts for p in m.parameters() if p.detach().sum() is not None)
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "held_bytes": held,
            "trained_params": sum(p.numel() for p in params),
            "dtypes": {n: str(getattr(models, n).dtype) for n in ("unet", "text_encoder", "text_encoder_2", "vae")}}


def built(folder: Path, marker_name: str, build_folder):
    """What `build_folder()` returned when it wrote `folder` (kept in `folder/marker_name`),
    building it first unless a kept folder is complete."""
    marker = folder / marker_name
    if not marker.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(build_folder()))
    return json.loads(marker.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/dbtools-sdxl-fp16"))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="keep the SDXL folder (and reuse it next time)")
    p.add_argument("--load_only", action="store_true", help=argparse.SUPPRESS)  # the measuring process
    args = p.parse_args(argv)
    if args.load_only:
        print(json.dumps(load(args.folder, args.rank)))
        return 0
    fp16 = built(args.folder, "fp16_bytes.json", lambda: build(args.folder))
    try:
        out = subprocess.run([sys.executable, __file__, "--load_only", "--folder", str(args.folder),
                              "--rank", str(args.rank)], capture_output=True, text=True, check=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    peak = result["peak_rss_bytes"]
    print(f"fp16 weights on disk: {fp16 / GB:.2f} GB; held after loading: {result['held_bytes'] / GB:.2f} GB "
          f"({result['trained_params'] / 1e6:.1f} M trained LoRA parameters, rank {args.rank})")
    print(f"dtypes: {result['dtypes']}")
    print(f"peak RSS while loading: {peak / GB:.2f} GB = {peak / fp16:.2f}x the fp16 weights "
          f"(target <= 1.25x, {1.25 * fp16 / GB:.2f} GB)")
    return 0 if peak <= 1.25 * fp16 else 1


if __name__ == "__main__":
    raise SystemExit(main())
