"""QK RMS-norm keeps bf16 attention finite under extreme inputs: attention weights do not depend on the scale of q, k.

Without the norm, attention logits grow with the square of the activations' (or the q/k weights') scale:
softmax first collapses to one-hot, then q.k passes the bf16/float32 maximum (~3.4e38) and the logits
become inf and the output NaN (the attention-logit growth of ViT-22B, Dehghani et al. 2023). With the
norm, q and k have unit RMS whatever comes in, so |logit| <= sqrt(head_dim) * max(norm weight)^2.
Scales are powers of two, so scaling changes no bf16 rounding and "invariant" can be tested tightly.
"""

from __future__ import annotations

import math

import pytest
import torch

from minisora.models.attention import SelfAttention
from minisora.models.dit import VideoDiT
from minisora.models.layers import RMSNorm, RoPE3D, apply_rope

BF16_MAX = torch.finfo(torch.bfloat16).max  # ~3.39e38, as float32
D, HEADS = 32, 2  # head_dim 16
GRID = (2, 2, 3)  # (T, H, W) tokens
N = math.prod(GRID)


def attention(qk_norm: bool) -> SelfAttention:
    torch.manual_seed(0)
    attn = SelfAttention(D, HEADS, qk_norm).to(torch.bfloat16)
    with torch.no_grad():  # VideoDiT zero-initialises these biases; with them, output = scale * output(x) exactly
        attn.qkv.bias.zero_()
        attn.proj.bias.zero_()
    return attn


def run(attn: SelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, attention weights float32 (B, heads, N, N), logits float32) of attn on x (B, N, D)."""
    seen = {}
    hooks = [
        attn.q_norm.register_forward_hook(lambda m, i, out: seen.__setitem__("q", out)),
        attn.k_norm.register_forward_hook(lambda m, i, out: seen.__setitem__("k", out)),
    ]
    rope = RoPE3D(D // HEADS)(*GRID)
    with torch.no_grad():
        out = attn(x.to(torch.bfloat16), rope, GRID, "full")  # (B, N, D)
    for h in hooks:
        h.remove()
    q, k = apply_rope(seen["q"], seen["k"], *rope)  # what SDPA sees: (B, heads, N, d), bf16
    logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(D // HEADS)  # (B, heads, N, N)
    return out, logits.softmax(dim=-1), logits


def test_rms_norm_is_scale_invariant_beyond_the_float32_range_of_squares():
    # |x| > ~1.8e19 makes x^2 overflow float32: the sum of squares must not be where the norm breaks,
    # since that is exactly where un-normalised bf16 logits (q.k <= |q||k|) overflow too.
    torch.manual_seed(0)
    norm = RMSNorm(16)
    x = torch.randn(4, 16).to(torch.bfloat16)
    ref = norm(x).float()
    for k in (0, 32, 63, 64, 80, 120):  # 2^120 = 1.3e36, still a finite bf16
        y = norm(x * 2.0**k)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all(), k
        rms = y.float().pow(2).mean(dim=-1).sqrt()
        assert torch.allclose(rms, torch.ones(4), atol=0.02), (k, rms)
        torch.testing.assert_close(y.float(), ref, atol=0.02, rtol=0.02, msg=f"scale 2^{k}")


def test_qk_norm_makes_bf16_attention_weights_independent_of_the_input_scale():
    torch.manual_seed(1)
    x = torch.randn(2, N, D)
    attn = attention(qk_norm=True)
    out0, w0, _ = run(attn, x)
    assert w0.max() < 0.9  # a spread-out distribution at scale 1, so a collapse would show
    for k in (16, 40, 64, 80):  # 2^80 = 1.2e24: without the norm q.k ~ 2^160 > bf16 max
        out, w, logits = run(attn, x * 2.0**k)
        assert torch.isfinite(out).all(), k
        torch.testing.assert_close(w, w0, atol=0.02, rtol=0, msg=f"attention weights at scale 2^{k}")
        assert logits.abs().max() <= math.sqrt(D // HEADS) * 1.01  # unit-RMS q, k (norm weight 1)
        # v is not normalised, so the output follows the input scale exactly (linear, zero biases).
        torch.testing.assert_close(out.float() / 2.0**k, out0.float(), atol=0.02, rtol=0.02)


def test_without_qk_norm_bf16_attention_collapses_then_overflows():
    torch.manual_seed(1)
    x = torch.randn(2, N, D)
    attn = attention(qk_norm=False)
    out0, w0, _ = run(attn, x)
    assert torch.isfinite(out0).all() and w0.max() < 0.9
    _, w16, _ = run(attn, x * 2.0**16)  # logits x 2^32: every row's softmax is one-hot
    assert (w16.max(dim=-1).values > 0.99).all()
    out80, _, logits80 = run(attn, x * 2.0**80)
    assert torch.isinf(logits80).any()  # q.k past the bf16 / float32 maximum
    assert not torch.isfinite(out80).all()  # inf - inf inside softmax: NaN


def _perturb_zero_init(model: torch.nn.Module) -> None:
    """Random values in the zero-initialised tensors (gates, output layer, text projections) so every path carries signal."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(std=0.05)


def _scale_qk_weights(model: VideoDiT, scale: float) -> None:
    """Multiply every block's query and key projections by `scale`: runaway q/k weights, as in a diverging run."""
    Dm = model.hidden_size
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.qkv.weight, block.attn.qkv.bias):
                p[: 2 * Dm] *= scale  # rows: q, k, v ("three h d")
            if block.cross_attn is not None:
                block.cross_attn.q.weight.mul_(scale)
                block.cross_attn.q.bias.mul_(scale)
                for p in (block.cross_attn.kv.weight, block.cross_attn.kv.bias):
                    p[:Dm] *= scale  # rows: k, v ("two h d")


def tiny_dit(qk_norm: bool, layout: str) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, hidden_size=D, depth=2, num_heads=HEADS, layout=layout, text_dim=24,
                     qk_norm=qk_norm).eval()  # fmt: skip
    _perturb_zero_init(model)
    return model


def _inputs() -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 4, 6, generator=g)  # (B, C, T, H, W) -> 3 x 2 x 3 tokens
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2:] = False
    return x, torch.tensor([0.3, 0.9]), {"context": torch.randn(2, 5, 24, generator=g), "context_mask": mask}


@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_video_dit_bf16_survives_runaway_qk_weights_only_with_qk_norm(layout):
    x, t, cond = _inputs()
    for qk_norm in (True, False):
        model = tiny_dit(qk_norm, layout)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(x, t, **cond)
        _scale_qk_weights(model, 2.0**80)  # outside autocast, which caches its bf16 copies of the weights
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, **cond)
        assert torch.isfinite(ref).all() and ref.abs().max() > 0.01
        if qk_norm:  # the same network: the norm divides the scale out again
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.float(), ref.float(), atol=0.03 * ref.abs().max().item(), rtol=0)
        else:
            assert not torch.isfinite(out).all()


def test_video_dit_bf16_extreme_latents_stay_finite_with_bounded_logits():
    x, t, cond = _inputs()
    model = tiny_dit(qk_norm=True, layout="full")
    rms: list[torch.Tensor] = []
    for block in model.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm, block.cross_attn.q_norm, block.cross_attn.k_norm):
            norm.register_forward_hook(lambda m, i, out: rms.append(out.float().pow(2).mean(dim=-1).sqrt()))
    # 1e18: the largest decade where the float32 LayerNorm in front of attention still has a finite variance.
    for scale in (1.0, 1e6, 1e12, 1e18):
        rms.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x * scale, t, **cond)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        assert torch.isfinite(out).all(), scale
        assert len(rms) == 8  # 2 blocks x (self q, k + cross q, k)
        assert all(torch.allclose(r, torch.ones_like(r), atol=0.02) for r in rms), scale  # unit-RMS q and k
