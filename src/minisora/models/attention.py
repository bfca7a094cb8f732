"""The pieces of a VideoDiT block: attention over space-time tokens (RoPE, QK-norm, grouped spatial / temporal
layouts), cross-attention to text, the MLP, and the recompute helpers that keep their cheap inputs out of memory."""

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from functools import partial

from minisora.models.layers import RecomputedLinear, RMSNorm, apply_rope, modulate


def norm_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's pre-norm input of a branch: modulate(norm(x)) (B, N, D)."""
    return modulate(norm(x), shift, scale)


def project(linear: nn.Module, f, *inputs: torch.Tensor, recompute: bool) -> torch.Tensor:
    """linear(f(*inputs)); with recompute (training), f's output is redone in backward instead of saved.

    Only a plain nn.Linear is recomputed: a LoRA or quantized layer in its place runs its own forward.
    """
    if recompute and torch.is_grad_enabled() and type(linear) is nn.Linear:
        return RecomputedLinear.apply(f, linear.weight, linear.bias, *inputs)
    return linear(f(*inputs))


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, GELU (tanh), Linear; with `recompute`, GELU's output is not saved."""

    def __init__(self, hidden_size: int, mlp_ratio: float, recompute: bool = False):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.recompute = recompute
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor, pre: tuple | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); pre = (norm, shift, scale): x is the residual stream, normed and modulated first."""
        on = self.recompute and self.training
        a = project(self.fc1, partial(norm_modulate, pre[0]), x, *pre[1:], recompute=on) if pre else self.fc1(x)
        return project(self.fc2, self.act, a, recompute=on)  # (B, N, D)


# Token groups that attend to each other: (pattern from the qkv projection, pattern back to (B, N, D)).
GROUPS = {
    "full": ("b n (three h d) -> three b h n d", "b n d -> b n d"),
    "spatial": ("b (t s) (three h d) -> three (b t) h s d", "(b t) s d -> b (t s) d"),  # the way back is a view
    "temporal": ("b (t s) (three h d) -> three (b s) h t d", "(b s) t d -> b (t s) d"),
}


def recompute(fn, *args, enabled: bool):
    """fn(*args), its outputs recomputed in backward instead of saved when enabled (cheap elementwise work only)."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class SelfAttention(nn.Module):
    """Multi-head self-attention with 3D RoPE and QK RMS-norm, over all tokens, one frame, or one position.

    mode "full": every token attends to all T*H*W tokens. "spatial": tokens attend within their frame.
    "temporal": tokens attend across frames at their spatial position (Latte, variant 1).
    The projection's output is regrouped once, straight into the groups' layout, and QK-norm and RoPE run
    there: RoPE is relative, so the axis that is constant inside a group cancels out of the logits, and the
    caller passes the tables of the group's own axes (VideoDiT.rope_tables). With `recompute`, QK-norm and
    RoPE are redone in backward: only their inputs, views of the projection that SDPA keeps anyway, are saved.
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, recompute: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.recompute = recompute
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        # QK-norm keeps attention logits bounded under bf16 (ViT-22B, SD3).
        self.q_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def _norm_rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(self.q_norm(q), self.k_norm(k), cos, sin)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int],
                mode: str, pre: tuple | None = None) -> torch.Tensor:
        """x (B, N, D), rope: cos, sin (L, head_dim) for the group's L tokens (N for "full") -> (B, N, D).

        pre = (norm, shift, scale): x is the residual stream, normed and modulated before the projection.
        """
        T, H, W = grid
        group, ungroup = GROUPS[mode]
        on = self.recompute and self.training
        qkv = project(self.qkv, partial(norm_modulate, pre[0]), x, *pre[1:], recompute=on) if pre else self.qkv(x)
        # One copy into the groups' layout; contiguous also because torch's fused RMSNorm on a strided view
        # was 80x slower on CPU (measured: 40 ms vs 0.5 ms).
        axes = {} if mode == "full" else {"t": T}
        qkv = rearrange(qkv, group, three=3, h=self.num_heads, **axes).contiguous()  # (3, G, heads, L, d)
        q, k, v = qkv.unbind(0)  # 3 x (G, heads, L, d); G = B, B*T or B*H*W groups of L tokens
        q, k = recompute(self._norm_rope, q, k, *rope, enabled=on)  # (G, heads, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (G, heads, L, d)
        out = self.proj(rearrange(out, "g h l d -> g l (h d)"))  # (G, L, D)
        return rearrange(out, ungroup, b=x.shape[0], **axes)  # (B, N, D)


class CrossAttention(nn.Module):
    """Multi-head attention from video tokens to text tokens, with a key padding mask (PixArt-alpha)."""

    def __init__(self, hidden_size: int, num_heads: int, context_dim: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(context_dim, 2 * hidden_size)
        self.q_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads).contiguous()  # (B, heads, N, d)
        context = context.to(self.kv.weight.dtype)  # the text encoder returns float32; the model may be bf16
        kv = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads).contiguous()
        k, v = kv.unbind(0)  # 2 x (B, heads, L, d)
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask, keep = None, None
        if mask is not None:
            # A prompt with zero real tokens would give a row of -inf logits and NaN; let such rows attend
            # everywhere and then drop their output: attending to nothing contributes nothing.
            mask = mask.bool()  # a float mask would be read by SDPA as additive logits
            keep = mask.any(dim=-1)  # (B,)
            attn_mask = (mask | ~keep[:, None])[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, d)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)
        if keep is not None:
            out = out * keep[:, None, None].to(out.dtype)  # (B, N, D)
        return out
