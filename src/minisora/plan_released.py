"""Memory and time planner for the released models (Wan2.1 T2V 1.3B, Wan2.2 TI2V 5B, LTX-Video 2B, or a folder).

    minisora plan --pretrained wan2.1-t2v-1.3b --frames 81 --height 480 --width 832 [--lora-rank 32]
    minisora plan --pretrained models/wan2.1-t2v-1.3b ...      # a diffusers folder: its JSON configs only
    minisora plan --released-table                              # the 24 GB table (docs/benchmarks.md)

Training runs from the latent + text cache, so the text encoder and VAE are not on the device while the
transformer trains; they are sized for the caching pass (encode captions, then clips) and for sampling.
Bytes are live tensors at the peak, by component, as in minisora.plan; the device needs them plus the
assumed allocator slack and CUDA context (plan.on_device). Saved activations per block are counted from the
diffusers 0.42 blocks and checked against autograd's saved tensors on tiny instances of the real classes
(tests/test_plan_released.py), FLOPs against torch's FlopCounterMode. Step times are FLOPs / (peak x an
ASSUMED MFU): computed, not measured.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from minisora.bench.flops import gpu_peak_flops, released_forward_flops, released_step_flops
from minisora.plan import ADAMW8BIT_BYTES, GIB, VAE_DECODE_TENSORS, check_positive, on_device, round_clip

# umT5-XXL (Wan) and T5-v1.1-XXL (LTX-Video) encoder configs, as their text_encoder/config.json give them.
UMT5_XXL = dict(model_type="umt5", vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")  # fmt: skip
T5_XXL = {**UMT5_XXL, "model_type": "t5", "vocab_size": 32128}
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True])
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)  # fmt: skip
LTX_VAE = dict(latent_channels=128, block_out_channels=[128, 256, 512, 512],
               decoder_block_out_channels=[128, 256, 512, 512], spatio_temporal_scaling=[True, True, True, False],
               patch_size=4, patch_size_t=1)  # fmt: skip
WAN_T = dict(patch_size=[1, 2, 2], attention_head_dim=128, text_dim=4096, freq_dim=256, num_layers=30)
# The released configs (DESIGN.md: checked against diffusers 0.42): name -> (family, transformer, vae, text encoder).
PRESETS = {
    "wan2.1-t2v-1.3b": ("wan2.1-t2v", {**WAN_T, "num_attention_heads": 12, "ffn_dim": 8960, "in_channels": 16,
                                       "out_channels": 16}, WAN21_VAE, UMT5_XXL),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v", {**WAN_T, "num_attention_heads": 24, "ffn_dim": 14336, "in_channels": 48,
                                       "out_channels": 48}, WAN22_VAE, UMT5_XXL),
    "ltx-video-2b": ("ltx-video", dict(in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64,
                                       cross_attention_dim=2048, num_layers=28, caption_channels=4096),
                     LTX_VAE, T5_XXL),
}  # fmt: skip
CLASSES = {"wan": ("WanTransformer3DModel", "AutoencoderKLWan"), "ltx": ("LTXVideoTransformer3DModel",
           "AutoencoderKLLTXVideo")}  # fmt: skip

# What one block keeps for backward per video token, as the trainer runs it (bf16 autocast, "bf16-mixed"): (fp32
# D-wide, bf16 D-wide, bf16 ffn-wide, fp32 per head, fp32 scalars, bytes per text token x D) for a full fine-tune
# of bf16 weights, of fp32 master weights, and LoRA (fp32 adapters on a bf16 base). fp32: the FP32LayerNorm inputs
# (Wan) and the q/k RMSNorm upcasts, their outputs where a trained weight or modulation multiplies them, the gated
# residual products; bf16: the linear inputs, SDPA's q, k, v and output, the cross-attention query (LoRA: autocast's
# bf16 copies of the adapters' fp32-cast inputs); ffn: GELU's input and output; per head: SDPA's logsumexp (self,
# cross); scalars: norm statistics; text: the cross-attention keys, values and their inputs. LoRA freezes the
# modulation and norms, so fewer fp32 outputs are kept. LTX-Video's fp32 counts include its two RoPE tables (N x D),
# which all blocks share. Counted on the diffusers 0.42 blocks with saved_tensors_hooks (tests/test_plan_released.py).
SAVED = {("wan", "full"): (13, 10, 2, 2, 9, 12), ("wan", "master"): (13, 10, 2, 2, 9, 13),
         ("wan", "lora"): (6, 13, 2, 2, 9, 13), ("ltx", "full"): (10, 15, 2, 2, 5, 12),
         ("ltx", "master"): (11, 15, 2, 2, 5, 18), ("ltx", "lora"): (7, 15, 2, 2, 5, 14)}  # fmt: skip
MODES = ("full", "master", "lora")
ROPE_SHARED_F32 = {"wan": 0, "ltx": 2}  # of SAVED's fp32 D-wide tensors: the RoPE tables, counted once per model
PER_TOKEN_T = 8  # Wan2.2 TI2V (a timestep per token): the (N, 6, D) fp32 modulation sum + two (1 + scale) tensors
LORA_SAVED = 2  # bytes per token x rank of each LoRA'd linear fed by video tokens: lora_A's output (bf16)
# Assumed until measured: a no-grad block's peak per token (bf16: the input, its fp32 norm, q, k, v and the fp32
# RMSNorm upcasts, in D units of bytes), and a backward's transient gradients (ffn-wide bf16 x 2, D-wide fp32 x 4).
INFER_D, INFER_FFN = 26, 4
WORK_D, WORK_FFN = 16, 4


@dataclass
class ReleasedSetup:
    """What the memory and FLOP model needs about a released model: counted on the meta device from its configs."""

    name: str
    family: str  # "wan" or "ltx"
    per_token_t: bool  # Wan2.2 TI2V: one timestep per token
    params: int
    block_params: int
    int8_params: int  # weights of the block Linear layers (what quantize_int8 turns into int8)
    int8_rows: int  # their output rows (one fp32 scale each)
    depth: int
    hidden: int
    heads: int
    ffn: int
    patch: list[int]
    latent_channels: int
    time_in: int  # sinusoidal timestep width
    text_tokens: int
    text_dim: int
    text_params: int
    vae_params: int
    kt: int
    s: int
    vae_top: list[int]  # encoder top channels, decoder top channels, pixels per side of a top-level feature
    vae_causal: bool  # Wan: encodes/decodes 4 frames per call (+2 cached); LTX: all frames at once
    lora_rank: int = 0
    lora_params: int = 0
    lora_video_layers: int = 0  # LoRA'd linears per block that read video tokens (not the text's k/v)


def t5_params(cfg: dict) -> int:
    """Parameters of a T5/umT5 encoder: embeddings, attention, (gated) FFN, norms, relative position biases."""
    d, ff, layers, heads = cfg["d_model"], cfg["d_ff"], cfg["num_layers"], cfg["num_heads"]
    inner = cfg["d_kv"] * heads
    gated = str(cfg.get("feed_forward_proj", "relu")).startswith("gated")
    block = 4 * d * inner + (3 if gated else 2) * d * ff + 2 * d
    biases = cfg["relative_attention_num_buckets"] * heads * (layers if cfg.get("model_type") == "umt5" else 1)
    return cfg["vocab_size"] * d + layers * block + d + biases


def resolve(model: str | Path) -> tuple[str, str, dict, dict, dict]:
    """(name, family name, transformer, vae, text encoder configs) of a preset name or a diffusers folder."""
    if str(model) in PRESETS:
        return (str(model), *PRESETS[str(model)])
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"--pretrained {model}: neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    from minisora.models.diffusers_folder import describe

    info = describe(path)  # JSON only: no weights are read
    c = info.configs
    return str(path), info.family.name, c["transformer"], c["vae"], c["text_encoder"]


@lru_cache(maxsize=16)
def _count(kind: str, transformer: str, vae: str, rank: int) -> dict:
    """Counts from the diffusers classes built on the meta device (configs as JSON strings, for the cache)."""
    import torch
    import diffusers
    from torch import nn

    from minisora.models.lora_formats import FAMILIES
    from minisora.models.quantized import BLOCK_LINEARS

    t_cls, v_cls = CLASSES[kind]
    with torch.device("meta"):
        model = getattr(diffusers, t_cls).from_config(json.loads(transformer))
        vae_model = getattr(diffusers, v_cls).from_config(json.loads(vae))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    blocks = [m for n, m in linears if re.fullmatch(BLOCK_LINEARS, n)]
    lora = re.compile("|".join(f"(?:{p})" for p in FAMILIES[t_cls][1].values()))
    hit = [(n, m) for n, m in linears if lora.fullmatch(n)]
    first = re.compile(r"(transformer_)?blocks\.0\.")
    block = (model.blocks if kind == "wan" else model.transformer_blocks)[0]
    return dict(
        params=sum(p.numel() for p in model.parameters()), block_params=sum(p.numel() for p in block.parameters()),
        int8_params=sum(m.weight.numel() for m in blocks), int8_rows=sum(m.out_features for m in blocks),
        vae_params=sum(p.numel() for p in vae_model.parameters()),
        lora_params=sum(rank * (m.in_features + m.out_features) for _, m in hit) if rank else 0,
        lora_video_layers=sum(1 for n, _ in hit if first.match(n) and not re.search(r"attn2\.to_[kv]$", n)),
    )  # fmt: skip


def load_released_setup(model: str | Path, lora_rank: int = 0) -> ReleasedSetup:
    """The setup of a preset (PRESETS) or a diffusers folder; lora_rank > 0 counts LoRA on every attention and MLP
    linear of the blocks (add_released_lora's default targets)."""
    from minisora.models.diffusers_folder import FAMILIES
    from minisora.models.diffusers_vae import compression

    name, family_name, t, v, text = resolve(model)
    family = next(f for f in FAMILIES if f.name == family_name)
    kind = family.vae_kind
    counts = _count(kind, json.dumps(t, sort_keys=True), json.dumps(v, sort_keys=True), lora_rank)
    kt, s = compression(kind, v)
    if kind == "wan":
        D = t["num_attention_heads"] * t["attention_head_dim"]
        ffn, patch, time_in = t["ffn_dim"], list(t["patch_size"]), t.get("freq_dim", 256)
        top = [v["base_dim"], v.get("decoder_base_dim") or v["base_dim"], v.get("patch_size") or 1]
    else:
        D = t["num_attention_heads"] * t["attention_head_dim"]
        ffn, patch, time_in = 4 * D, [t.get("patch_size_t", 1), t.get("patch_size", 1), t.get("patch_size", 1)], 256
        decoder = v.get("decoder_block_out_channels") or v["block_out_channels"]
        top = [v["block_out_channels"][0], decoder[0], v["patch_size"]]
    return ReleasedSetup(
        name=name, family=kind, per_token_t=family.name == "wan2.2-ti2v", depth=t["num_layers"], hidden=D,
        heads=t["num_attention_heads"], ffn=ffn, patch=patch, latent_channels=int(t["in_channels"]), time_in=time_in,
        text_tokens=family.context_length, text_dim=int(text["d_model"]), text_params=t5_params(text), kt=kt, s=s,
        vae_top=top, vae_causal=kind == "wan", lora_rank=lora_rank, **counts,
    )  # fmt: skip


# ---- activations -------------------------------------------------------------------------------
def block_saved_bytes(su: ReleasedSetup, tokens: int, mode: str) -> float:
    """Bytes one block keeps for backward for `tokens` video tokens (one sample), shared RoPE tables excluded.

    mode: "full" (bf16 weights), "master" (fp32 weights under bf16 autocast) or "lora" (fp32 adapters, rank
    su.lora_rank, on a frozen bf16 base; an int8 base is counted the same).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    f32, b16, ffn, heads, scalars, text = SAVED[(su.family, mode)]
    f32 += (PER_TOKEN_T if su.per_token_t else 0) - ROPE_SHARED_F32[su.family]
    per_token = (4 * f32 + 2 * b16) * su.hidden + 2 * ffn * su.ffn + 4 * heads * su.heads + 4 * scalars
    if mode == "lora":
        per_token += LORA_SAVED * su.lora_rank * su.lora_video_layers
    return tokens * per_token + text * su.text_tokens * su.hidden


def shared_bytes(su: ReleasedSetup, tokens: int) -> float:
    """Per-sample tensors every block reads: RoPE tables, per-token timestep projections, the projected text."""
    D = su.hidden
    rope = 4 * ROPE_SHARED_F32["ltx"] * D if su.family == "ltx" else 2 * 4 * D // su.heads  # Wan: cos, sin per head dim
    timestep = 14 * D if su.per_token_t else 0  # (N, 6D) projection + (N, D) embedding, bf16
    return tokens * (rope + timestep) + 2 * su.text_tokens * D


# ---- training ----------------------------------------------------------------------------------
def base_weight_bytes(su: ReleasedSetup, int8: bool) -> float:
    """Transformer weights in bf16, or with the block linears in int8 (1 B and one fp32 scale per output row)."""
    if not int8:
        return 2.0 * su.params
    return 1.0 * su.int8_params + 4.0 * su.int8_rows + 2.0 * (su.params - su.int8_params)


def released_training_peak(su: ReleasedSetup, tokens: int, batch: int = 1, *, lora: bool, int8: bool = False,
                           adamw8bit: bool, master: bool = False, checkpointing: bool, ema: bool = False,
                           device: str = "cuda") -> dict[str, float]:  # fmt: skip
    """Bytes live at the peak of one training step from the cache, by component ("total" is their sum).

    lora: LoRA (rank su.lora_rank, fp32 adapters) on a frozen base in bf16, or int8 (block linears; lora only);
    otherwise a full fine-tune in bf16 (master=False: bf16 weights, gradients and AdamW moments) or with fp32
    master weights (master=True: fp32 weights and gradients, autocast's bf16 copies). Activations as block_saved_bytes
    counts them under bf16 autocast; an int8 base's as a bf16 base's (bitsandbytes computes in bf16 on CUDA).
    """
    if int8 and not lora:
        raise ValueError("an int8 base is frozen: it goes with LoRA (lora=True)")
    if master and lora:
        raise ValueError("master weights are a full fine-tune's (lora=False)")
    n, D, P = batch * tokens, su.hidden, su.params
    base = base_weight_bytes(su, int8)
    trainable = su.lora_params if lora else P
    wb = 4.0 if lora or master else 2.0  # bytes of a trainable weight, its gradient
    state = ADAMW8BIT_BYTES if adamw8bit else (8.0 if wb == 4 else 4.0)  # torch AdamW: moments in the param dtype
    fixed = {
        "transformer weights (int8 base)" if int8 else "transformer weights (bf16)": 0.0 if master else base,
        "fp32 master weights": 4.0 * P if master else 0.0,
        "LoRA adapters (fp32)": 4.0 * su.lora_params if lora else 0.0,
        "optimizer state": state * trainable,
        "EMA copy": wb * trainable if ema else 0.0,
        # latents x0, noise, x_t (fp32), the cached text embedding (bf16), the shared per-sample tensors
        "inputs, shared tensors": batch * (3 * 4.0 * tokens * math.prod(su.patch) * su.latent_channels
                                           + 2.0 * su.text_tokens * su.text_dim + shared_bytes(su, tokens)),
    }  # fmt: skip
    block = batch * block_saved_bytes(su, tokens, "lora" if lora else "master" if master else "full")
    work = n * (WORK_D * D + WORK_FFN * su.ffn)
    # full: a block's gradients appear as backward passes it (the layers after the blocks' exist from the start)
    grad_outer = 4.0 * su.lora_params if lora else wb * (P - su.depth * su.block_params)
    grad_block = 0.0 if lora else wb * su.block_params
    # fp32 master weights: autocast caches a bf16 copy of each weight until the forward ends; backward holds the
    # copies its saved tensors reference (a recomputed block's only, under checkpointing)
    copy = 2.0 * su.block_params if master else 0.0
    events = [{"activations": su.depth * (n * D * 2.0 if checkpointing else block),
               "autocast bf16 weight copies": 2.0 * P if master else 0.0}]  # the end of the forward  # fmt: skip
    for k in range(su.depth, 0, -1):  # backward reaches block k: k blocks' activations still held
        acts = k * n * D * 2.0 + block if checkpointing else k * block
        events.append({"gradients": grad_outer + (su.depth - k) * grad_block, "activations": acts,
                       "autocast bf16 weight copies": copy if checkpointing else k * copy,
                       "backward working set": work})  # fmt: skip
    step_temp = wb * trainable if not adamw8bit and device == "cuda" else 0.0  # AdamW's foreach temporaries
    events.append({"gradients": wb * trainable, "optimizer step temporaries": step_temp})
    peak = max(events, key=lambda e: sum(e.values()))
    out = {**fixed, **peak}
    out = {k: v for k, v in out.items() if v}
    out["total"] = sum(out.values())
    return out


# ---- caching pass and sampling -----------------------------------------------------------------
def vae_working_set(su: ReleasedSetup, frames: int, height: int, width: int, decode: bool) -> float:
    """Rough VAE encode/decode working set: minisora's VAE calibration (VAE_DECODE_TENSORS top-level feature maps)
    applied to the released VAE's top-level features (bf16) over the frames of one call. Not measured on these VAEs."""
    enc, dec, p = su.vae_top
    per_call = min(frames, 4 + 2) if su.vae_causal else frames  # Wan: 4 frames per call + its 2-frame causal cache
    return VAE_DECODE_TENSORS * (dec if decode else enc) * 2.0 * per_call * (height // p) * (width // p)


def caching_peak(su: ReleasedSetup, video: tuple[int, int, int]) -> dict[str, dict[str, float]]:
    """The caching pass, one part on the device at a time: captions through the text encoder, clips through the VAE."""
    T, H, W = video
    text = {"text encoder (bf16)": 2.0 * su.text_params,
            "encoder activations": 24.0 * su.text_tokens * su.text_dim}  # a few d_model-wide fp32 tensors  # fmt: skip
    vae = {"VAE weights (bf16)": 2.0 * su.vae_params, "clip (bf16)": 6.0 * T * H * W,
           "VAE encode working set": vae_working_set(su, T, H, W, decode=False)}  # fmt: skip
    return {"text": {**text, "total": sum(text.values())}, "vae": {**vae, "total": sum(vae.values())}}


def infer_bytes_per_token(su: ReleasedSetup) -> float:
    """Peak bytes per token of a no-grad block (INFER_D, INFER_FFN: assumed)."""
    return max(INFER_D * su.hidden, 4 * su.hidden + INFER_FFN * su.ffn)


def released_sampling_peak(su: ReleasedSetup, tokens: int, video: tuple[int, int, int], batch: int = 1, *,
                           offload: bool, cfg_two_calls: bool, int8: bool = False) -> dict[str, float]:  # fmt: skip
    """Bytes live at the peak of sampling with classifier-free guidance, then decoding (untiled)."""
    T, H, W = video
    weights = base_weight_bytes(su, int8)
    calls = batch * (1 if cfg_two_calls else 2)
    latent = batch * tokens * math.prod(su.patch) * su.latent_channels
    forward = {
        "transformer forward working set": calls * (tokens * infer_bytes_per_token(su) + shared_bytes(su, tokens)),
        "sampler state": 6 * 4.0 * latent,
    }  # fmt: skip
    decode = {"VAE decode working set": vae_working_set(su, T, H, W, decode=True),
              "decoded video (fp32)": 12.0 * T * H * W}  # fmt: skip
    text, vae = {"text encoder (bf16)": 2.0 * su.text_params}, {"VAE weights (bf16)": 2.0 * su.vae_params, **decode}
    if offload:  # the text encoder visits before sampling, the VAE after it; the transformer stays
        peak = max([text, forward, vae], key=lambda p: sum(p.values()))
    else:
        peak = {**text, "VAE weights (bf16)": 2.0 * su.vae_params,
                **max([forward, decode], key=lambda p: sum(p.values()))}  # fmt: skip
    out = {"transformer weights": weights, **peak}
    out["total"] = sum(out.values())
    return out


# ---- time (FLOPs: bench/flops.py) --------------------------------------------------------------
STEP_GPU = "NVIDIA GeForce RTX 4090"
STEP_MFUS = (0.2, 0.35, 0.5)  # ASSUMED: no GPU has measured a released model's step here


def step_seconds(flops: float, gpu: str = STEP_GPU) -> list[float]:
    """Seconds per step at each assumed MFU (computed, not measured)."""
    return [flops / (gpu_peak_flops(gpu) * m) for m in STEP_MFUS]


# ---- the plan ----------------------------------------------------------------------------------
LORA_SWITCHES = {"adamw8bit": 1, "int8": 2, "checkpointing": 3}  # ordinal cost, as plan.TRAIN_SWITCHES
FULL_SWITCHES = {"adamw8bit": 1, "no_master": 2, "checkpointing": 3}
SAMPLE_SWITCHES = {"offload": 1, "cfg_two_calls": 2}


def clip_tokens(su: ReleasedSetup, frames: int, height: int, width: int) -> tuple[tuple, list[int], list[int]]:
    """(rounded clip (T, H, W), latent (C, t, h, w), token grid) as the family's VAE and patch need them."""
    pt, ph, pw = su.patch
    T, H, W = round_clip(frames, height, width, su.kt, su.s, ph, pw)
    t, h, w = 1 + (T - 1) // su.kt, H // su.s, W // su.s
    return (T, H, W), [su.latent_channels, t, h, w], [-(-t // pt), h // ph, w // pw]


def train_row(su: ReleasedSetup, tokens: int, batch: int, sw: dict, device: str, budget: float) -> dict:
    lora = "int8" in sw
    parts = released_training_peak(su, tokens, batch, lora=lora, int8=sw.get("int8", False), adamw8bit=sw["adamw8bit"],
                                   master=not sw.get("no_master", True), checkpointing=sw["checkpointing"],
                                   device=device)  # fmt: skip
    need = on_device(parts["total"], device)
    flops = released_step_flops(su, tokens, batch, lora=lora, checkpointing=sw["checkpointing"])
    return {"switches": sw, "components": parts, "on_device": need, "fits": need <= budget, "step_flops": flops,
            "step_seconds": step_seconds(flops)}  # fmt: skip


def plan_released(model: str | Path, frames: int, height: int, width: int, batch: int = 1, budget_gb: float = 24.0,
                  lora_rank: int = 32, device: str = "cuda") -> dict:  # fmt: skip
    """Training (LoRA of lora_rank, or full with lora_rank 0) for every switch combination, the caching pass and
    sampling of a released model, with the cheapest training set that fits and step times at assumed MFUs."""
    for name, value in (("--frames", frames), ("--height", height), ("--width", width), ("--batch", batch),
                        ("--budget-gb", budget_gb)):  # fmt: skip
        check_positive(name, value)
    if lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0: full fine-tune), got {lora_rank}")
    su = load_released_setup(model, lora_rank)
    video, latent, grid = clip_tokens(su, frames, height, width)
    tokens, budget = math.prod(grid), budget_gb * GIB
    switches = LORA_SWITCHES if lora_rank else FULL_SWITCHES
    rows = []
    for values in itertools.product((False, True), repeat=len(switches)):
        sw = dict(zip(switches, values))
        cost = sum(c for k, c in switches.items() if sw[k])
        rows.append({**train_row(su, tokens, batch, sw, device, budget), "cost": cost})
    rows.sort(key=lambda r: (r["cost"], r["on_device"]))
    sampling = []
    for values in itertools.product((False, True), repeat=len(SAMPLE_SWITCHES)):
        sw = dict(zip(SAMPLE_SWITCHES, values))
        parts = released_sampling_peak(su, tokens, video, batch, **sw)
        need = on_device(parts["total"], device)
        sampling.append({"switches": sw, "components": parts, "on_device": need, "fits": need <= budget})
    caching = caching_peak(su, video)
    return {
        "model": su.name, "setup": asdict(su), "device": device, "budget_gb": budget_gb,
        "clip": [frames, height, width], "rounded": list(video), "latent": latent, "grid": grid, "tokens": tokens,
        "batch": batch,
        "training": {"rows": rows, "cheapest": next((r for r in rows if r["fits"]), None)},
        "caching": {k: {**v, "on_device": on_device(v["total"], device)} for k, v in caching.items()},
        "sampling": sampling, "step_gpu": STEP_GPU, "mfu_assumed": list(STEP_MFUS),
        "sample_step_flops": 2 * released_forward_flops(su, tokens, batch)["total"],  # CFG: two passes per step
    }  # fmt: skip
