"""Videos longer than the training window: windows sampled one after another, each continuing the one before.

Every window is a clip of the training length T (17 frames by default). Its first k latent frames are the
last K = 1 + kt*(k - 1) frames of the video so far, encoded again as the first frames of a new clip, so the
causal VAE's first-frame rule holds (latent frame 0 is one frame alone, then kt frames each): the
conditioning latents are exactly what the autoencoder gives a clip that starts there, as in training. The
window's remaining T - K frames are appended. They are decoded together with the K context frames, so the
decoder's causal convolutions run across the seam from real context, not from a cold start: nothing jumps
where one window ends and the next begins (eval/shapes.py: seam_jumps measures it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minisora.conditioning import fit_frames, load_frames
from minisora.io import probe

if TYPE_CHECKING:
    from minisora.pipeline import TextToVideoPipeline

DEFAULT_OVERLAP = 2  # latent frames of context per window: 5 frames at kt = 4, enough to show speed and direction


def context_frames(overlap: int, kt: int) -> int:
    """Pixel frames behind `overlap` latent frames at the start of a clip (the first latent frame is one frame)."""
    return 1 + kt * (overlap - 1)


def read_all(source: Any, height: int, width: int) -> np.ndarray:
    """Every frame of a video file or uint8 (T, H, W, 3) array, fitted to height x width."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return load_frames(source, probe(source).num_frames, height, width)
    frames = source.cpu().numpy() if torch.is_tensor(source) else np.asarray(source)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return fit_frames(frames, height, width)


def window_count(start: int, extend_to: int, window: int, context: int) -> int:
    """Windows needed to grow a `start`-frame video to extend_to frames, each adding window - context frames."""
    new = window - context
    return -(-(extend_to - start) // new)


@torch.no_grad()
def extend_video(pipe: TextToVideoPipeline, prompts: Sequence[str], video: Any, extend_to: int, *,
                 overlap: int = DEFAULT_OVERLAP, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, seed: int | Sequence[int] = 0, callback=None,
                 **kwargs: Any) -> list[np.ndarray]:  # fmt: skip
    """The clip `video`, then frames sampled for each prompt until it is extend_to frames long: uint8 (N, H, W, 3) each.

    `video`: a path or uint8 (F, H, W, 3) array for every prompt, or a list of them, one per prompt (same length).
    num_frames is the window (default: the training clip length); `overlap` latent frames of context per
    window; kwargs go to sample_latents (steps, guidance, sampler, condition, ...). Each prompt's noise comes
    from its own seed's generator, drawn window after window, so batching never changes a video.
    """
    T, H, W = pipe.valid_size(*pipe._size(num_frames, height, width))
    kt = pipe.vae.temporal_compression
    latent_t = pipe.latent_shape(T, H, W)[1]
    if not isinstance(overlap, (int, np.integer)) or not 1 <= overlap < latent_t:
        raise ValueError(f"overlap must be 1 to {latent_t - 1} latent frames for a {T}-frame window, got {overlap!r}")
    K = context_frames(overlap, kt)
    per_prompt = isinstance(video, (list, tuple))
    if per_prompt and len(video) != len(prompts):
        raise ValueError(f"got {len(video)} videos for {len(prompts)} prompts")
    videos = [read_all(v, H, W) for v in video] if per_prompt else [read_all(video, H, W)] * len(prompts)
    start = len(videos[0])
    if any(len(v) != start for v in videos):
        raise ValueError(f"the videos to extend must have the same length, got {sorted({len(v) for v in videos})}")
    if start < K:
        raise ValueError(f"the video has {start} frame(s); {K} are needed as context ({overlap} latent frames)")
    if not isinstance(extend_to, (int, np.integer)) or extend_to <= start:
        raise ValueError(f"extend_to must be more frames than the video's {start}, got {extend_to!r}")
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for w in range(window_count(start, extend_to, T, K)):
        known = torch.cat([pipe.encode_frames(v[-K:]) for v in videos])  # (B, C, overlap, h, w)
        latents = pipe.sample_latents(
            list(prompts), num_frames=T, height=H, width=W, generator=generators, known=known,
            callback=None if callback is None else (lambda info, w=w: callback({**info, "window": w})), **kwargs,
        )  # (B, C, t, h, w)  # fmt: skip
        decoded = pipe.decode(latents)  # B x (T, H, W, 3)
        videos = [np.concatenate([v, d[K:]]) for v, d in zip(videos, decoded)]
    return [v[:extend_to] for v in videos]
