"""PSNR and SSIM over video tensors: identities, the PSNR formula on known noise, SSIM on constant frames."""

import math

import pytest
import torch

from minisora.eval.metrics import psnr, ssim


def test_identical_videos_give_inf_psnr_and_unit_ssim():
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("sigma,data_range", [(0.1, 2.0), (0.02, 2.0), (0.1, 1.0)])
def test_psnr_matches_formula_for_known_noise(sigma, data_range):
    # +-sigma noise has an MSE of exactly sigma^2, so PSNR = 10 log10(range^2 / sigma^2).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 4, 8, 8, generator=g)
    sign = torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1
    got = psnr(x + sigma * sign, x, data_range=data_range)
    expected = 10 * math.log10(data_range**2 / sigma**2)
    assert torch.allclose(got, torch.full((3,), expected), atol=1e-3)


def test_psnr_is_per_video():
    x = torch.zeros(2, 3, 2, 4, 4)
    y = x.clone()
    y[1] += 0.2  # only the second video differs: MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    got = psnr(y, x)
    assert torch.isinf(got[0]) and got[1].item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_of_constant_frames_matches_closed_form():
    # Constant frames have zero variance and covariance: SSIM = (2ab + c1) / (a^2 + b^2 + c1).
    a, b, data_range = 0.5, -0.25, 2.0
    x = torch.full((1, 3, 2, 16, 16), a)
    y = torch.full((1, 3, 2, 16, 16), b)
    c1 = (0.01 * data_range) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_falls_with_noise_and_is_symmetric():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 3, 24, 24, generator=g) * 2 - 1
    small = x + 0.05 * torch.randn(x.shape, generator=g)
    large = x + 0.5 * torch.randn(x.shape, generator=g)
    assert 1.0 > ssim(small, x).item() > ssim(large, x).item() > 0.0
    assert ssim(small, x).item() == pytest.approx(ssim(x, small).item(), abs=1e-6)


def test_ssim_on_frames_smaller_than_window():
    x = torch.rand(1, 3, 2, 6, 6)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(x, x.flip(-1)).item() < 1.0


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 2, 4, 8))
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(3, 2, 4, 4), torch.zeros(3, 2, 4, 4))
