"""Reconstruction metrics over video tensors (B, C, T, H, W), plain torch: PSNR and SSIM per video.

Values are expected in [-1, 1] (the project's pixel range), so `data_range` defaults to 2; pass 1.0 or
255.0 for other ranges. Both return one value per video, averaged over frames (SSIM) or pixels (PSNR).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"expected two (B, C, T, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per video, (B,): 10 log10(range^2 / MSE); inf where x == y."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range**2 / mse)).float()  # mse == 0 -> inf


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per video, (B,): Gaussian 11x11 window per frame and channel.

    Frames smaller than the window use the largest odd window that fits; only fully covered positions count.
    """
    _check_pair(x, y)
    B, C, T, H, W = x.shape
    size = min(window, H - (1 - H % 2), W - (1 - W % 2))  # largest odd size <= min(H, W)
    g = _gaussian_window(size, sigma, x.device)
    kernel_h = g.view(1, 1, size, 1).expand(C, 1, size, 1)
    kernel_w = g.view(1, 1, 1, size).expand(C, 1, 1, size)

    def blur(v: torch.Tensor) -> torch.Tensor:  # separable Gaussian filter, valid positions only
        return F.conv2d(F.conv2d(v, kernel_h, groups=C), kernel_w, groups=C)

    a = rearrange(x.double(), "b c t h w -> (b t) c h w")
    b = rearrange(y.double(), "b c t h w -> (b t) c h w")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))  # (B*T, C, h, w)
    return rearrange(s, "(b t) c h w -> b (t c h w)", b=B).mean(dim=1).float()
