"""A frozen denoiser loaded 4-bit (NF4) or 8-bit (LLM.int8) through bitsandbytes, by diffusers'
own quantization config, so a 12B transformer trains LoRA adapters on a 16 GB GPU.

bitsandbytes runs both forward and backward on the CPU too (0.48 and later); diffusers' loader
still refuses a machine without a GPU, so on the CPU its environment check is lifted for the
load. The CPU path is the one the tests take; a GPU takes diffusers' path unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from dbtools.core.errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "int8")


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """diffusers' `BitsAndBytesConfig` for `quantize` ("nf4" or "int8"); NF4 computes in
    `compute_dtype` (the training dtype)."""
    from diffusers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"--quantize_base {quantize}: choose one of none, {', '.join(QUANTIZATIONS)}.")


@contextlib.contextmanager
def _quantizing_on(device: torch.device) -> Iterator[None]:
    """diffusers' bitsandbytes quantizers ask for a GPU before loading; bitsandbytes itself
    does not need one. On the CPU the check is skipped for the duration of the load."""
    if device.type != "cpu":
        yield
        return
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    classes = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    saved = [cls.__dict__["validate_environment"] for cls in classes]
    for cls in classes:
        cls.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        for cls, method in zip(classes, saved, strict=True):
            cls.validate_environment = method


def load_quantized(cls, name: str, quantize: str, *, dtype: torch.dtype, device: str | torch.device, **kwargs):
    """`cls.from_pretrained(name, ...)` with its linear layers quantized by bitsandbytes onto
    `device`; the rest of the model in `dtype`. Frozen: adapters added later train in float32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _quantizing_on(device):
        model = cls.from_pretrained(name, quantization_config=quantization_config(quantize, dtype), torch_dtype=dtype,
                                    device_map={"": str(device)}, **kwargs)
    if device.type == "cpu":
        _plain_cpu_kernels(model)
    model.requires_grad_(False)
    return model


def _plain_cpu_kernels(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' NF4 layers on their general CPU kernel. Its inference-only repacking
    (taken without gradients on CPUs with AVX512-BF16) needs every layer at least 64 wide and
    rewrites the weights in place, so samples made between training steps would change the
    layers that train next."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    """Whether `model` (possibly wrapped for data-parallel training) was loaded by bitsandbytes."""
    model = getattr(model, "module", model)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_quantized", False))


def quantization_of(model) -> str | None:
    """"nf4", "int8" (or bitsandbytes' other 4-bit type) for a model loaded by bitsandbytes, else None."""
    model = getattr(model, "module", model)
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    if getattr(model, "is_loaded_in_4bit", False):
        config = getattr(model, "config", {}).get("quantization_config") or {}
        kind = config.get("bnb_4bit_quant_type") if isinstance(config, dict) else \
            getattr(config, "bnb_4bit_quant_type", None)
        return kind or "nf4"
    return None
