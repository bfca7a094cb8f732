"""Frechet Video Distance (Unterthiner et al. 2018) with the I3D network StyleGAN-V and Latte use.

The detector is StyleGAN-V's `i3d_torchscript.pt` (I3D trained on Kinetics-400, converted from the TF-Hub
model of the original FVD code), a file the user downloads once from I3D_URL; nothing is fetched here.
It is called exactly as StyleGAN-V's `src/metrics/frechet_video_distance.py` and Latte's
`tools/metrics/frechet_video_distance.py` call it:

    detector(videos, rescale=True, resize=True, return_features=True) -> (B, 400) float
    videos: uint8 (B, 3, T, H, W) in [0, 255]; the script itself maps to [-1, 1] (rescale) and to 224x224
    (resize); the features are the 400 logits before the softmax.

FVD is the Frechet distance between Gaussians fitted to the features of N real and N generated clips:
||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). Statistics are float64 and the covariance divides
by N (StyleGAN-V's FeatureStats; dividing by N - 1 would change FVD by a relative ~1/N). Latte's protocol:
16-frame clips at 256x256, real clips every 3rd frame of UCF-101; the metric is named after 2048 clips per set.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

# Where StyleGAN-V's FVD code downloads its detector from (src/metrics/frechet_video_distance.py).
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_KWARGS = {"rescale": True, "resize": True, "return_features": True}
I3D_FEATURES = 400  # Kinetics-400 logits
# StyleGAN-V feeds 128 frames per detector call at 256x256: 8 clips of 16 frames.
DEFAULT_BATCH = 8


class DetectorError(ValueError):
    """The I3D file is not a TorchScript module with StyleGAN-V's calling convention."""


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """torch.jit.load the detector file in eval mode, or raise naming the file and where to get the real one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D detector {path} not found; download StyleGAN-V's i3d_torchscript.pt once from {I3D_URL} "
            f"(e.g. `wget -O {path.name} '{I3D_URL}'`) and pass its path"
        )
    try:
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": the published detector is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            detector = torch.jit.load(str(path), map_location=torch.device(device))
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DetectorError(
            f"{path}: not a TorchScript file ({first[:200]}); FVD needs StyleGAN-V's i3d_torchscript.pt from {I3D_URL}"
        ) from None
    return detector.eval()


def to_i3d_input(videos: Sequence[np.ndarray] | np.ndarray, num_frames: int, size: int) -> torch.Tensor:
    """uint8 clips (T, H, W, 3) -> uint8 (B, 3, num_frames, size, size): the first num_frames frames, the short
    side resized to `size` (bilinear, antialiased) and the centre cropped; clips already that size are untouched."""
    out = []
    for i, video in enumerate(videos):
        video = np.asarray(video)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"clip {i}: expected uint8 (T, H, W, 3) frames, got {video.dtype} {video.shape}")
        T, H, W, _ = video.shape
        if T < num_frames:
            raise ValueError(f"clip {i} has {T} frames, the protocol needs {num_frames}")
        x = rearrange(torch.from_numpy(np.ascontiguousarray(video[:num_frames])), "t h w c -> t c h w")
        if (H, W) != (size, size):
            scale = size / min(H, W)
            h, w = max(size, round(H * scale)), max(size, round(W * scale))
            x = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            top, left = (h - size) // 2, (w - size) // 2
            x = x[:, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)  # (T, 3, S, S)
        out.append(rearrange(x, "t c h w -> c t h w"))
    return torch.stack(out)  # (B, 3, T, S, S)


class I3DFeatures:
    """Features of uint8 clips (B, 3, T, H, W) from the I3D TorchScript detector, in batches; float64 (B, F)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.device, self.batch_size = Path(path).expanduser(), torch.device(device), batch_size
        self.detector = load_i3d(self.path, self.device)

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"expected uint8 clips (B, 3, T, H, W), got {clips.dtype} {tuple(clips.shape)}")
        feats = [self._run(clips[i : i + self.batch_size]) for i in range(0, len(clips), self.batch_size)]
        return torch.cat(feats) if feats else torch.zeros(0, I3D_FEATURES, dtype=torch.float64)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        B = batch.shape[0]
        try:
            out = self.detector(batch.to(self.device), **I3D_KWARGS)
        except RuntimeError as e:  # TorchScript raises RuntimeError for wrong arguments and failing ops
            first = str(e).strip().splitlines()[0][:200]
            raise DetectorError(
                f"{self.path}: calling it as StyleGAN-V does (uint8 (B, 3, T, H, W), rescale=True, resize=True, "
                f"return_features=True) failed on a {tuple(batch.shape)} batch: {first}"
            ) from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, I3D_FEATURES):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DetectorError(f"{self.path}: expected I3D features (B={B}, {I3D_FEATURES}), got {got}")
        out = out.detach().to("cpu", torch.float64)
        if not torch.isfinite(out).all():
            raise DetectorError(f"{self.path}: non-finite features on a {tuple(batch.shape)} batch")
        return out  # (B, F)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and covariance (F, F) in float64 of features (N, F); the covariance divides by N (StyleGAN-V)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need features (N >= 2, F), got {tuple(features.shape)}")
    x = features.to(torch.float64)
    mu = x.mean(dim=0)  # (F,)
    centred = x - mu  # (N, F); two passes: no cancellation as in E[x x^T] - mu mu^T
    return mu, centred.T @ centred / x.shape[0]


def _psd_eigenvalues(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with rounding noise set to 0: below D * eps * max they carry no information,
    and their square roots (~1e-8 each in float64) would add up over the null space of a singular covariance."""
    tol = w.abs().max() * w.shape[0] * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    w, v = torch.linalg.eigh(a)
    return (v * _psd_eigenvalues(w).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)): that matrix is similar to S1 S2 but
    symmetric PSD, so eigvalsh applies and stays real for singular covariances (fewer clips than features), where
    a general square root of the non-symmetric S1 S2 (scipy.linalg.sqrtm in StyleGAN-V) returns complex parts
    that must be thrown away.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    D = mu1.shape[0]
    if mu1.shape != (D,) or mu2.shape != (D,) or s1.shape != (D, D) or s2.shape != (D, D):
        raise ValueError(f"expected means (F,) and covariances (F, F), got {tuple(mu1.shape)}, {tuple(s1.shape)}, "
                         f"{tuple(mu2.shape)}, {tuple(s2.shape)}")  # fmt: skip
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root = _sqrtm_psd(s1)
    middle = root @ s2 @ root
    tr_sqrt = _psd_eigenvalues(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def fvd(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FVD from I3D features (N_real, F) and (N_fake, F)."""
    if real_features.shape[1:] != fake_features.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(real_features.shape)} vs {tuple(fake_features.shape)}")
    return frechet_distance(*feature_stats(real_features), *feature_stats(fake_features))
