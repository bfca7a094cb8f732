"""Rectified-flow math: interpolation, loss, timestep sampling, samplers on an analytic field, CFG."""

import math

import pytest
import torch

from minisora import diffusion as D

MU, S = 2.0, 0.5  # data distribution N(MU, S^2) per dimension


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """Exact marginal velocity E[noise - x0 | x_t = x] for data N(MU, S^2) and x_t = (1-t) x0 + t noise."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    a = 1 - t
    var = a**2 * S**2 + t**2
    return (t - a * S**2) * (x - a * MU) / var - MU


def test_add_noise_endpoints_and_target():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(D.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(D.add_noise(x0, noise, torch.ones(3)), noise)
    mid = D.add_noise(x0, noise, torch.tensor([0.25, 0.5, 0.75]))
    assert torch.allclose(mid[1], (x0[1] + noise[1]) / 2)
    assert torch.equal(D.velocity_target(x0, noise), noise - x0)


@pytest.mark.parametrize("t_value", [0.0, 0.3, 1.0])
def test_flow_loss_analytic(t_value):
    x0, noise = torch.randn(4, 3, 2, 5, 5), torch.randn(4, 3, 2, 5, 5)
    t = torch.full((4,), t_value)
    exact = D.flow_loss(lambda x_t, t: noise - x0, x0, t, noise)
    assert exact.shape == (4,) and torch.allclose(exact, torch.zeros(4))
    zero = D.flow_loss(lambda x_t, t: torch.zeros_like(x_t), x0, t, noise)
    assert torch.allclose(zero, (noise - x0).square().flatten(1).mean(1))
    if t_value > 0:  # a network that predicts the clean sample exactly also has zero (velocity) loss
        x0_exact = D.flow_loss(lambda x_t, t: x0, x0, t, noise, prediction="x0")
        assert torch.allclose(x0_exact, torch.zeros(4), atol=1e-8)


def test_flow_loss_passes_condition_and_x0_clamp():
    seen = {}

    def model(x_t, t, labels=None):
        seen["labels"] = labels
        return torch.zeros_like(x_t)

    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    loss = D.flow_loss(model, x0, torch.tensor([0.0, 0.5]), noise, prediction="x0", labels=torch.tensor([1, 2]))
    assert torch.equal(seen["labels"], torch.tensor([1, 2]))
    # x0_hat = 0, x_t = (1-t): v_hat = (1-t)/max(t, 0.05); true v = -1
    assert torch.allclose(loss, torch.tensor([(1 / 0.05 + 1) ** 2, (0.5 / 0.5 + 1) ** 2]))
    with pytest.raises(ValueError, match="prediction"):
        D.flow_loss(model, x0, torch.rand(2), noise, prediction="eps")


def test_to_velocity_x0_roundtrip():
    x0, noise, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0.1, 0.5, 0.9])
    x_t = D.add_noise(x0, noise, t)
    assert torch.allclose(D.to_velocity(x0, x_t, t, "x0"), noise - x0, atol=1e-5)
    assert torch.allclose(D.velocity_model(lambda x, t: x0, "x0")(x_t, t), noise - x0, atol=1e-5)


def test_shift_and_resolution_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(D.shift_t(t, 1.0), t)
    shifted = D.shift_t(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert math.isclose(D.shift_t(0.5, 3.0), 0.75)
    assert math.isclose(D.resolution_shift(256), 1.0)
    assert math.isclose(D.resolution_shift(4096), 3.0)
    assert math.isclose(D.resolution_shift(64), 1.0)  # no shift below the base token count
    assert 1.0 < D.resolution_shift(1024) < D.resolution_shift(2048) < 3.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sample_t_range_median_and_determinism(shift):
    t = D.sample_t(20000, generator=torch.Generator().manual_seed(0), shift=shift)
    assert t.shape == (20000,) and (t > 0).all() and (t < 1).all()
    assert abs(t.median().item() - D.shift_t(0.5, shift)) < 0.01
    again = D.sample_t(20000, generator=torch.Generator().manual_seed(0), shift=shift)
    assert torch.equal(t, again)
    low = D.sample_t(20000, generator=torch.Generator().manual_seed(0), mean=-1.0)
    assert abs(low.median().item() - 1 / (1 + math.e)) < 0.01


def test_timesteps():
    ts = D.timesteps(4)
    assert torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = D.timesteps(4, shift=3.0)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > ts[1:-1]).all()
    assert (shifted[1:] < shifted[:-1]).all()


def test_samplers_on_gaussian_field():
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    exact = MU + S * z  # the ODE maps N(0, 1) to N(MU, S^2) affinely: the exact endpoint of each sample
    for sampler in (D.sample_euler, D.sample_heun):
        x = sampler(gaussian_velocity, z.clone(), D.timesteps(50))
        assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - S) < 0.02
    errors = {
        name: (sampler(gaussian_velocity, z.clone(), D.timesteps(6)) - exact).abs().max().item()
        for name, sampler in [("euler", D.sample_euler), ("heun", D.sample_heun)]
    }
    assert errors["heun"] < 0.5 * errors["euler"], errors
    # more steps, less error (Euler converges)
    fine = (D.sample_euler(gaussian_velocity, z.clone(), D.timesteps(100)) - exact).abs().max().item()
    assert fine < errors["euler"] / 5


def test_sampler_callback_and_determinism():
    calls = []
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    a = D.sample_heun(gaussian_velocity, noise.clone(), D.timesteps(5), callback=calls.append)
    b = D.sample_heun(gaussian_velocity, torch.randn(4, 3, generator=torch.Generator().manual_seed(7)), D.timesteps(5))
    assert torch.equal(a, b)
    assert [c["i"] for c in calls] == list(range(5))
    assert set(calls[0]) == {"i", "t", "x", "denoised"}
    assert torch.equal(calls[0]["x"], noise) and calls[0]["t"] == 1
    # at t = 1 the denoised estimate is x - v = E[x0] = MU for this field
    assert torch.allclose(calls[0]["denoised"], torch.full((4, 3), MU), atol=1e-5)


def _cond_model(x, t, context=None, context_mask=None, labels=None):
    """A toy conditional field: depends on the masked mean of the context and on labels."""
    out = x * t.reshape(-1, 1)
    if context is not None:
        m = context_mask.unsqueeze(-1).float()
        out = out + (context * m).sum(1).mean(-1, keepdim=True) / m.sum(1).clamp(min=1)
    if labels is not None:
        out = out + labels.float().unsqueeze(-1)
    return out


def test_cfg_wrapper():
    x, t = torch.randn(3, 4), torch.rand(3)
    cond = dict(context=torch.randn(3, 5, 6), context_mask=torch.ones(3, 5, dtype=torch.bool),
                labels=torch.tensor([0, 1, 2]))
    uncond = dict(context=torch.randn(1, 2, 6), context_mask=torch.ones(1, 2, dtype=torch.bool),
                  labels=torch.tensor([9]))
    assert torch.equal(D.cfg_model(_cond_model, 1.0, cond, uncond)(x, t), _cond_model(x, t, **cond))
    batched = D.cfg_model(_cond_model, 4.0, cond, uncond, batched=True)(x, t)
    unbatched = D.cfg_model(_cond_model, 4.0, cond, uncond, batched=False)(x, t)
    assert torch.allclose(batched, unbatched, atol=1e-6)
    v_c = _cond_model(x, t, **cond)
    v_u = _cond_model(x, t, **{k: v.expand(3, *v.shape[1:]) for k, v in uncond.items()})
    assert torch.allclose(batched, v_u + 4.0 * (v_c - v_u), atol=1e-5)
    with pytest.raises(ValueError, match="same keys"):
        D.cfg_model(_cond_model, 2.0, cond, dict(labels=torch.tensor([9])))(x, t)


def test_cfg_with_videodit_batched_equals_unbatched():
    from minisora.models.dit import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(in_channels=2, hidden_size=32, depth=2, num_heads=2, text_dim=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(std=0.05)
    x, t = torch.randn(2, 2, 2, 4, 4), torch.rand(2)
    cond = dict(context=torch.randn(2, 6, 8), context_mask=torch.tensor([[1] * 6, [1] * 3 + [0] * 3]).bool())
    uncond = dict(context=torch.randn(1, 2, 8), context_mask=torch.ones(1, 2, dtype=torch.bool))
    with torch.no_grad():
        a = D.cfg_model(model, 3.0, cond, uncond, batched=True)(x, t)
        b = D.cfg_model(model, 3.0, cond, uncond, batched=False)(x, t)
        out = D.sample_euler(D.cfg_model(model, 3.0, cond, uncond), x, D.timesteps(3))
    assert torch.allclose(a, b, atol=1e-5) and out.shape == x.shape


def test_per_frame_t_in_noise_loss_and_mask():
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    t = torch.tensor([[0.0, 0.5, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2]])  # clean leading frames
    x_t = D.add_noise(x0, noise, t)
    assert torch.equal(x_t[0, :, 0], x0[0, :, 0]) and torch.equal(x_t[1, :, :2], x0[1, :, :2])
    assert torch.allclose(x_t[0, :, 1], (x0[0, :, 1] + noise[0, :, 1]) / 2)
    seen = []

    def model(x, t_model):
        seen.append(t_model)
        return torch.zeros_like(x)

    err = (noise - x0).square().mean(dim=(1, 3, 4))  # (B, T) per-frame MSE of a zero prediction
    mask = (t > 0).float()
    loss = D.flow_loss(model, x0, t, noise, mask=mask)
    assert seen[0] is t  # the model gets the per-frame t as given
    assert torch.allclose(loss, (err * mask).sum(1) / mask.sum(1))  # clean frames are left out
    assert torch.allclose(D.flow_loss(model, x0, t, noise), err.mean(1))  # no mask: every element counts
    with pytest.raises(ValueError, match=r"does not fit x of shape \(2, 3, 4, 2, 2\)"):
        D.flow_loss(model, x0, torch.rand(2, 5), noise)


def test_fixed_frames_hold_clean_frames_through_samplers():
    from minisora.models.dit import VideoDiT

    torch.manual_seed(0)
    net = VideoDiT(in_channels=2, hidden_size=24, depth=1, num_heads=2, condition="none")
    with torch.no_grad():
        net.final_layer.linear.weight.normal_(std=0.1)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return net(x, t)

    clean = torch.tensor([[True, False, False]])
    x = torch.randn(1, 2, 3, 4, 4)
    ts = D.timesteps(3)
    for sampler in (D.sample_euler, D.sample_heun):
        out = sampler(D.fixed_frames(model, clean), x, ts)
        assert torch.equal(out[:, :, 0], x[:, :, 0]) and not torch.allclose(out[:, :, 1:], x[:, :, 1:])
    assert all(s.shape == (1, 3) and (s[:, 0] == 0).all() for s in seen)
    assert torch.equal(seen[0], torch.tensor([[0.0, 1.0, 1.0]]))
