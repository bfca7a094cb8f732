"""FVD: the Frechet distance against closed forms, feature statistics, and a stand-in I3D TorchScript file
called the way StyleGAN-V calls the real one (uint8 (B, 3, T, H, W), rescale/resize/return_features)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minisora.eval.fvd import (
    I3D_FEATURES,
    I3D_URL,
    DetectorError,
    I3DFeatures,
    feature_stats,
    frechet_distance,
    fvd,
    to_i3d_input,
)

# Building the stand-in detector uses TorchScript, which torch marks deprecated; the real detector is TorchScript.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


class StandInI3D(nn.Module):
    """Random 3D conv net with the real detector's signature and output: (B, 400) logits with return_features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 16, kernel_size=3, stride=2)
        self.head = nn.Linear(16 * 2 * 2 * 2, I3D_FEATURES)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        x = x.float()
        if rescale:
            x = x / 127.5 - 1  # [0, 255] -> [-1, 1]
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        x = F.adaptive_avg_pool3d(torch.relu(self.conv(x)), 2).flatten(1)  # (B, 128)
        logits = self.head(x)  # (B, 400)
        return logits if return_features else logits.softmax(dim=1)


def save_stand_in(path: Path, module: nn.Module | None = None) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(module if module is not None else StandInI3D()), str(path))
    return path


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> Path:
    return save_stand_in(tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt")


def random_clips(n: int, seed: int, T: int = 16, size: int = 48, bright: int = 0) -> np.ndarray:
    """uint8 (n, T, size, size, 3) noise clips; `bright` shifts them up."""
    g = np.random.default_rng(seed)
    return np.clip(g.integers(0, 200, (n, T, size, size, 3)) + bright, 0, 255).astype(np.uint8)


# ---- the Frechet distance ---------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_equals_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(400, generator=g, dtype=torch.float64), torch.randn(400, generator=g, dtype=torch.float64)
    s1, s2 = torch.rand(400, generator=g, dtype=torch.float64) * 3, torch.rand(400, generator=g, dtype=torch.float64)
    expected = float((mu1 - mu2).pow(2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    # the same in a rotated basis (non-diagonal, non-commuting with nothing): distances are rotation invariant
    q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    rotated = frechet_distance(q @ mu1, q @ torch.diag(s1) @ q.T, q @ mu2, q @ torch.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_non_commuting_covariances_equals_the_2x2_closed_form():
    # For 2x2 M with eigenvalues l1, l2 >= 0: Tr sqrt(M) = sqrt(l1) + sqrt(l2) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = torch.tensor([[2.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    m = s1 @ s2
    tr_sqrt = math.sqrt(float(m.trace()) + 2 * math.sqrt(float(torch.linalg.det(m))))
    mu1, mu2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    expected = 0.25 + 4.0 + float(s1.trace() + s2.trace()) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_a_general_eigenvalue_computation_on_random_covariances():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(60, 60, generator=g, dtype=torch.float64)
    b = torch.randn(60, 60, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T / 60 + 0.01 * torch.eye(60, dtype=torch.float64), b @ b.T / 60
    mu = torch.zeros(60, dtype=torch.float64)
    # Independent route: eigenvalues of the non-symmetric product S1 S2 (real and >= 0 in theory).
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    expected = float(s1.trace() + s2.trace() - 2 * tr_sqrt)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-8)


def test_fvd_of_a_set_with_itself_is_zero_symmetric_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(400, 400, generator=g, dtype=torch.float64) / 20
    real = torch.randn(300, 400, generator=g, dtype=torch.float64) @ mix  # 300 < 400: singular covariance
    fake = torch.randn(300, 400, generator=g, dtype=torch.float64) @ mix
    assert abs(fvd(real, real)) < 1e-9 * float(feature_stats(real)[1].trace())
    assert fvd(real, fake) == pytest.approx(fvd(fake, real), rel=1e-9)
    assert 0 < fvd(real, fake) < fvd(real, fake + 0.5) < fvd(real, fake + 1.0)


def test_feature_stats_are_float64_mean_and_covariance_over_n():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]], dtype=torch.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == torch.float64
    torch.testing.assert_close(mu, torch.tensor([3.0, 3.0], dtype=torch.float64))
    centred = x.double() - mu
    torch.testing.assert_close(sigma, centred.T @ centred / 3)  # divides by N, as StyleGAN-V's FeatureStats
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(x[:1])


# ---- the detector -----------------------------------------------------------------------------


def test_features_have_the_detector_shape_and_are_deterministic_and_batch_independent(i3d_file):
    clips = to_i3d_input(random_clips(5, seed=0), num_frames=16, size=48)  # (5, 3, 16, 48, 48) uint8
    assert clips.shape == (5, 3, 16, 48, 48) and clips.dtype == torch.uint8
    features = I3DFeatures(i3d_file, batch_size=2)
    a = features(clips)
    assert a.shape == (5, I3D_FEATURES) and a.dtype == torch.float64
    torch.testing.assert_close(features(clips), a, rtol=0, atol=0)
    torch.testing.assert_close(I3DFeatures(i3d_file, batch_size=5)(clips), a, rtol=1e-6, atol=1e-6)
    other = I3DFeatures(i3d_file)(to_i3d_input(random_clips(5, seed=0, bright=80), 16, 48))
    assert (other - a).abs().max() > 1e-3  # the features see the pixels


def test_fvd_from_the_detector_separates_sets_and_is_zero_for_the_same_clips(i3d_file):
    features = I3DFeatures(i3d_file, batch_size=8)
    dark = features(to_i3d_input(random_clips(24, seed=1), 16, 32))
    dark2 = features(to_i3d_input(random_clips(24, seed=2), 16, 32))
    bright = features(to_i3d_input(random_clips(24, seed=3, bright=120), 16, 32))
    assert abs(fvd(dark, dark)) < 1e-9
    assert fvd(dark, dark2) < fvd(dark, bright)
    assert fvd(dark, bright) == pytest.approx(fvd(bright, dark), rel=1e-9)


def test_clips_are_cut_to_the_protocol_frames_and_size():
    clip = np.zeros((17, 36, 64, 3), np.uint8)
    clip[:, :, 32:] = 255  # right half white
    clip[3] = 7
    x = to_i3d_input([clip], num_frames=16, size=32)  # short side 36 -> 32, then the centre 32x32
    assert x.shape == (1, 3, 16, 32, 32)
    assert (x[0, :, 3] == 7).all()  # frame order kept, the 17th frame dropped
    assert x[0, 0, 0, :, :10].max() == 0 and x[0, 0, 0, :, -10:].min() == 255
    untouched = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(to_i3d_input([untouched], 16, 32)[0], torch.from_numpy(untouched).permute(3, 0, 1, 2))
    with pytest.raises(ValueError, match="clip 0 has 8 frames, the protocol needs 16"):
        to_i3d_input([clip[:8]], 16, 32)


def test_bad_detector_files_are_named(tmp_path, i3d_file):
    with pytest.raises(FileNotFoundError, match=f"i3d.pt not found; download .*{I3D_URL[:30]}"):
        I3DFeatures(tmp_path / "i3d.pt")
    state_dict = tmp_path / "state_dict.pt"
    torch.save(StandInI3D().state_dict(), state_dict)
    with pytest.raises(DetectorError, match="state_dict.pt: not a TorchScript file"):
        I3DFeatures(state_dict)
    text = tmp_path / "page.pt"
    text.write_text("<html>Dropbox: sign in</html>")  # what a failed download often leaves behind
    with pytest.raises(DetectorError, match="page.pt: not a TorchScript file"):
        I3DFeatures(text)

    class NoKeywords(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().flatten(1)[:, :400]

    plain = save_stand_in(tmp_path / "plain.pt", NoKeywords())
    clips = to_i3d_input(random_clips(2, seed=0, size=32), 16, 32)
    with pytest.raises(DetectorError, match="plain.pt: calling it as StyleGAN-V does"):
        I3DFeatures(plain)(clips)

    class Classes(nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                    return_features: bool = False) -> torch.Tensor:  # fmt: skip
            return x.float().mean(dim=(1, 3, 4))  # (B, T): not (B, 400)

    with pytest.raises(DetectorError, match=r"expected I3D features \(B=2, 400\), got \(2, 16\)"):
        I3DFeatures(save_stand_in(tmp_path / "classes.pt", Classes()))(clips)
