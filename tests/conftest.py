"""Shared fixtures: offline mode, tiny models built once per session, generated images."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests: tiny models run fastest that way, and
    several threads spin-wait when the cores are busy. The previous count is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD 1.x-style (epsilon) pipeline folder, built once per session."""
    from dbtools.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A tiny SD 2.x-style (v-prediction, linear projection) pipeline folder."""
    from dbtools.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory) -> dict[str, Path]:
    """Tiny DINOv2 (`dinov2`) and CLIP (`clip`) model folders for the evaluation scores."""
    from dbtools.tiny import build_tiny_clip, build_tiny_dinov2

    root = tmp_path_factory.mktemp("scorers")
    return {"dinov2": build_tiny_dinov2(root / "dinov2"), "clip": build_tiny_clip(root / "clip")}


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline folder (two text encoders, `text_time` UNet), built once per session."""
    from dbtools.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny Flux.1 [dev]-style pipeline folder (guidance embedding, CLIP + T5, 16-channel VAE)."""
    from dbtools.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> Path:
    """A tiny Z-Image pipeline folder (Qwen3 encoder, single-stream transformer), built once per session."""
    from dbtools.tiny import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("tiny") / "z-image")


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory) -> Path:
    """A tiny Flux.2 [klein] pipeline folder (Qwen3 causal LM, 32-channel VAE), built once per session."""
    from dbtools.tiny import build_tiny_flux2_klein

    return build_tiny_flux2_klein(tmp_path_factory.mktemp("tiny") / "flux2-klein")


def make_image(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB") -> Path:
    """Write a small gradient image with a coloured square; format from the extension."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], axis=2)
    arr[h // 4: h // 2, w // 4: w // 2] = color
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def image_factory():
    """Call with a path (and optional size/color/mode) to write a test image."""
    return make_image


def make_weights(root: Path, name: str, complete: bool = True) -> Path:
    """A fake weights folder `root/name`; without `complete` it lacks `model_index.json`."""
    folder = root / name
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    if complete:
        (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture
def weights_factory():
    """Call with a folder and a name (and optional complete=False) to write fake weights."""
    return make_weights


@pytest.fixture
def training_output(tmp_path) -> Path:
    """An output folder as training leaves it: complete weights at steps 500, 1000 and 1500,
    a save in progress, an interrupted save, a checkpoint, logs and an exported file."""
    root = tmp_path / "out"
    for step in ("500", "1000", "1500"):
        make_weights(root, step)
    make_weights(root, ".tmp-2500-x")  # a save in progress
    make_weights(root, "2000", complete=False)  # interrupted save
    make_weights(root, "checkpoint-1500")
    (root / "checkpoint-1500" / "optimizer.bin").write_bytes(b"o")
    (root / "0" / "logs").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"exported")
    return root
