"""Shared fixtures: offline mode, tiny models built once per session (one fixture per model),
generated and captioned images, the tests' training config."""

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


def tiny_captioner(build: str, name: str):
    """A session fixture: the folder of the tiny captioner `dbtools.tiny.<build>` writes, built once."""

    @pytest.fixture(scope="session")
    def folder(tmp_path_factory) -> Path:
        from dbtools import tiny

        return getattr(tiny, build)(tmp_path_factory.mktemp("tiny") / name)

    return folder


tiny_blip = tiny_captioner("build_tiny_blip", "blip")
tiny_blip2 = tiny_captioner("build_tiny_blip2", "blip2")
tiny_florence2 = tiny_captioner("build_tiny_florence2", "florence2")
tiny_tagger = tiny_captioner("build_tiny_tagger", "wd-tagger")
tiny_vlm = tiny_captioner("build_tiny_vlm", "vlm")


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


def make_captioned(folder: Path, sizes=((32, 32), (32, 32)), colors=None, name: str = "toy_{i}.png",
                   caption: str = "a photo of sks toy, number {i}") -> Path:
    """Captioned instance images in `folder`: one image `name` per size (`{i}` is its index),
    of color `colors[i]` (`make_image`'s default without `colors`), each with its caption
    file `<image>.txt` as `--read_prompts_from_txts` reads it. Returns `folder`."""
    for i, size in enumerate(sizes):
        color = {} if colors is None else {"color": colors[i]}
        img = make_image(folder / name.format(i=i), size=size, **color)
        Path(f"{img}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return folder


@pytest.fixture
def captioned_factory():
    """Call with a folder (and optional sizes/colors/name/caption) to write captioned images."""
    return make_captioned


def train_config(model, data, out, **kw):
    """The tests' training run: `model` trained on the captioned images in `data` into `out`;
    2 steps at 32 px, batch 1, seed 3, lr 1e-3 without warm-up, no tracker, no periodic
    weights or checkpoints, and (given a sample prompt) one 2-step sample per save.
    `kw` sets any other field, or overrides these."""
    from dbtools.train.config import TrainConfig

    base = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(data), output_dir=str(out),
                read_prompts_from_txts=True, resolution=32, train_batch_size=1, max_train_steps=2, seed=3,
                learning_rate=1e-3, lr_warmup_steps=0, report_to="none", checkpointing_steps=1000,
                save_interval=1000, n_save_sample=1, save_infer_steps=2)
    return TrainConfig(**{**base, **kw})


def make_weights(root: Path, name: str, complete: bool = True) -> Path:
    """A fake weights folder `root/name`; without `complete` it lacks `model_index.json`."""
    folder = root / name
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    if complete:
        (folder / "model_index.json").write_text("{}")
    return folder


class RunsCode:
    """Unpickling this calls `open(marker, "w")`, creating the marker file: code running at
    load time, what a hostile checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


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
