"""VideoDiT: a diffusion transformer over space-time patches of video latents.

Lineage: DiT (adaLN, zero-init), PixArt-alpha (adaLN-single, cross-attention to text), Latte (spatial /
temporal factorised attention), SD3 (QK RMS-norm), Sora report (space-time patches of any size and length).
"""

import torch
import torch.nn as nn
import torch.utils.checkpoint
from einops import rearrange

from minisora.models.attention import CrossAttention, Mlp, SelfAttention
from minisora.models.layers import RoPE3D, TimestepEmbedder, gate, modulate

LAYOUTS = ("full", "factorized")
CONDITIONS = ("text", "class", "none")


class DiTBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, MLP; adaLN-single modulation (PixArt-alpha)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attn_mode: str,
                 context_dim: int | None, qk_norm: bool, recompute: bool = False):
        super().__init__()
        self.attn_mode = attn_mode
        self.recompute = recompute
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, recompute)
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads, context_dim, qk_norm)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio, recompute)
        # This block's learned offset to the shared modulation (shift/scale/gate for attention and MLP).
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))  # set in VideoDiT.initialize_weights

    def forward(self, x: torch.Tensor, mod: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                grid: tuple[int, int, int], context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        # mod (B, G, 6D): G = 1 for a per-sample t, frames or tokens for a per-frame or per-token t; (B, 6D) is G = 1
        mod = mod.unsqueeze(1) if mod.ndim == 2 else mod
        mod = rearrange(mod, "b g (six d) -> b g six d", six=6) + self.scale_shift_table  # (B, G, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=2)  # 6 x (B, G, D)
        # The branches norm and modulate x themselves: with recompute, that output is redone in backward, not saved.
        x = x + gate(self.attn(x, rope, grid, self.attn_mode, pre=(self.norm1, shift_msa, scale_msa)), gate_msa)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)  # (B, N, D)
        x = x + gate(self.mlp(x, pre=(self.norm2, shift_mlp, scale_mlp)), gate_mlp)  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift/scale from the timestep embedding plus a learned table) then a linear map to patch values."""

    def __init__(self, hidden_size: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))  # set in VideoDiT.initialize_weights
        self.linear = nn.Linear(hidden_size, patch_values)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, G, D) grouped as in DiTBlock."""
        shift, scale = (self.scale_shift_table + c.unsqueeze(2)).unbind(dim=2)  # 2 x (B, G, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, pt*ph*pw*C)


class VideoDiT(nn.Module):
    """Diffusion transformer on (B, C, T, H, W) latents; predicts a tensor of the input's shape.

    Time that is not a multiple of the temporal patch pt is padded at the end by repeating the last
    frame and the output is cropped back, so images (T=1) and causal-VAE latents (T = 1 + 4k) work with
    any pt. Height and width must be multiples of the spatial patch (ValueError otherwise).
    """

    def __init__(
        self,
        in_channels: int = 8,
        patch_size: list[int] | None = None,  # (pt, ph, pw); default [1, 2, 2]
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        layout: str = "full",  # "full" | "factorized"
        condition: str = "text",  # "text" | "class" | "none"
        text_dim: int = 512,
        num_classes: int = 0,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        grad_checkpointing: bool = False,
        pooled_text: bool = False,
        recompute: bool = True,  # redo norms, modulation, QK-norm and RoPE in backward instead of saving them
    ):
        super().__init__()
        patch_size = [1, 2, 2] if patch_size is None else list(patch_size)
        if len(patch_size) != 3 or any(int(p) != p or p < 1 for p in patch_size):
            raise ValueError(f"patch_size must be three positive ints (pt, ph, pw), got {patch_size}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        if condition == "class" and num_classes < 1:
            raise ValueError(f"condition='class' needs num_classes >= 1, got num_classes={num_classes}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.in_channels = in_channels
        self.patch_size = [int(p) for p in patch_size]
        self.hidden_size = hidden_size
        self.layout = layout
        self.condition = condition
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        pt, ph, pw = self.patch_size
        patch_values = pt * ph * pw * in_channels

        self.x_embedder = nn.Linear(patch_values, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # adaLN-single (PixArt-alpha): one modulation MLP for the whole network instead of one 6*D^2 MLP per block.
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        # Index num_classes is the "null" label used for classifier-free guidance.
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if condition == "class" else None
        # Pooled text in the adaLN condition (SD3 adds pooled CLIP to the timestep embedding): cross-attention
        # reads words per token, this steers every token's norm and gates with the whole prompt at once.
        self.text_pool = None
        if pooled_text and condition == "text":
            self.text_pool = nn.Sequential(
                nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
        self.rope = RoPE3D(hidden_size // num_heads, theta=rope_theta)
        context_dim = text_dim if condition == "text" else None
        if layout == "full":
            modes = ["full"] * depth
        else:  # Latte variant 1: spatial and temporal blocks alternate
            modes = ["spatial" if i % 2 == 0 else "temporal" for i in range(depth)]
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, mode, context_dim, qk_norm, recompute) for mode in modes]
        )
        self.final_layer = FinalLayer(hidden_size, patch_values)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT / PixArt-alpha initialisation: the untrained network outputs exactly zero."""
        # Xavier-uniform linears with zero bias: the transformer default (DiT).
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Small normal init for the embedding MLPs and the shared modulation MLP (DiT, PixArt).
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        if self.text_pool is not None:  # zero output: the condition starts as the timestep alone
            nn.init.zeros_(self.text_pool[2].weight)
        for block in self.blocks:
            # Per-block tables ~ N(0, 1/D) (PixArt): gates start at |g| ~ 1/sqrt(D), so every residual branch
            # starts small and the network starts close to the identity on its tokens.
            nn.init.normal_(block.scale_shift_table, std=self.hidden_size**-0.5)
            if block.cross_attn is not None:
                # Text enters through a zero-initialised projection (PixArt): training starts unconditional.
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.normal_(self.final_layer.scale_shift_table, std=self.hidden_size**-0.5)
        # Zero output layer (DiT): the untrained model predicts 0, a safe start for any parameterisation.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (optionally only those with requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def grid(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """Token grid (T', H', W') for a latent of T frames and H x W; raises on a spatial size that doesn't fit."""
        pt, ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"latent shape (T, H, W) = ({T}, {H}, {W}) does not fit patch_size {self.patch_size}: H must be a "
                f"multiple of {ph} and W a multiple of {pw} (T may be anything; it is padded to a multiple of {pt})"
            )
        return -(-T // pt), H // ph, W // pw  # time rounds up: it is padded, see the class docstring

    def tokens(self, T: int, H: int, W: int) -> int:
        """Number of DiT tokens for a (T, H, W) latent grid."""
        t, h, w = self.grid(T, H, W)
        return t * h * w

    def rope_tables(self, grid: tuple[int, int, int], device: torch.device) -> dict[str, tuple]:
        """RoPE cos/sin per attention mode: the full grid (N, d), one frame's (H*W, d), one position's frames (T, d).

        A spatial group's tokens share their frame, so the time rotation is the same for q and k and cancels
        in q.k; its table keeps only the h and w rotations (time at position 0). Likewise a temporal group keeps
        only time. Same logits as the full table, without an (N, d) table broadcast over the groups.
        """
        T, H, W = grid
        return {"full": self.rope(T, H, W, device=device), "spatial": self.rope(1, H, W, device=device),
                "temporal": self.rope(T, 1, 1, device=device)}  # fmt: skip

    def _condition(self, B: int, device: torch.device, labels: torch.Tensor | None,
                   context: torch.Tensor | None, context_mask: torch.Tensor | None) -> torch.Tensor | None:
        """What the adaLN condition adds to the timestep embedding: (B, D), or None (timestep alone)."""
        if self.condition == "class":
            if labels is None:  # unconditional: the null label
                labels = torch.full((B,), self.num_classes, dtype=torch.long, device=device)
            if labels.shape != (B,):
                raise ValueError(f"labels must have shape ({B},), got {tuple(labels.shape)}")
            return self.y_embedder(labels)  # (B, D)
        if self.condition == "text":
            if context is None:
                raise ValueError(
                    "condition='text' needs context (B, L, text_dim); pass the null embedding for unconditional"
                )
            if context.ndim != 3 or context.shape[0] != B:
                raise ValueError(f"context must be (B={B}, L, text_dim), got {tuple(context.shape)}")
            if self.text_pool is not None:
                w = torch.ones(context.shape[:2], device=context.device) if context_mask is None else context_mask
                w = w.to(context.dtype)[..., None]  # (B, L, 1): the mean runs over real tokens only
                pooled = (context * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, text_dim)
                return self.text_pool(pooled.to(self.text_pool[0].weight.dtype))  # (B, D)
        return None

    def _token_t(self, t: torch.Tensor, B: int, T: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """t of shape (), (B,), (B, latent frames) or (B, tokens) -> (B, G): G = 1, token frames, or tokens."""
        gt, gh, gw = grid
        tokens, pt = gt * gh * gw, self.patch_size[0]
        if t.ndim == 0:
            return t.expand(B, 1)
        if t.ndim == 1 and t.shape == (B,):
            return t[:, None]
        if t.ndim == 2 and t.shape[0] == B and t.shape[1] == tokens:  # checked first: (B, tokens) wins a tie
            return t
        if t.ndim == 2 and t.shape[0] == B and t.shape[1] == T:  # per latent frame
            if pt == 1:
                return t
            t = torch.cat([t, t[:, -1:].expand(-1, gt * pt - T)], dim=1).view(B, gt, pt)  # padded as x is
            if not torch.equal(t, t[:, :, :1].expand_as(t)):
                raise ValueError(f"a per-frame t must be equal within each temporal patch of {pt} latent frames, "
                                 f"got {t.flatten(1).tolist()}")  # fmt: skip
            return t[:, :, 0]
        raise ValueError(f"t must be (B,) = ({B},), per latent frame (B, T) = ({B}, {T}) or per token "
                         f"(B, tokens) = ({B}, {tokens}), got {tuple(t.shape)}")  # fmt: skip

    def _modulation(self, t: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep t (B, G) and condition (B, D) or None -> adaLN condition c (B, G, D) and modulation (B, G, 6D)."""
        B, G = t.shape
        if G == 1:  # one t per sample: the DiT / PixArt path, 1 embedding per sample
            c = self.t_embedder(t[:, 0])  # (B, D)
            c = c if cond is None else c + cond  # (B, D)
            return c.unsqueeze(1), self.t_block(c).unsqueeze(1)  # (B, 1, D), (B, 1, 6D)
        # Per frame or token: a clip holds few distinct t (0 for clean conditioning, its noise level elsewhere),
        # so embed each distinct (sample, t) pair once and index, instead of running the MLPs on every token.
        rows = torch.arange(B, device=t.device, dtype=torch.float64).repeat_interleave(G)  # (B*G,)
        pairs = torch.stack([rows, t.flatten().double()], dim=1)  # (B*G, 2); float64 holds both exactly
        pairs, inverse = torch.unique(pairs, dim=0, return_inverse=True)  # (K, 2), (B*G,)
        c = self.t_embedder(pairs[:, 1])  # (K, D)
        if cond is not None:
            c = c + cond[pairs[:, 0].long()]  # (K, D)
        return c[inverse].view(B, G, -1), self.t_block(c)[inverse].view(B, G, -1)  # (B, G, D), (B, G, 6D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T, H, W), t in [0, 1] (0 data, 1 noise) -> (B, C, T, H, W).

        t is (B,), or (B, T) per latent frame, or (B, tokens) per token in (t, h, w) order: adaLN then modulates
        each frame or token with its own noise level, and t = 0 marks clean conditioning (Wan2.2 TI2V, LTX).
        A per-frame t must be equal within a temporal patch.
        """
        B, C, T, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got x of shape {tuple(x.shape)}")
        pt, ph, pw = self.patch_size
        gt, gh, gw = self.grid(T, H, W)
        t = self._token_t(t, B, T, (gt, gh, gw))  # (B, G): G = 1, gt or N
        if gt * pt != T:  # pad time by repeating the last frame; cropped again below
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, gt * pt - T, -1, -1)], dim=2)  # (B, C, T', H, W)
        h = rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)",
                      pt=pt, ph=ph, pw=pw)  # (B, N, pt*ph*pw*C)
        h = self.x_embedder(h)  # (B, N, D)
        cond = self._condition(B, x.device, labels, context, context_mask)  # (B, D) or None
        c, mod = self._modulation(t, cond)  # (B, G, D), (B, G, 6D); mod is shared by all blocks
        ropes = self.rope_tables((gt, gh, gw), x.device)  # per attention mode: cos, sin (L, head_dim)
        grid = (gt, gh, gw)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(
                    block, h, mod, ropes[block.attn_mode], grid, context, context_mask, use_reentrant=False
                )  # (B, N, D)
            else:
                h = block(h, mod, ropes[block.attn_mode], grid, context, context_mask)  # (B, N, D)
        h = self.final_layer(h, c)  # (B, N, pt*ph*pw*C)
        out = rearrange(h, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                        t=gt, h=gh, w=gw, pt=pt, ph=ph, pw=pw)  # (B, C, T', H, W)
        return out[:, :, :T]  # (B, C, T, H, W)
