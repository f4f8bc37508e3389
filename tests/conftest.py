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
