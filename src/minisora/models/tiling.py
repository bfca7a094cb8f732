"""Memory-bounded autoencoding: spatial tiles blended linearly over their overlap, causal temporal chunks.

Spatial tiles are independent calls, so a tile's border sees zero padding where the full frame has
neighbours; the overlap, blended with linear ramps, hides that seam (the error is measured in
tests/test_autoencoder.py). Temporal chunks are exact: the causal layers carry their state from one
chunk to the next (vae_blocks.causal_stream), so chunked == unchunked up to float rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minisora.models.vae_blocks import causal_stream


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), consecutive ones overlapping by >= `overlap`.

    Starts are multiples of `align` (so tiles map to whole latent pixels); the last tile ends at `size`.
    """
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    if any(s % align for s in starts):
        raise ValueError(f"tiles of {tile} with overlap {overlap} over {size} px do not align to multiples of {align}")
    return starts


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool, device: torch.device) -> torch.Tensor:
    """Blend weights along one axis of a tile: rising over `overlap` at interior edges, 1 elsewhere."""
    w = torch.ones(length, device=device)
    if overlap > 0:
        up = (torch.arange(overlap, device=device) + 0.5) / overlap  # strictly inside (0, 1)
        if ramp_start:
            w[:overlap] = torch.minimum(w[:overlap], up)
        if ramp_end:
            w[-overlap:] = torch.minimum(w[-overlap:], up.flip(0))
    return w


def tiled_spatial(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: float, align: int = 1
) -> torch.Tensor:
    """Apply `fn` (B, C, T, h, w) -> (B, C', T', h*scale, w*scale) on overlapping spatial tiles and blend them."""
    B, C, T, H, W = x.shape
    out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    ys, xs = tile_starts(H, tile, overlap, align), tile_starts(W, tile, overlap, align)
    o = round(overlap * scale)
    for y in ys:
        for x0 in xs:
            piece = fn(x[:, :, :, y : y + tile, x0 : x0 + tile])  # (B, C', T', th, tw)
            th, tw = piece.shape[-2:]
            if out is None:
                out = piece.new_zeros(*piece.shape[:3], round(H * scale), round(W * scale))
                weight = piece.new_zeros(round(H * scale), round(W * scale))
            wy = _ramp(th, o, y > 0, y + tile < H, piece.device)
            wx = _ramp(tw, o, x0 > 0, x0 + tile < W, piece.device)
            w = wy[:, None] * wx[None, :]  # (th, tw)
            Y, X = round(y * scale), round(x0 * scale)
            out[..., Y : Y + th, X : X + tw] += piece * w
            weight[Y : Y + th, X : X + tw] += w
    assert out is not None and weight is not None
    return out / weight


def chunked_causal(
    fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, x: torch.Tensor, first: int, chunk: int
) -> torch.Tensor:
    """Apply causal `fn` (built on `module`) to frames [0, first), then successive `chunk` frames, and concatenate.

    `first` is 1 + a multiple of the temporal factor (it holds frame 0, which the causal layers treat alone);
    `chunk` is a multiple of it. The result equals fn(x) because the causal layers stream their state.
    """
    T = x.shape[2]
    if T <= first:
        return fn(x)
    with causal_stream(module):
        outs = [fn(x[:, :, :first])]
        for t in range(first, T, chunk):
            outs.append(fn(x[:, :, t : t + chunk]))
    return torch.cat(outs, dim=2)
