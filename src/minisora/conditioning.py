"""Frames that condition sampling (image-to-video, continuation): loading them, and holding them during sampling.

Image-to-video and continuation reuse a text-to-video model: the first K frames are encoded and their
latent frames are held on the straight path x_t = (1 - t) z + t * noise at every step, with their exact
velocity, while the model fills in the rest (keep_known). The causal VAE makes this exact: latent frame
j depends only on frames <= kt*j, so K = 1 + kt*m known frames give m + 1 whole latent frames.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from minisora.io import probe, read_clip


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (K, h, w, 3) -> (K, height, width, 3): scale to cover, then centre crop (aspect ratio kept)."""
    _, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    x = rearrange(torch.from_numpy(np.ascontiguousarray(frames)).float(), "k h w c -> k c h w")
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)  # (K, 3, nh, nw)
    y0, x0 = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, y0 : y0 + height, x0 : x0 + width]
    return rearrange(x.round().clamp(0, 255).to(torch.uint8), "k c h w -> k h w c").numpy()


def load_frames(source: str | Path | np.ndarray | torch.Tensor, num: int, height: int, width: int) -> np.ndarray:
    """The first `num` frames of an image/video file or array, fitted to height x width: uint8 (num, H, W, 3)."""
    if isinstance(source, (str, Path)):
        info = probe(source)
        if info.num_frames < num:
            raise ValueError(f"{source} has {info.num_frames} frame(s), {num} are to be kept")
        frames = read_clip(source, num)  # reads only the frames it keeps
    else:
        frames = source.cpu().numpy() if torch.is_tensor(source) else np.asarray(source)
        if frames.ndim == 3:  # one (H, W, 3) image
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (H, W, 3) or (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(frames) < num:
        raise ValueError(f"{source if isinstance(source, (str, Path)) else 'the video'} has {len(frames)} frames, "
                         f"{num} are to be kept")  # fmt: skip
    return fit_frames(frames[:num], height, width)


def keep_known(model: Callable, known: torch.Tensor, noise: torch.Tensor) -> Callable:
    """Velocity callable whose first k latent frames follow the straight path from `noise` to `known` exactly.

    Before each call the known frames are replaced by (1 - t) * known + t * noise (the clean latents noised
    to the current t with the sample's own noise), and their velocity by the exact noise - known, so any
    sampler lands on `known` at t = 0 while the model sees consistent noise levels everywhere.
    """
    k = known.shape[2]
    noise_k = noise[:, :, :k]

    def f(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        tb = t.reshape(-1, 1, 1, 1, 1).to(x.dtype)
        x = torch.cat([(1 - tb) * known + tb * noise_k, x[:, :, k:]], dim=2)  # (B, C, t, h, w)
        v = model(x, t, **cond)
        return torch.cat([(noise_k - known).expand_as(v[:, :, :k]), v[:, :, k:]], dim=2)  # (B, C, t, h, w)

    return f
