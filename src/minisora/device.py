"""Device and precision defaults and dtype names: the one place that picks cuda or cpu, bf16 or fp32."""

from __future__ import annotations

import torch

# Short names (the CLI's --dtype, export) and diffusers' long names (pretrained_vae.dtype) for the same three.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(device: str | torch.device | None = None) -> bool:
    """bf16 pays on a GPU that supports it (Ampere and newer); on most CPUs it is slower (DESIGN.md calibration)."""
    device = str(device or default_device())
    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def default_dtype(device: str | torch.device | None = None) -> str:
    """Weights dtype for inference: bf16 where supported (half the memory), else fp32."""
    return "bf16" if bf16_supported(device) else "fp32"


def default_precision() -> str:
    """Lightning precision for training: bf16 autocast where supported, else full fp32."""
    return "bf16-mixed" if bf16_supported() else "32-true"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from fp32/bf16/fp16, float32/bfloat16/float16, 'auto' (default_dtype) or a torch dtype; None = fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = default_dtype() if dtype == "auto" else LONG_NAMES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join([*DTYPES, *LONG_NAMES])} or a torch.dtype, "
                         f"got {dtype!r}")  # fmt: skip
    return DTYPES[name]
