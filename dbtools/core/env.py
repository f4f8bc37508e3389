"""Environment probes (Colab, GPUs, package versions): a leaf module that imports no
other dbtools module, so any stage can ask where it runs without importing the notebook helpers."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from dbtools import __version__


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
    return format_gpu_report(_gpus())


def gpu_memory_gib(index: int = 0) -> float | None:
    """Total memory of CUDA GPU `index` in GiB; None without a CUDA GPU."""
    gpus = _gpus()
    return gpus[index][1] / 1024 ** 3 if index < len(gpus) else None


def ram_gib() -> float | None:
    """This machine's memory in GiB; None where the system does not say."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or no such name
        return None


def _gpus() -> list[tuple[str, int, int]]:
    """`(name, total_bytes, free_bytes)` per GPU. nvidia-smi is asked first: torch would
    create a CUDA context in this process, which holds GPU memory for as long as it lives
    (the notebook's kernel, while training runs in a process of its own)."""
    gpus = _nvidia_smi_gpus()
    if gpus is not None:
        return gpus
    import torch

    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), *reversed(torch.cuda.mem_get_info(i)))
            for i in range(torch.cuda.device_count())]


def _nvidia_smi_gpus() -> list[tuple[str, int, int]] | None:
    """The GPUs nvidia-smi lists; None when it is not installed or does not answer."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return parse_nvidia_smi(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def parse_nvidia_smi(text: str) -> list[tuple[str, int, int]]:
    """`(name, total_bytes, free_bytes)` from `nvidia-smi --query-gpu=name,memory.total,
    memory.free --format=csv,noheader,nounits` output (MiB figures)."""
    gpus = []
    for line in text.strip().splitlines():
        name, total, free = (part.strip() for part in line.rsplit(",", 2))
        gpus.append((name, int(float(total)) * 1024 ** 2, int(float(free)) * 1024 ** 2))
    return gpus


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


    lines = [f"python {platform.python_version()}", f"dbtools {__version__}"]
    for name in packages:
        try:
            lines.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)


# Third-party lines known to be harmless here, matched by where they come from and what they
# say (never a blanket filter): everything else still shows, and `--verbose` shows these too.
HARMLESS_LOG_LINES: tuple[tuple[str, str], ...] = (
    # bitsandbytes' optional CPU 4-bit kernel package; 8-bit Adam does not use it
    ("bitsandbytes.backends.cpu.ops", r"kernels-community|No module named 'kernels'"),
    # transformers falls back to Pillow image processors without torchvision (we never use it)
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\)"),
    # accelerate launch lists defaults it used; the training command passes what matters
    ("accelerate.commands.launch", r"not passed to `accelerate launch` and had defaults used"),
    # accelerate names each file it writes into a checkpoint being built under a temporary
    # name (RNG pickles we then drop among them); our own line names the finished folder
    ("accelerate.checkpointing", r"(weights|states?)( for dataloader \d+)? saved in |loaded successfully$|"
                                 r"(^|\] )Could not load random states$"),
    # ... and the temporary folder itself (after its "[RANK n] "); ours say "checkpoint saved
    # at" and "resuming from"
    ("accelerate.accelerator", r"(^|\] )(Saving current state to|Loading states from|Loading in \d+ custom states)"),
    # the bitsandbytes kernel package's note on its own download (offline, or not installed)
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/"),
)
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),
)


class _DropMatching:
    """A logging filter that drops records whose message matches `pattern`."""

    def __init__(self, pattern: str):
        import re

        self.pattern = re.compile(pattern)

    def filter(self, record) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_library_progress_bars(verbose: bool = False) -> None:
    """Hide transformers' and diffusers' own bars (loading components and weights, writing
    shards: a few lines per save, unlabelled in a log), keeping downloads' bars. For a
    process that has imported them (training); `verbose` keeps everything."""
    import os

    if verbose or os.environ.get("DBTOOLS_VERBOSE") == "1":
        return
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    downloads = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()  # (this switches the Hub's bars off too)
    diffusers.utils.logging.disable_progress_bar()
    if downloads:
        huggingface_hub.utils.enable_progress_bars()


def quiet_third_party(verbose: bool = False) -> None:
    """Hide the known-harmless third-party warnings above so a user's first lines are ours.

    Call before importing torch/diffusers/transformers. Safe to call more than once;
    `verbose=True` (or `DBTOOLS_VERBOSE=1`) leaves everything as it is.
    """
    import logging
    import os
    import warnings

    if verbose or os.environ.get("DBTOOLS_VERBOSE") == "1":
        return
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, pattern in HARMLESS_LOG_LINES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in log.filters):
            log.addFilter(_DropMatching(pattern))
