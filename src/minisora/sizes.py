"""Clip sizes a model accepts: frames 1 + kt*k, height and width multiples of the autoencoder's spatial
compression times the DiT's patch. Requests are rounded to the nearest accepted size, with a warning."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch


def round_to(value: int, multiple: int, offset: int = 0) -> int:
    """The nearest offset + k * multiple (halves round up), at least offset + multiple when offset is 0."""
    k = max(int((value - offset) / multiple + 0.5), 0 if offset else 1)
    return offset + k * multiple


def valid_size(
    vae: torch.nn.Module, patch_size: Sequence[int], num_frames: int, height: int, width: int, stacklevel: int = 2
) -> tuple[int, int, int]:
    """The nearest (T, H, W) the autoencoder and patch sizes accept, with a warning naming what changed."""
    kt, s = vae.temporal_compression, vae.spatial_compression
    ph, pw = patch_size[1:]
    for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    out = (
        round_to(num_frames - 1, kt) + 1 if num_frames > 1 else 1,
        round_to(height, s * ph),
        round_to(width, s * pw),
    )
    if out != (num_frames, height, width):
        warnings.warn(
            f"frames x height x width {num_frames}x{height}x{width} rounded to {out[0]}x{out[1]}x{out[2]}: "
            f"frames must be 1 + {kt}k (1, {1 + kt}, {1 + 2 * kt}, {1 + 3 * kt}, ...) for the {kt}x temporal "
            f"compression, height a multiple of {s * ph} and width of {s * pw} (autoencoder {s}x times DiT patch)",
            stacklevel=stacklevel + 1,
        )
    return out


def kept_frame_count(kt: int, image: bool, keep_frames: int | None, num_frames: int) -> int:
    """How many frames image-to-video (1) or a continuation (keep_frames, default 1 + kt) keeps: 1 + kt*m."""
    K = 1 if image else (keep_frames if keep_frames is not None else 1 + kt)
    if not isinstance(K, (int, np.integer)) or K < 1:
        raise ValueError(f"keep_frames must be a positive integer, got {K!r}")
    if (K - 1) % kt:
        rounded = 1 + (K - 1) // kt * kt
        valid = f"1 + {kt}k (1, {1 + kt}, {1 + 2 * kt}, ...)"
        warnings.warn(f"keep_frames={K} rounded down to {rounded}: kept frames must be {valid} for the {kt}x "
                      f"temporal compression", stacklevel=5)  # fmt: skip
        K = rounded
    if K >= num_frames:
        raise ValueError(f"keep_frames={K} leaves nothing to generate in {num_frames} frames; ask for more frames")
    return K
