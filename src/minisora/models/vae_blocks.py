"""Building blocks of the causal video VAE: causal 3D convs, per-frame norms, residual space/time resampling.

Every layer here is causal in time: output frame i depends on input frames <= i only. Layers that look
back in time (CausalConv3d) or treat the first frame specially (Downsample, Upsample) can also run in
*streaming* mode (see `causal_stream`), carrying their state from one temporal chunk to the next so that
encoding a long video chunk by chunk gives the same result as encoding it at once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn


class Streamable(nn.Module):
    """Base of the layers that keep state across temporal chunks while streaming."""

    def __init__(self) -> None:
        super().__init__()
        self.streaming = False
        self.state: torch.Tensor | None = None  # what the next chunk needs from the previous one
        self.started = False  # whether the first chunk (which holds frame 0) has been seen

    def reset_stream(self, streaming: bool) -> None:
        self.streaming, self.state, self.started = streaming, None, False


@contextmanager
def causal_stream(module: nn.Module) -> Iterator[None]:
    """Within this block, successive calls of `module` on consecutive temporal chunks act as one call."""
    layers = [m for m in module.modules() if isinstance(m, Streamable)]
    for m in layers:
        m.reset_stream(True)
    try:
        yield
    finally:
        for m in layers:
            m.reset_stream(False)


class CausalConv3d(Streamable):
    """3D convolution padded in time from the past only, by replicating the first frame."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            if self.state is not None:  # later chunk: the past is the end of the previous chunk
                x = torch.cat([self.state, x], dim=2)
            else:  # start of the video: frame 0 stands in for the frames before it
                x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
            if self.streaming:
                self.state = x[:, :, -self.time_pad :].detach()
        return self.conv(x)  # (B, C_out, T, H, W)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each pixel and frame: no statistics across space or time (DC-AE's norm).

    Unlike GroupNorm it mixes no information across space, so spatial tiles agree with the full frame away
    from their borders, and none across time, so it is causal and chunking is exact.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return x * self.weight[:, None, None, None] + self.bias[:, None, None, None]


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame (over channel groups and space), so it stays causal in time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        return rearrange(super().forward(x), "(b t) c h w -> b c t h w", t=T)


NORMS = ("rms", "group", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "rms":
        return ChannelRMSNorm(channels)
    if kind == "group":
        return FrameGroupNorm(min(32, channels // 4) if channels >= 8 else 1, channels, eps=1e-6)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ResBlock(nn.Module):
    """norm-SiLU-conv twice plus identity; the second conv starts at zero so each block starts as identity."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, channels)
        self.conv1 = CausalConv3d(channels, channels)
        self.norm2 = make_norm(norm, channels)
        self.conv2 = CausalConv3d(channels, channels)
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class FrameAttention(nn.Module):
    """Self-attention over the pixels of each frame (no attention across time keeps it causal)."""

    def __init__(self, channels: int, norm: str, head_dim: int = 64) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = make_norm(norm, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> (b t) (h w) c")  # (B*T, H*W, C)
        q, k, v = rearrange(self.qkv(tokens), "n l (three m d) -> three n m l d", three=3, m=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B*T, heads, H*W, C/heads)
        out = self.proj(rearrange(out, "n m l d -> n l (m d)"))  # (B*T, H*W, C)
        return x + rearrange(out, "(b t) (h w) c -> b c t h w", b=B, h=H)


def space_time_to_channel(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    return rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=ft, fh=fs, fw=fs)


def channel_to_space_time(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    return rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=ft, fh=fs, fw=fs)


def check_resample(kind: str, in_channels: int, out_channels: int, factor: int) -> None:
    """Channel counts must let the residual shortcut average (down) or repeat (up) whole channel groups."""
    if kind == "down":
        ok = out_channels % factor == 0 and (in_channels * factor) % out_channels == 0
        need = f"out_channels divisible by {factor} and in_channels*{factor} divisible by out_channels"
    else:
        ok = (out_channels * factor) % in_channels == 0
        need = f"out_channels*{factor} divisible by in_channels"
    if not ok:
        raise ValueError(
            f"{kind}sampling {in_channels} -> {out_channels} channels by a factor {factor} needs {need}; "
            "choose base_channels/channel_multipliers as powers of two"
        )


class Downsample(Streamable):
    """Strided space(-time) downsampling with a residual space-to-channel shortcut (DC-AE, Chen et al. 2024).

    Main path: conv to out/r channels, then fold each ft x fs x fs block into channels (r = ft*fs*fs).
    Shortcut: the same fold on the input, averaged over channel groups down to `out` channels, so the block
    starts close to a lossless rearrangement and deep compression trains like a shallow one. In time the
    first frame is kept alone: ft-1 copies of it are prepended so that frames 1.. fold in groups of ft,
    which maps T = 1 + k*ft frames to 1 + k.
    """

    def __init__(self, in_channels: int, out_channels: int, time_factor: int, space_factor: int) -> None:
        super().__init__()
        self.ft, self.fs = time_factor, space_factor
        r = time_factor * space_factor * space_factor
        check_resample("down", in_channels, out_channels, r)
        self.conv = CausalConv3d(in_channels, out_channels // r)
        self.group = in_channels * r // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ft > 1 and not self.started:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.ft - 1, -1, -1), x], dim=2)
        self.started = self.streaming
        main = space_time_to_channel(self.conv(x), self.ft, self.fs)  # (B, C_out, T/ft, H/fs, W/fs)
        shortcut = reduce(space_time_to_channel(x, self.ft, self.fs), "b (c g) t h w -> b c t h w", "mean", g=self.group)
        return main + shortcut


class Upsample(Streamable):
    """Inverse of Downsample: conv to out*r channels unfolded into space(-time), plus a channel-repeat shortcut.

    In time the first latent frame unfolds to ft frames of which only the last is kept (it was built from
    ft copies of frame 0), which maps 1 + k latent frames back to 1 + k*ft.
    """

    def __init__(self, in_channels: int, out_channels: int, time_factor: int, space_factor: int) -> None:
        super().__init__()
        self.ft, self.fs = time_factor, space_factor
        r = time_factor * space_factor * space_factor
        check_resample("up", in_channels, out_channels, r)
        self.conv = CausalConv3d(in_channels, out_channels * r)
        self.repeats = out_channels * r // in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = channel_to_space_time(self.conv(x), self.ft, self.fs)
        shortcut = channel_to_space_time(x.repeat_interleave(self.repeats, dim=1), self.ft, self.fs)
        out = main + shortcut  # (B, C_out, T*ft, H*fs, W*fs)
        if self.ft > 1 and not self.started:
            out = out[:, :, self.ft - 1 :]
        self.started = self.streaming
        return out
