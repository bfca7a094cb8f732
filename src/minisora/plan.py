"""Memory planner: the peak memory of one DiT training step and of sampling one video, from the architecture.

    minisora plan --preset B --frames 48 --height 480 --width 854 [--batch 1] [--budget-gb 24] [--json]

Bytes of live tensors (what CUDA's max_memory_allocated reports), counted component by component; the GPU
check adds an assumed CUDA context and allocator slack. What is counted, and the calibration against
measured CPU peaks: docs/benchmarks.md, "Memory planner". The command's output is minisora.cli.plan.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minisora.bench.report import CONFIGS, model_preset
from minisora.pipeline import DECODE_PIXELS  # output pixels per VAE decode call: the sampler's own constant

GIB = 2**30
MIB = 2**20
ADAMW8BIT_BYTES = 2.05  # optimizer state bytes per parameter, measured (docs/benchmarks.md: bench train)
ADAMW_BYTES = 8.0  # two fp32 moments
# Assumed until measured on a GPU: the CUDA context (outside PyTorch's allocator) and caching-allocator slack.
GPU_CONTEXT_GIB, GPU_SLACK = 0.5, 0.10
GLIBC_RSS_FACTOR = 1.88  # CPU peak RSS / live bytes with glibc's default malloc (docs/benchmarks.md)
# Top-level decoder activations (base_channels x multiplier[0] channels at H/patch x W/patch) live at the
# decoder's peak: a ResBlock's input, norm temporaries, SiLU, the causally padded copy and the conv output,
# plus CPU conv3d workspace. Calibrated: 450 MB for one 17x256x256 tile of vae/standard.yaml
# (bench/sample-memory-B-cpu.json vae_tile_peak_mb) = 6.6 x 64 B x 1.11 M pixel-frames (residual -0.3%).
VAE_DECODE_TENSORS = 6.6
CLIP_VOCAB, CLIP_LAYERS = 49408, {512: 12, 768: 12, 1024: 24, 1280: 32}  # text towers by width (open_clip)

# What one DiTBlock keeps for backward, per token: (what, D-wide tensors, mlp_ratio*D-wide tensors,
# bytes per element with fp32 compute, under bf16 autocast). Residual-stream tensors and everything the
# fp32 norms/RoPE touch stay fp32 under autocast; linear inputs/outputs become bf16. VideoDiT's default
# recompute=True redoes the LayerNorm+modulation (the qkv and fc1 inputs), QK-norm+RoPE and GELU (fc2's input)
# in backward instead of saving their outputs.
SAVED_PER_BLOCK = (
    ("block input x (LayerNorm 1 + modulation + qkv input, recomputed)", 1, 0, 4, 4),
    ("q, k, v buffer (v saved by SDPA, q and k by the recomputed QK-norm)", 3, 0, 4, 2),
    ("q, k after RoPE (SDPA)", 2, 0, 4, 2),
    ("attention output, proj input", 2, 0, 4, 2),
    ("attention proj output (gate)", 1, 0, 4, 2),
    ("cross-attn LayerNorm input", 1, 0, 4, 4),
    ("cross-attn q linear input", 1, 0, 4, 2),
    ("cross-attn QK-norm input, output (fp32)", 2, 0, 4, 4),
    ("cross-attn q, output (SDPA)", 2, 0, 4, 2),
    ("cross-attn proj input", 1, 0, 4, 2),
    ("LayerNorm 2 input", 1, 0, 4, 4),
    ("MLP hidden before GELU (its output is recomputed)", 0, 1, 4, 2),
    ("MLP output (gate)", 1, 0, 4, 2),
)
STATS_PER_HEAD, STATS_PER_TOKEN = 20, 24  # QK-norm rstd x3, SDPA logsumexp x2 (fp32); 3 LayerNorms' mean/rstd

# Live at the peak of one no-grad DiTBlock (the k-RoPE step of self-attention), bytes per token in units of
# D: (fp32 model, bf16 model). RoPE runs in fp32 whatever the weights are, so bf16 saves 14%, not 50%.
INFER_PER_TOKEN = (
    ("residual stream x", 4, 2),
    ("modulated input h", 4, 2),
    ("q, k, v buffer (v keeps it)", 12, 6),
    ("q, k after QK-norm", 8, 4),
    ("fp32 copies of q, k for RoPE", 0, 8),
    ("rotated q (fp32)", 4, 4),
    ("k*cos, rot(k)*sin, their sum (fp32)", 12, 12),
)

# Ordinal cost of each memory switch (0 = free or faster), used to pick the cheapest fitting set.
# bf16: faster on Ampere+; AdamW8bit: ~free on a GPU (4.6-6x slower optimizer step on CPU); checkpointing:
# one more forward per step (+28% CPU time for B); offload: two weight transfers per call; VAE tiling: +66%
# decode time, a small part of a sample; two-call CFG: +3% per step at 1280 tokens, up to +50% at 80
# (docs/benchmarks.md: training, autoencoder and sampling tables).
TRAIN_SWITCHES = {"bf16": 0, "adamw8bit": 1, "checkpointing": 3}
SAMPLE_SWITCHES = {"bf16": 0, "offload": 1, "vae_tiling": 1, "cfg_two_calls": 2}


@dataclass
class Setup:
    """Everything the memory model needs about the DiT preset, the VAE and the text encoder (plain numbers)."""

    preset: str
    params: int
    block_params: int
    linear_params: int  # linear weights and biases: autocast's bf16 copies during the forward
    block_linear_params: int  # the linear weights of one block that backward keeps in bf16
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float
    patch: list[int]
    latent_channels: int
    text_tokens: int
    text_dim: int
    text_params: int
    vae_params: int
    vae: dict = field(default_factory=dict)  # VideoVAE constructor arguments
    lora_params: int = 0  # LoRA fine-tuning: adapter parameters (the only ones trained); 0 trains everything
    lora_block_params: int = 0  # the adapter parameters of one block

    @property
    def patch_values(self) -> int:
        return math.prod(self.patch) * self.latent_channels


def saved_bytes_per_token(hidden: int, heads: int, mlp_ratio: float, bf16: bool) -> float:
    """Bytes autograd keeps per token in one DiTBlock (SAVED_PER_BLOCK), without the weights."""
    units = sum((d + r * mlp_ratio) * (b16 if bf16 else b32) for _, d, r, b32, b16 in SAVED_PER_BLOCK)
    return units * hidden + STATS_PER_HEAD * heads + STATS_PER_TOKEN


def infer_bytes_per_token(hidden: int, mlp_ratio: float, bf16: bool) -> float:
    """Peak bytes per token of a no-grad DiTBlock: the RoPE step, or the MLP if it is wider."""
    attn = sum(b16 if bf16 else b32 for _, b32, b16 in INFER_PER_TOKEN)
    s = 2 if bf16 else 4
    mlp = (2 + 2 * mlp_ratio) * s  # x, modulated input, hidden before and after GELU
    return max(attn, mlp) * hidden


def clip_text_params(width: int, layers: int, context: int, projection: bool = True) -> int:
    """Parameters of an open_clip text tower: embeddings, `layers` residual blocks, final norm, projection."""
    block = 12 * width * width + 13 * width  # attention in/out, MLP 4x, two LayerNorms
    return CLIP_VOCAB * width + context * width + layers * block + 2 * width + (width * width if projection else 0)


def round_clip(frames: int, height: int, width: int, kt: int, s: int, ph: int = 1, pw: int = 1) -> tuple[int, int, int]:
    """Round a clip UP to what the causal VAE and the patch accept: 1 + kt*k frames, sides multiples of s*p."""
    T = 1 + kt * math.ceil((frames - 1) / kt) if kt > 1 else frames
    return T, s * ph * math.ceil(height / (s * ph)), s * pw * math.ceil(width / (s * pw))


# ---- training ----------------------------------------------------------------------------------
def training_peak(su: Setup, tokens: int, batch: int = 1, *, bf16: bool, adamw8bit: bool, checkpointing: bool,
                  ema: bool = True, device: str = "cuda") -> dict[str, float]:
    """Bytes live at the peak of one training step, by component (key "total" is their sum)."""
    n, D = batch * tokens, su.hidden
    sb = 2 if bf16 else 4
    # LoRA: the base is frozen (no gradients or optimizer state for it); the adapters add weights (and EMA).
    # Activations are counted as in full training: a frozen linear no longer needs its input for backward,
    # but a LoRA'd one still saves it for lora_A, and those are most of the saved tensors.
    lora = su.lora_params > 0
    trainable = su.lora_params if lora else su.params
    weights = su.params + su.lora_params
    fixed = {
        "weights (fp32)": 4.0 * weights,
        "EMA copy (fp32)": 4.0 * weights if ema else 0.0,
        "optimizer state": (ADAMW8BIT_BYTES if adamw8bit else ADAMW_BYTES) * trainable,
        # latents x0, noise, x_t (fp32) and the text context
        "inputs": batch * (3 * 4.0 * tokens * su.patch_values + 4.0 * su.text_tokens * su.text_dim),
        # embedder input, final layer (two fp32 norms + its linear input), loss, RoPE tables
        "embedding, final layer": n * ((8 + sb) * D + 3 * 4 * su.patch_values) + tokens * 8 * D // su.heads,
    }
    block = n * saved_bytes_per_token(D, su.heads, su.mlp_ratio, bf16) + 4 * su.text_tokens * D * sb * batch
    block += 2.0 * su.block_linear_params if bf16 else 0.0  # autocast's bf16 weight copies, saved for backward
    work = n * D * (2 * su.mlp_ratio * sb + 8)  # one block's backward: grads of the MLP hidden and the stream
    if lora:
        grad_block, grad_outer = 4.0 * su.lora_block_params, 4.0 * (su.lora_params - su.depth * su.lora_block_params)
    else:
        grad_block, grad_outer = 4.0 * su.block_params, 4.0 * (su.params - su.depth * su.block_params)
    events = []
    for k in range(su.depth, 0, -1):  # backward reaches block k (k blocks' activations still held)
        acts = k * n * D * 4.0 + block if checkpointing else k * block
        events.append({"gradients (fp32)": grad_outer + (su.depth - k) * grad_block,
                       "activations": acts, "backward working set": work})  # fmt: skip
    if checkpointing and bf16:  # end of forward: autocast caches bf16 copies of all weights until it exits
        events.append({"activations": su.depth * n * D * 4.0 + 2.0 * su.linear_params, "backward working set": work})
    # optimizer step: torch AdamW's foreach path (CUDA default) makes one fp32 temporary per parameter
    step_temp = 4.0 * trainable if not adamw8bit and device == "cuda" else 0.0
    events.append({"gradients (fp32)": 4.0 * trainable, "optimizer step temporaries": step_temp})
    peak = max(events, key=lambda e: sum(e.values()))
    out = {**fixed, **{k: 0.0 for k in ("gradients (fp32)", "activations", "backward working set")}, **peak}
    out["total"] = sum(out.values())
    return out


# ---- sampling ----------------------------------------------------------------------------------
def decode_bytes(vae: dict, frames: int, height: int, width: int, batch: int, tiling: bool) -> dict[str, float]:
    """VAE decode peak: one call's working set (a tile/chunk when tiling) and the fp32 output buffers."""
    top = 4.0 * vae["base_channels"] * vae["channel_multipliers"][0] / vae["patch_size"] ** 2  # B per pixel-frame
    per_call = min(batch, max(1, DECODE_PIXELS // (frames * height * width)))
    out = 12.0 * per_call * frames * height * width  # (b, 3, T, H, W) float32
    if not tiling:  # the output is part of the calibrated working set
        return {"VAE decode working set": VAE_DECODE_TENSORS * top * per_call * frames * height * width}
    tile, chunk = vae["tile_size"], 1 + vae["chunk_frames"]
    th, tw, tf = min(height, tile), min(width, tile), min(frames, chunk)
    ws = VAE_DECODE_TENSORS * top * per_call * tf * th * tw
    piece = 12.0 * per_call * frames * th * tw  # one tile over all frames: chunk outputs + their concatenation
    if max(height, width) > tile:  # blended into an fp32 accumulator, divided by the weights at the end
        return {"VAE decode working set": max(ws + 2 * piece, out), "decoded video (fp32)": out}
    if frames > chunk:  # chunks concatenated
        return {"VAE decode working set": ws, "decoded video (fp32)": 2 * out}
    return {"VAE decode working set": ws}


def sampling_peak(su: Setup, tokens: int, latent_values: int, video: tuple[int, int, int], batch: int = 1, *,
                  bf16: bool, offload: bool, vae_tiling: bool, cfg_two_calls: bool) -> dict[str, float]:
    """Bytes live at the peak of sampling `batch` videos with classifier-free guidance, by component."""
    dit_w = (2.0 if bf16 else 4.0) * su.params
    text_w, vae_w = 4.0 * su.text_params, 4.0 * su.vae_params
    calls = batch * (1 if cfg_two_calls else 2)  # cond + uncond in one batch, or one at a time
    state = 6 * 4.0 * batch * latent_values  # latents, cond/uncond velocities, the step's update (fp32)
    forward = {"DiT forward working set": calls * tokens * infer_bytes_per_token(su.hidden, su.mlp_ratio, bf16),
               "sampler state": state}  # fmt: skip
    decode = decode_bytes(su.vae, *video, batch, vae_tiling)
    if offload:  # the text encoder visits before sampling, the VAE after it; the DiT stays
        phases = [{"text encoder (fp32)": text_w}, forward, {"VAE weights (fp32)": vae_w, **decode}]
        peak = max(phases, key=lambda p: sum(p.values()))
    else:
        peak = {"text encoder (fp32)": text_w, "VAE weights (fp32)": vae_w,
                **max([forward, decode], key=lambda p: sum(p.values()))}  # fmt: skip
    out = {"DiT weights": dit_w, **peak}
    out["total"] = sum(out.values())
    return out


def on_device(total: float, device: str) -> float:
    """Bytes the device must have for `total` live bytes: CUDA context and allocator slack, or glibc's RSS."""
    return total * (1 + GPU_SLACK) + GPU_CONTEXT_GIB * GIB if device == "cuda" else total * GLIBC_RSS_FACTOR


# ---- the setup and the plan --------------------------------------------------------------------
def load_setup(preset: str, vae: str | Path | None = None, text_tokens: int = 77, text_dim: int = 768,
               configs: str | Path = CONFIGS, lora_rank: int = 0, lora_targets: list[str] | None = None) -> Setup:
    """Count the parameters of configs/model/<preset>.yaml and the VAE config, building both on the meta device.

    lora_rank > 0: also count the LoRA parameters (rank x (in + out) per targeted Linear) of a LoRA fine-tune.
    """
    import torch
    from omegaconf import OmegaConf
    from torch import nn

    from minisora.config import kwargs, load_config
    from minisora.models.autoencoder import VideoVAE
    from minisora.models.dit import VideoDiT

    configs = Path(configs)
    model_args = model_preset(preset, configs)
    vae_path = Path(vae) if vae is not None else configs / "vae" / "standard.yaml"
    if not vae_path.is_file():
        raise ValueError(f"--vae {vae_path}: file not found (give a config with a vae: section, e.g. "
                         "configs/vae/standard.yaml)")
    raw = OmegaConf.load(vae_path)  # load_config fills a missing section with defaults: check it is there
    if "vae" not in raw and not any("vae" in OmegaConf.load(vae_path.parent / f) for f in raw.get("base", []) or []):
        raise ValueError(f"--vae {vae_path}: no vae: section (give e.g. configs/vae/standard.yaml)")
    vae_args = kwargs(load_config(vae_path).vae)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        vae_model = VideoVAE(**vae_args)
        args = {**model_args, "in_channels": vae_model.latent_channels, "text_dim": text_dim, "condition": "text"}
        model = VideoDiT(**args)

    def linear(m: nn.Module, weights_only: bool = False) -> int:
        return sum(p.numel() for mod in m.modules() if isinstance(mod, nn.Linear)
                   for p in ([mod.weight] if weights_only else mod.parameters()))  # fmt: skip

    block = model.blocks[0]
    lora, lora_block = 0, 0
    if lora_rank > 0:
        from minisora.models.lora import lora_settings, target_regex

        pattern = target_regex(model, lora_settings(rank=lora_rank, targets=lora_targets)["targets"])
        hit = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
        lora = sum(lora_rank * (m.in_features + m.out_features) for _, m in hit)
        lora_block = sum(lora_rank * (m.in_features + m.out_features) for n, m in hit if n.startswith("blocks.0."))
    # Backward keeps a linear's (bf16) weight only to get its input's gradient: not for kv, which reads the text,
    # nor for qkv, fc1, fc2 under recompute (RecomputedLinear keeps the float32 weight and casts it in backward).
    kv = block.cross_attn.kv.weight.numel() if block.cross_attn is not None else 0
    if block.mlp.recompute:
        kv += sum(m.weight.numel() for m in (block.attn.qkv, block.mlp.fc1, block.mlp.fc2))

    return Setup(
        preset=preset, params=model.num_parameters(), block_params=sum(p.numel() for p in block.parameters()),
        linear_params=linear(model), block_linear_params=linear(block, weights_only=True) - kv,
        hidden=model.hidden_size, depth=len(model.blocks), heads=block.attn.num_heads, mlp_ratio=args["mlp_ratio"],
        patch=list(model.patch_size), latent_channels=vae_model.latent_channels, text_tokens=text_tokens,
        text_dim=text_dim, text_params=clip_text_params(text_dim, CLIP_LAYERS.get(text_dim, 12), text_tokens),
        vae_params=sum(p.numel() for p in vae_model.parameters()), vae=dict(vae_model.config),
        lora_params=lora, lora_block_params=lora_block,
    )  # fmt: skip


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def plan(preset: str = "B", frames: int = 48, height: int = 480, width: int = 854, batch: int = 1,
         budget_gb: float = 24.0, vae: str | Path | None = None, text_tokens: int = 77, text_dim: int = 768,
         device: str = "cuda", configs: str | Path = CONFIGS, lora_rank: int = 0,
         lora_targets: list[str] | None = None) -> dict:
    """Peak memory of training (a LoRA fine-tune with lora_rank > 0) and sampling for every switch combination,
    and the cheapest set that fits."""
    for name, value in (("--frames", frames), ("--height", height), ("--width", width), ("--batch", batch),
                        ("--budget-gb", budget_gb), ("--text-tokens", text_tokens), ("--text-dim", text_dim)):
        check_positive(name, value)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {device!r}")
    if lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {lora_rank}")
    su = load_setup(preset, vae, text_tokens, text_dim, configs, lora_rank, lora_targets)
    kt, s = su.vae["temporal_compression"], su.vae["spatial_compression"]
    pt, ph, pw = su.patch
    T, H, W = round_clip(frames, height, width, kt, s, ph, pw)
    h, w = H // s, W // s

    def grid(t: int) -> tuple[int, int, int]:
        return -(-t // pt), h // ph, w // pw

    t = 1 + (T - 1) // kt
    tokens = math.prod(grid(t))
    budget = budget_gb * GIB

    def train(n: int, video: tuple[int, int, int], sw: dict) -> dict:
        return training_peak(su, n, batch, device=device, **sw)

    def sample(n: int, video: tuple[int, int, int], sw: dict) -> dict:
        return sampling_peak(su, n, n * su.patch_values, video, batch, **sw)

    result = {
        "preset": preset, "params": su.params, "setup": asdict(su), "device": device, "budget_gb": budget_gb,
        "clip": [frames, height, width], "rounded": [T, H, W], "latent": [su.latent_channels, t, h, w],
        "grid": list(grid(t)), "tokens": tokens, "batch": batch,
    }  # fmt: skip
    for task, fn, switches in (("training", train, TRAIN_SWITCHES), ("sampling", sample, SAMPLE_SWITCHES)):
        rows = []
        for values in itertools.product((False, True), repeat=len(switches)):
            sw = dict(zip(switches, values))
            parts = fn(tokens, (T, H, W), sw)
            need = on_device(parts["total"], device)
            cost = sum(c for k, c in switches.items() if sw[k])
            rows.append({"switches": sw, "cost": cost, "components": parts, "on_device": need, "fits": need <= budget})
        rows.sort(key=lambda r: (r["cost"], r["on_device"]))
        fitting = [r for r in rows if r["fits"]]
        every = {k: True for k in switches}

        def fits(n: int, video: tuple[int, int, int]) -> bool:  # with every switch on
            return on_device(fn(n, video, every)["total"], device) <= budget

        max_fit = None
        if not fitting:  # the longest clip at this size that fits with every switch, else the most tokens
            k = max((k for k in range(1, t + 1) if fits(math.prod(grid(k)), (1 + kt * (k - 1), H, W))), default=0)
            lo, hi = 0, tokens  # most tokens that fit (one frame's decode for sampling), by bisection
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(mid, (1, H, W)) else (lo, mid - 1)
            max_fit = {"latent_frames": k, "frames": 1 + kt * (k - 1) if k else 0,
                       "tokens": math.prod(grid(k)) if k else lo}
        result[task] = {"rows": rows, "cheapest": fitting[0] if fitting else None, "max_fit": max_fit}
    return result


# ---- output ------------------------------------------------------------------------------------
