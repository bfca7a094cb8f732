"""Shared leaves of the denoiser: RMSNorm, timestep embedding, adaLN modulation, 3D rotary embedding."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

class RMSNorm(nn.Module):
    """RMS norm over the last axis with a learnable scale, computed in float32 and returned in the input dtype.

    torch.nn.RMSNorm under bf16 autocast sees a bf16 input and a float32 weight and falls back to its slow
    unfused path (with a warning); QK-norm exists for bf16 stability, so normalise in float32. Each row is
    first divided by its largest magnitude (RMS norm is scale-invariant): past ~1.8e19 the float32 sum of
    squares overflows and the norm silently returned zeros, so QK-norm could not stop the very overflow it
    is for (tests/test_qk_norm.py).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        with torch.no_grad():  # a per-row constant: changes neither the value nor the gradient of the norm
            peak = x32.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
        return F.rms_norm(x32 / peak, self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def _groups(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View tokens x (B, N, D) as (B, G, N/G, D) and p (B, D) or (B, G, D) as (B, G, 1, D), G the groups of p."""
    p = p.unsqueeze(1) if p.ndim == 2 else p  # (B, G, D); (B, D) is one group: every token
    B, N, D = x.shape
    return x.view(B, p.shape[1], N // p.shape[1], D), p.unsqueeze(2)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift on x (B, N, D).

    shift/scale are (B, D) per sample, or (B, G, D) per group of N/G consecutive tokens (G = frames for a
    per-frame timestep, G = N per token); the grouping is a view, so the per-sample case costs what it did.
    """
    xg, scale = _groups(x, scale)
    return (xg * (1 + scale) + shift.view_as(scale)).view_as(x)  # (B, N, D)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """adaLN gate: x * g on x (B, N, D), g (B, D) or (B, G, D) grouped as in modulate."""
    xg, g = _groups(x, g)
    return (xg * g).view_as(x)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a timestep t in [0, 1] followed by a two-layer MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, frequency_size) cos/sin features."""
        # t lives in [0, 1]; DiT's frequencies were chosen for integer steps in [0, 1000], so scale t up
        # to keep the low frequencies distinguishable between nearby timesteps.
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, frequency_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, hidden_size)."""
        freq = self.sinusoid(t).to(self.mlp[0].weight.dtype)  # (B, F)
        return self.mlp(freq)  # (B, D)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the (t, h, w) axes: about 1/4 time, 3/8 height, 3/8 width, each even."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6 (hidden_size / num_heads), got {head_dim}")
    # Video latents have far fewer frames than rows/columns, so time gets the smallest share (Latte/CogVideoX-like).
    dt = max(2, 2 * round(head_dim / 8))
    rest = head_dim - dt
    dh = 2 * (rest // 4)
    dw = rest - dh
    return dt, dh, dw


class RoPE3D(nn.Module):
    """3D rotary position embedding over a (T, H, W) token grid; any grid size (extrapolation, T=1) works.

    Each of the head's head_dim // 2 rotation pairs belongs to one axis; pair i rotates channels i and
    i + head_dim // 2 (the "rotate half" convention) by angle position_axis * frequency_i.
    cos/sin tables are computed on the fly per grid and cached (not saved in checkpoints).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_cache: int = 32):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_cache = max_cache
        self.split = rope_split(head_dim)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _axis_freqs(self, dim: int, device: torch.device) -> torch.Tensor:
        # Standard RoPE spectrum per axis: theta^(-2k/dim), k = 0 .. dim/2 - 1.
        return self.theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)  # (dim/2,)

    def forward(self, T: int, H: int, W: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T*H*W, head_dim), float32, tokens in (t, h, w) row-major order."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (T, H, W, device)
        if key in self._cache:
            return self._cache[key]
        dt, dh, dw = self.split
        t, h, w = torch.meshgrid(
            torch.arange(T, device=device, dtype=torch.float64),
            torch.arange(H, device=device, dtype=torch.float64),
            torch.arange(W, device=device, dtype=torch.float64),
            indexing="ij",
        )  # each (T, H, W)
        angles = torch.cat(
            [
                t.reshape(-1, 1) * self._axis_freqs(dt, device),  # (N, dt/2)
                h.reshape(-1, 1) * self._axis_freqs(dh, device),  # (N, dh/2)
                w.reshape(-1, 1) * self._axis_freqs(dw, device),  # (N, dw/2)
            ],
            dim=-1,
        )  # (N, head_dim/2); float64 so large positions keep their precision
        angles = torch.cat([angles, angles], dim=-1)  # (N, head_dim)
        cos, sin = angles.cos().float(), angles.sin().float()
        if len(self._cache) >= self.max_cache:
            self._cache.clear()
        self._cache[key] = (cos, sin)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (..., N, head_dim) by cos/sin (N, head_dim); computed in float32, returned in the input dtype."""
    qf, kf = q.float(), k.float()
    q_out = qf * cos + _rotate_half(qf) * sin
    k_out = kf * cos + _rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)
