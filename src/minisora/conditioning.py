"""Frames that condition a video (image-to-video, continuation): training draws, loading, and two ways to sample.

Trained (the default, how Wan2.2-TI2V and LTX-Video condition): during training the first k latent frames of
some clips are given clean, at t = 0, and left out of the loss (draw_known_frames, frame_timesteps); sampling
gives the known frames t = 0 in the same way (clean_known), so the model attends to real frames it has learnt
to follow. Replacement (keep_known): a text-to-video model whose known latent frames are held on the straight
path x_t = (1 - t) z + t * noise at every step, while the model fills in the rest; nothing trains it to follow
them. The causal VAE makes both exact: latent frame j depends only on frames <= kt*j, so K = 1 + kt*m known
frames give m + 1 whole latent frames.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from minisora import diffusion
from minisora.io import probe, read_clip
from minisora.sizes import kept_frame_count


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


def conditioning_frames(kt: int, image: Any = None, video: Any = None, keep_frames: int | None = None,
                        num_frames: int = 17, height: int = 32, width: int = 32) -> np.ndarray | None:  # fmt: skip
    """The frames to keep, uint8 (K, H, W, 3): one image, or the first K = 1 + kt*m frames of a video."""
    if image is not None and video is not None:
        raise ValueError("give image (image-to-video) or video (continuation), not both")
    if image is None and video is None:
        if keep_frames is not None:
            raise ValueError("keep_frames needs a video to keep frames from")
        return None
    K = kept_frame_count(kt, image is not None, keep_frames, num_frames)
    return load_frames(image if image is not None else video, K, height, width)


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


MODES = ("trained", "replace")  # how known frames condition sampling: clean_known or keep_known


def draw_known_frames(generator: torch.Generator, n: int, T: int, p_image: float, p_extend: float,
                      extend_frames: tuple[int, int], multiple: int = 1) -> torch.Tensor:
    """How many leading latent frames of each of n clips of T latent frames are given clean: k (n,) long.

    With probability p_image 1 (image-to-video), with p_extend k uniform in extend_frames = [lo, hi]
    (continuation), else 0 (text-to-video); at most T - 1, so every clip keeps a frame to learn from
    (0 for one-frame image clips). k is rounded up to a `multiple` (a DiT's temporal patch: one t per
    token). Always two draws from `generator`, so the stream after them does not depend on the outcome.
    """
    lo, hi = extend_frames
    u = torch.rand(n, generator=generator, device=generator.device)  # (n,)
    k_extend = torch.randint(lo, hi + 1, (n,), generator=generator, device=generator.device)  # (n,)
    k = torch.where(u < p_image, torch.ones_like(k_extend), torch.where(u < p_image + p_extend, k_extend, 0))
    k = -(-k // multiple) * multiple  # (n,)
    return k.clamp(max=(T - 1) // multiple * multiple)  # (n,)


def frame_timesteps(t: torch.Tensor, k: torch.Tensor, T: int) -> torch.Tensor:
    """Per-latent-frame timesteps (B, T) from t (B,): 0 (clean) on the first k[b] frames, t elsewhere."""
    known = torch.arange(T, device=t.device)[None, :] < k.to(t.device)[:, None]  # (B, T)
    return torch.where(known, torch.zeros_like(t)[:, None], t[:, None])  # (B, T)


def check_conditioning(p_image: float, p_extend: float, extend_frames: list[int] | tuple[int, int]) -> tuple[int, int]:
    """Validated (lo, hi) for the training draws; errors name the dit_train key."""
    for name, p in (("p_image", p_image), ("p_extend", p_extend)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dit_train.{name} must be in [0, 1], got {p}")
    if p_image + p_extend > 1:
        raise ValueError(f"dit_train.p_image + dit_train.p_extend must be <= 1, got {p_image} + {p_extend}")
    if len(extend_frames) != 2 or not 1 <= extend_frames[0] <= extend_frames[1]:
        raise ValueError(f"dit_train.extend_frames must be [lo, hi] latent frames with 1 <= lo <= hi, "
                         f"got {list(extend_frames)}")  # fmt: skip
    return int(extend_frames[0]), int(extend_frames[1])


def clean_known(model: Callable, known: torch.Tensor) -> Callable:
    """Velocity callable whose first k latent frames are `known`, clean: the model sees them with t = 0.

    Before each call the known latents are put into those frames (whatever the sampler carries there), then
    diffusion.fixed_frames gives the model per-latent-frame timesteps (B, T), 0 on the known frames and the
    step's t elsewhere, as in training with p_image / p_extend (and as Wan2.2-TI2V's per-token timesteps
    do), and their velocity 0. The caller pins those frames to `known` at the end.
    """
    k = known.shape[2]

    def f(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        B, _, T = x.shape[:3]
        x = torch.cat([known.to(x).expand(B, -1, -1, -1, -1), x[:, :, k:]], dim=2)  # (B, C, T, h, w)
        clean = (torch.arange(T, device=x.device) < k).expand(B, T)  # (B, T)
        return diffusion.fixed_frames(model, clean)(x, t, **cond)

    return f
