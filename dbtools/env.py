"""Environment probes (Colab, GPUs, package versions): a leaf module that imports no
other dbtools module, so any stage can ask where it runs without importing the notebook helpers."""

from __future__ import annotations

import sys
from typing import Iterable


def in_colab() -> bool:
    """True when running inside Google Colab."""
    if "google.colab" in sys.modules:
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def gpu_report() -> str:
    """One line per CUDA GPU: name, total and free memory; a clear note without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return format_gpu_report([])
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        devices.append((torch.cuda.get_device_name(i), total, free))
    return format_gpu_report(devices)


def format_gpu_report(devices: list[tuple[str, int, int]]) -> str:
    """Text for `gpu_report` from `(name, total_bytes, free_bytes)` per GPU."""
    if not devices:
        return ("No CUDA GPU found: running on the CPU. Training a real model needs a GPU "
                "(in Colab: Runtime > Change runtime type > GPU); the tiny test models work on CPU.")
    gib = 1024 ** 3
    return "\n".join(f"GPU {i}: {name}, {total / gib:.1f} GiB total, {free / gib:.1f} GiB free"
                     for i, (name, total, free) in enumerate(devices))


REPORTED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub",
                     "safetensors", "bitsandbytes", "xformers", "Pillow", "ipywidgets", "gradio")


def versions_report(packages: Iterable[str] = REPORTED_PACKAGES) -> str:
    """Python, dbtools and package versions (read from metadata, nothing is imported)."""
    import importlib.metadata as md
    import platform

    from dbtools import __version__

    lines = [f"python {platform.python_version()}", f"dbtools {__version__}"]
    for name in packages:
        try:
            lines.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)
