"""Conditioning frames: training draws, the per-frame t and loss mask they give, and clean_known in sampling."""

import pytest
import torch

from minisora import diffusion
from minisora.conditioning import check_conditioning, clean_known, draw_known_frames, frame_timesteps
from minisora.models.dit import VideoDiT
from minisora.training.lit_dit import LitVideoDiT


def test_draws_follow_the_probabilities_and_the_range():
    g = torch.Generator().manual_seed(0)
    k = draw_known_frames(g, 20000, 5, p_image=0.2, p_extend=0.3, extend_frames=(2, 3))
    assert abs((k == 0).float().mean() - 0.5) < 0.02 and abs((k == 1).float().mean() - 0.2) < 0.02
    assert abs((k == 2).float().mean() - 0.15) < 0.02 and abs((k == 3).float().mean() - 0.15) < 0.02
    assert set(k.tolist()) == {0, 1, 2, 3}
    again = draw_known_frames(torch.Generator().manual_seed(0), 20000, 5, 0.2, 0.3, (2, 3))
    assert torch.equal(k, again)  # from the generator alone
    # At most T - 1 known frames: a 3-latent-frame clip keeps one to learn; a one-frame image clip keeps all.
    assert draw_known_frames(g, 1000, 3, 0.0, 1.0, (2, 4)).max() == 2
    assert draw_known_frames(g, 1000, 1, 0.5, 0.5, (2, 4)).max() == 0
    assert not draw_known_frames(g, 1000, 5, 0.0, 0.0, (2, 3)).any()
    # A DiT with temporal patch 2 gets whole patches: k in {0, 2, 4}, at most 4 of 6 frames (one patch left).
    assert set(draw_known_frames(g, 1000, 6, 0.3, 0.5, (1, 5), multiple=2).tolist()) == {0, 2, 4}


def test_frame_timesteps_and_bad_settings():
    t = torch.tensor([0.5, 0.9, 0.3])
    ft = frame_timesteps(t, torch.tensor([0, 1, 3]), 4)
    assert torch.equal(ft, torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.9, 0.9, 0.9], [0.0, 0.0, 0.0, 0.3]]))
    with pytest.raises(ValueError, match="p_image \\+ dit_train.p_extend must be <= 1"):
        check_conditioning(0.6, 0.5, [2, 3])
    with pytest.raises(ValueError, match="dit_train.extend_frames"):
        check_conditioning(0.1, 0.2, [3, 2])
    with pytest.raises(ValueError, match="dit_train.p_image must be in"):
        LitVideoDiT(VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, condition="none"), p_image=-0.1)


class Recorder(torch.nn.Module):
    """A 'network' returning a fixed function of its input, recording what it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, **cond):
        self.seen.append((x.clone(), t.clone()))
        return torch.sin(3 * x) + t.reshape(t.shape[0], 1, -1, 1, 1) if t.ndim == 2 else torch.sin(3 * x)


def test_known_frames_are_clean_inputs_and_out_of_the_loss():
    """The model gets x_t = x0 with t = 0 on the known frames, the loss counts only the other frames: what the
    model outputs for the known frames changes nothing, and with no known frame the loss is the plain one."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 4, 4, generator=g), torch.randn(3, 4, 5, 4, 4, generator=g)
    t, k = torch.tensor([0.7, 0.4, 0.9]), torch.tensor([1, 2, 0])
    ft, frames = frame_timesteps(t, k, 5), frame_timesteps(torch.ones(3), k, 5) > 0
    net = Recorder()
    loss = diffusion.flow_loss(net, x0, ft, noise, prediction="x0", mask=frames)  # (3,)
    x_in, t_in = net.seen[0]
    assert torch.equal(t_in, ft) and torch.equal(x_in[0, :, :1], x0[0, :, :1]) and torch.equal(x_in[1, :, :2], x0[1, :, :2])
    torch.testing.assert_close(x_in[0, :, 1:], 0.3 * x0[0, :, 1:] + 0.7 * noise[0, :, 1:])

    def spoiled(x, t, **cond):  # the same on unknown frames, garbage on known ones
        out = net(x, t)
        return torch.where(frames[:, None, :, None, None], out, torch.full_like(out, 1e3))

    torch.testing.assert_close(diffusion.flow_loss(spoiled, x0, ft, noise, prediction="x0", mask=frames), loss)
    # By hand: the velocity MSE over the unknown frames only.
    v_hat = (x_in - net(x_in, ft)) / ft[:, None, :, None, None].clamp(min=0.05)
    err = (v_hat - (noise - x0)) ** 2
    torch.testing.assert_close(loss[1], err[1, :, 2:].mean())
    # No known frame: equal to the (B,) path's loss.
    plain = diffusion.flow_loss(lambda x, t: torch.sin(3 * x) + t.reshape(-1, 1, 1, 1, 1), x0, t, noise, prediction="x0")
    torch.testing.assert_close(loss[2], plain[2])


def test_training_step_draws_known_frames_from_the_step_generator():
    """LitVideoDiT: p_image = 1 gives every clip a clean first latent frame, p_extend = 1 the first k in range; the
    draws repeat for the same step, and p = 0 calls the network with the plain (B,) t."""
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, condition="none")
    batch = {"latents": torch.randn(6, 4, 5, 4, 4)}
    seen = {}
    for name, kw in (("image", dict(p_image=1.0, p_extend=0.0)), ("extend", dict(p_image=0.0, p_extend=1.0)),
                     ("plain", dict(p_image=0.0, p_extend=0.0))):  # fmt: skip
        lit = LitVideoDiT(model, t_shift=1.0, extend_frames=[2, 3], **kw)
        net = Recorder()
        lit._net = (net,)
        lit._losses(batch)
        lit._losses(batch)
        assert torch.equal(net.seen[0][1], net.seen[1][1])  # same step, same draws
        seen[name] = net.seen[0][1]
    image, extend, plain = seen["image"], seen["extend"], seen["plain"]
    assert plain.shape == (6,) and image.shape == extend.shape == (6, 5)
    assert (image[:, 0] == 0).all() and (image[:, 1:] == plain[:, None]).all()
    k = (extend == 0).sum(1)
    assert set(k.tolist()) <= {2, 3} and (extend[:, -1] == plain).all()
    # Validation stays text-to-video: its curve compares with runs trained without conditioning.
    lit = LitVideoDiT(model, t_shift=1.0, p_image=1.0, p_extend=0.0)
    lit._net = (net := Recorder(),)
    lit.val_losses({**batch, "index": torch.arange(6)})
    assert net.seen and all(t.shape == (6,) for _, t in net.seen)


def test_clean_known_gives_the_model_clean_frames_at_t_0_and_keeps_them():
    known = torch.randn(1, 4, 2, 4, 4)
    net = Recorder()
    x = diffusion.sample_euler(clean_known(net, known), torch.randn(2, 4, 5, 4, 4), diffusion.timesteps(3))
    for x_in, t_in in net.seen:
        assert torch.equal(x_in[:, :, :2], known.expand(2, -1, -1, -1, -1))
        assert t_in.shape == (2, 5) and (t_in[:, :2] == 0).all() and (t_in[:, 2:] > 0).all()
    assert len(net.seen) == 3 and torch.isfinite(x).all()
