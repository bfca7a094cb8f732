"""Analytic FLOPs of a VideoDiT step (and of the released Wan / LTX-Video transformers) and Model FLOPs Utilisation
(MFU) against a GPU's dense bf16 peak.

Convention (the one MFU papers use: Kaplan et al. 2020, PaLM appendix B): a multiply-add is 2 FLOPs, and only
matrix products are counted (linear layers, QK^T and attention-times-V). Norms, RoPE, GELU, softmax and adaLN
modulation are elementwise, O(N * D) against the O(N * D^2) matmuls, and are left out, as torch's
FlopCounterMode leaves them out; tests/test_flops.py checks these counts against FlopCounterMode.

    flops = dit_train_step_flops(model, T, H, W, batch=B, context_len=77)  # (T, H, W): the latent grid
    util = mfu(flops, seconds_per_step, peak_flops(device))               # None on CPU or an unknown GPU
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from minisora.models.dit import VideoDiT

PARTS = ("patch_embed", "attention_proj", "attention_scores", "cross_attention", "mlp", "adaln", "final_layer")


def linear_flops(rows: int, layer: nn.Linear) -> int:
    """FLOPs of `layer` applied to `rows` vectors: 2 * rows * in * out (the bias add is elementwise)."""
    return 2 * rows * layer.in_features * layer.out_features


def attention_flops(groups: int, heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    """FLOPs of softmax(Q K^T) V over `groups` independent sequences: two (q_len x k_len x head_dim) products."""
    return 2 * 2 * groups * heads * q_len * k_len * head_dim


def _self_attention_groups(mode: str, batch: int, grid: tuple[int, int, int]) -> tuple[int, int]:
    """(number of independent sequences, tokens per sequence) for a block's self-attention mode (see dit.py)."""
    gt, gh, gw = grid
    if mode == "full":
        return batch, gt * gh * gw  # every token attends to all tokens
    if mode == "spatial":
        return batch * gt, gh * gw  # within each frame
    if mode == "temporal":
        return batch * gh * gw, gt  # across frames at each spatial position
    raise ValueError(f"unknown attention mode {mode!r}; expected 'full', 'spatial' or 'temporal'")


def dit_forward_flops(model: VideoDiT, t: int, h: int, w: int, batch: int = 1,
                      context_len: int = 0) -> dict[str, int]:
    """Forward FLOPs of `model` on a (batch, C, t, h, w) latent with `context_len` text tokens, by part.

    Counts come from the model's own modules (linear shapes, heads, each block's attention mode and whether
    it has cross-attention), so any preset or layout is covered. Tokens are model.grid(t, h, w): time padded
    up to a multiple of the temporal patch counts, as the forward pass computes on the padded frames.
    context_len is ignored by blocks without cross-attention (condition "class" or "none").
    Keys: PARTS plus "total".
    """
    if batch < 1 or context_len < 0:
        raise ValueError(f"need batch >= 1 and context_len >= 0, got batch={batch}, context_len={context_len}")
    grid = model.grid(t, h, w)
    rows = batch * grid[0] * grid[1] * grid[2]  # token vectors in the batch: B * N
    flops = dict.fromkeys(PARTS, 0)
    flops["patch_embed"] = linear_flops(rows, model.x_embedder)
    # The condition path runs once per sample, not per token: timestep MLP, optional pooled-text MLP and the
    # shared adaLN-single projection (PixArt-alpha). The class embedding is a lookup: no FLOPs.
    cond_layers = [*model.t_embedder.mlp, *model.t_block]
    if model.text_pool is not None:
        cond_layers += list(model.text_pool)
    flops["adaln"] = sum(linear_flops(batch, m) for m in cond_layers if isinstance(m, nn.Linear))
    for block in model.blocks:
        attn = block.attn
        head_dim = attn.proj.in_features // attn.num_heads
        flops["attention_proj"] += linear_flops(rows, attn.qkv) + linear_flops(rows, attn.proj)
        groups, length = _self_attention_groups(block.attn_mode, batch, grid)
        flops["attention_scores"] += attention_flops(groups, attn.num_heads, length, length, head_dim)
        if block.cross_attn is not None:
            cross = block.cross_attn
            flops["cross_attention"] += (
                linear_flops(rows, cross.q) + linear_flops(rows, cross.proj)  # on the video tokens
                + linear_flops(batch * context_len, cross.kv)  # on the text tokens
                + attention_flops(batch, cross.num_heads, rows // batch, context_len,
                                  cross.proj.in_features // cross.num_heads)  # N x L scores
            )
        flops["mlp"] += linear_flops(rows, block.mlp.fc1) + linear_flops(rows, block.mlp.fc2)
    flops["final_layer"] = linear_flops(rows, model.final_layer.linear)
    flops["total"] = sum(flops[p] for p in PARTS)
    return flops


def dit_train_step_flops(model: VideoDiT, t: int, h: int, w: int, batch: int = 1, context_len: int = 0,
                         include_recompute: bool = False) -> int:
    """Model FLOPs of one training step: forward + backward = 3 x forward.

    The backward pass of a matmul needs two products of the forward's size (the gradient with respect to the
    input and to the weight), hence backward = 2 x forward, the standard approximation (Kaplan et al. 2020);
    it slightly over-counts the few layers whose input needs no gradient (patch embedding, text k/v).
    Recomputation under gradient checkpointing is NOT counted by default: MFU counts the FLOPs the model
    needs, not the ones the hardware ran (PaLM, appendix B). include_recompute=True adds the one extra
    forward of the checkpointed blocks (everything but patch_embed, adaln, final_layer), which gives the
    hardware FLOPs for a hardware FLOPs utilisation (HFU) instead.
    """
    fwd = dit_forward_flops(model, t, h, w, batch=batch, context_len=context_len)
    total = 3 * fwd["total"]
    if include_recompute:
        total += fwd["total"] - fwd["patch_embed"] - fwd["adaln"] - fwd["final_layer"]
    return total


# ---- released transformers (minisora.plan_released's ReleasedSetup) ------------------------------
def released_forward_flops(su, tokens: int, batch: int = 1) -> dict[str, int]:
    """Matmul FLOPs of a Wan / LTX-Video transformer forward: "blocks" (their linears), "attention" (QK^T and AV,
    self and cross), "outside" (embedders, output), "total" (tests/test_plan_released.py: FlopCounterMode)."""
    N, L, D, F = batch * tokens, batch * su.text_tokens, su.hidden, su.ffn
    values = math.prod(su.patch) * su.latent_channels
    time_rows = N if su.per_token_t else batch  # Wan2.2 TI2V embeds a timestep per token
    # patch embedding and output projection; timestep MLP (time_in -> D -> D) and its 6 D modulation; text MLP
    outside = 2 * 2 * N * values * D + 2 * time_rows * (su.time_in * D + 7 * D * D) + 2 * L * (su.text_dim + D) * D
    # per block: q, k, v, o of self-attention and q, o of cross-attention on the video, the FFN; k, v on the text
    blocks = su.depth * (2 * N * (6 * D * D + 2 * D * F) + 2 * 2 * L * D * D)
    attention = su.depth * (4 * batch * tokens * tokens * D + 4 * N * su.text_tokens * D)
    return {"blocks": blocks, "attention": attention, "outside": outside, "total": blocks + attention + outside}


def released_step_flops(su, tokens: int, batch: int = 1, *, lora: bool, checkpointing: bool) -> int:
    """FLOPs the GPU runs in one training step: forward, backward (2 x forward; with LoRA the frozen linears
    need no weight gradients: 1 x their forward), and one more forward of the blocks under checkpointing."""
    f = released_forward_flops(su, tokens, batch)
    backward = f["blocks"] + f["outside"] + 2 * f["attention"] if lora else 2 * f["total"]
    return f["total"] + backward + (f["blocks"] + f["attention"] if checkpointing else 0)


# Dense (no 2:4 sparsity) bf16 tensor-core peak FLOP/s, matched against torch.cuda.get_device_name in order
# (specific names before their prefixes). NVIDIA datasheets print the sparse figure with an asterisk; it is
# halved here. GeForce cards run bf16 with FP32 accumulate (what autocast uses) at half their FP16-accumulate
# rate, so their figure is the whitepaper's "Peak BF16 Tensor TFLOPS with FP32 Accumulate", dense.
# Anchored names keep look-alikes unknown: "A10G", "RTX 4090 D", "RTX 3090 Ti", laptop parts return None.
_PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bNVL\b", 835.5e12),  # H100 NVL datasheet: BF16 1,671 TFLOPS with sparsity
    (r"\bH100\b.*\bPCIE\b", 756.5e12),  # H100 datasheet, PCIe column: 1,513 with sparsity
    (r"\bH100\b", 989.5e12),  # H100 datasheet, SXM column ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    (r"\bH200\b.*\bNVL\b", 835.5e12),  # H200 datasheet, NVL column: 1,671 with sparsity
    (r"\bH200\b", 989.5e12),  # H200 datasheet, SXM column: 1,979 with sparsity (same GH100 compute as H100 SXM)
    (r"\bB200\b", 2250e12),  # HGX B200 datasheet: 36 PFLOPS FP16/BF16 with sparsity per 8 GPUs
    (r"\bA100\b", 312e12),  # A100 datasheet: BFLOAT16 Tensor Core 312 | 624* TFLOPS (40 and 80 GB, SXM and PCIe)
    (r"\bA10\b", 125e12),  # A10 datasheet: BFLOAT16 Tensor Core 125 | 250* TF
    (r"\bA40\b", 149.7e12),  # A40 datasheet: Peak BF16 Tensor TFLOPS with FP32 Accumulate 149.7 | 299.4*
    (r"\bL40S\b", 362.05e12),  # L40S datasheet: BFLOAT16 Tensor Core 362.05 | 733* TFLOPS
    (r"\bL40\b", 181.05e12),  # L40 datasheet: BFLOAT16 Tensor Core 181.05 | 362.1* TFLOPS
    (r"\bL4\b", 121e12),  # L4 datasheet: BFLOAT16 Tensor Core 242* TFLOPS with sparsity
    (r"\bRTX A6000$", 154.8e12),  # GA102 whitepaper v2, RTX A6000: BF16 with FP32 accumulate 154.8/309.6
    (r"\bRTX 6000 ADA GENERATION$", 364e12),  # RTX PRO Blackwell whitepaper, Table 4: 364 dense / 728 sparse
    (r"\bRTX 5090$", 209.5e12),  # RTX Blackwell whitepaper, Table 3: BF16 with FP32 accumulate 209.5/419
    (r"\bRTX 4090$", 165.2e12),  # Ada whitepaper, Appendix A: BF16 with FP32 accumulate 165.2/330.4
    (r"\bRTX 3090$", 71.2e12),  # RTX Blackwell whitepaper, Table 3 (GA102 column): 71.2/142.4
)


def gpu_peak_flops(name: str) -> float | None:
    """Dense bf16 tensor-core peak FLOP/s of a GPU named as torch.cuda.get_device_name names it; None if unknown."""
    key = " ".join(name.upper().split())
    for pattern, peak in _PEAK_BF16_DENSE:
        if re.search(pattern, key):
            return peak
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of `device`: None for CPU (no meaningful tensor-core peak) and unknown GPUs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak; None when the peak is unknown."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be > 0, got {seconds_per_step}")
    if peak is None:
        return None
    if peak <= 0:
        raise ValueError(f"peak must be > 0 FLOP/s or None, got {peak}")
    return flops_per_step / seconds_per_step / peak


# ---- a whole recipe: `minisora plan --hours` ----------------------------------------------------
def _forward_flops(fn) -> int:
    """Matmul and convolution FLOPs of fn() as torch's FlopCounterMode counts them, without gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def recipe_flops(cfg, videos: int, eval_samples: int) -> tuple[dict[str, float], dict[str, float]]:
    """(FLOPs per stage, GFLOPs per clip) of a config's recipe: VAE training, latent cache, DiT training, eval.

    The DiT from the counters above; the VAE and its discriminator from FlopCounterMode on a real forward of
    one clip. Training = 3 x forward, plus one more forward of the DiT blocks under gradient checkpointing.
    """
    from minisora.checkpoint import dit_args
    from minisora.config import kwargs, to_plain
    from minisora.models.autoencoder import VideoVAE
    from minisora.training.lit_autoencoder import PatchDiscriminator

    vae = VideoVAE(**kwargs(cfg.vae))
    dit = VideoDiT(**dit_args(to_plain(cfg), vae.latent_channels, None))
    x = torch.zeros(1, 3, cfg.data.num_frames, cfg.data.height, cfg.data.width)  # one clip (1, 3, T, H, W)
    enc = _forward_flops(lambda: vae.encode(x, tiled=False))
    dec = _forward_flops(lambda: vae.decode(vae.encode(x, tiled=False), tiled=False)) - enc
    gan = _forward_flops(lambda: PatchDiscriminator()(x))
    grid = vae.latent_shape(*x.shape[2:])[1:]  # latent (t, h, w)
    fwd = dit_forward_flops(dit, *grid)["total"]
    recompute = cfg.model.grad_checkpointing
    step = dit_train_step_flops(dit, *grid, batch=cfg.latents.dit_batch_size, include_recompute=recompute)
    vb, vs = cfg.data.vae_batch_size, cfg.vae_trainer.max_steps
    gan_steps = max(0, vs - cfg.vae_train.disc_start) if cfg.vae_train.disc_start >= 0 else 0
    stages = {
        # generator 3x(encode + decode); discriminator on fake for G, and on real + fake for D: 3 x 3 forwards
        "VAE training": vb * (vs * 3 * (enc + dec) + gan_steps * 9 * gan),
        "latent cache": videos * cfg.latents.clips_per_video * enc,
        "DiT training": cfg.trainer.max_steps * step,
        f"eval, {eval_samples} samples": eval_samples * (cfg.sample.steps * 2 * fwd + dec),  # guidance: 2 per step
    }
    stages["total"] = sum(stages.values())
    per_clip = {"vae_encode": enc / 1e9, "vae_decode": dec / 1e9, "discriminator": gan / 1e9, "dit_forward": fwd / 1e9}
    return stages, per_clip


def gpu_hours(flops: float, gpu: str, mfu: float) -> float:
    """Hours = FLOPs / (peak x MFU) on a GPU named as in the peak table (e.g. "NVIDIA GeForce RTX 4090")."""
    peak = gpu_peak_flops(gpu)
    if peak is None:
        raise ValueError(f"no bf16 peak known for GPU {gpu!r}")
    return flops / (peak * mfu) / 3600
