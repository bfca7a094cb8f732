"""The memory planner: arithmetic by hand, the count of saved activations against autograd, switches,
calibration against the measured CPU figures, size rounding, the CLI, the token table and a recipe's GPU-hours."""

import json

import pytest
import torch

from minisora import plan as P
from minisora.cli import plan as R
from minisora.cli import main
from minisora.models.dit import VideoDiT

VAE = dict(base_channels=8, channel_multipliers=[1, 2], patch_size=2, tile_size=16, tile_overlap=8, chunk_frames=4,
           temporal_compression=4, spatial_compression=4)  # fmt: skip


def tiny_setup(**kw) -> P.Setup:
    args = dict(preset="hand", params=1000, block_params=100, linear_params=900, block_linear_params=80, hidden=8,
                depth=2, heads=2, mlp_ratio=4.0, patch=[1, 1, 1], latent_channels=4, text_tokens=2, text_dim=8,
                text_params=500, vae_params=300, vae=VAE)  # fmt: skip
    return P.Setup(**{**args, **kw})


@pytest.fixture(scope="module")
def setups() -> dict[str, P.Setup]:
    return {name: P.load_setup(name) for name in ("S", "B")}


def test_training_components_by_hand():
    su = tiny_setup()
    # fp32: 22 D-wide tensors of 4 B (8 wide) + 20 B x 2 heads + 24 B = 768 B per token per block
    assert P.saved_bytes_per_token(8, 2, 4.0, bf16=False) == 22 * 4 * 8 + 40 + 24
    assert P.saved_bytes_per_token(8, 2, 4.0, bf16=True) == 54 * 8 + 40 + 24
    block = 10 * 768 + 4 * 2 * 8 * 4  # 10 tokens, plus the cross-attention keys/values of 2 text tokens
    r = P.training_peak(su, 10, bf16=False, adamw8bit=False, checkpointing=False)
    assert r["weights (fp32)"] == 4000 and r["EMA copy (fp32)"] == 4000 and r["optimizer state"] == 8000
    assert r["activations"] == 2 * block  # both blocks' activations at the start of backward
    assert r["gradients (fp32)"] == 4 * (1000 - 2 * 100)  # only the layers after the blocks have gradients yet
    assert r["inputs"] == 3 * 4 * 10 * 4 + 4 * 2 * 8  # x0, noise, x_t (4 values per token) and the text context
    assert r["backward working set"] == 10 * 8 * (2 * 4 * 4 + 8)
    assert r["total"] == pytest.approx(sum(v for k, v in r.items() if k != "total"))
    # checkpointing: the peak is when backward reaches the first block: all but one block's gradients exist,
    # only its input (10 x 8 fp32) is still held, plus its recomputed activations
    c = P.training_peak(su, 10, bf16=False, adamw8bit=True, checkpointing=True, ema=False)
    assert c["optimizer state"] == pytest.approx(2050) and c["EMA copy (fp32)"] == 0
    assert c["activations"] == 10 * 8 * 4 + block
    assert c["gradients (fp32)"] == 4 * (1000 - 2 * 100) + 4 * 100
    # AdamW on CUDA (foreach) makes one fp32 temporary per parameter in the step; with no tokens that is the peak
    s = P.training_peak(su, 0, bf16=False, adamw8bit=False, checkpointing=True, device="cuda")
    assert s["optimizer step temporaries"] == 4000 and s["gradients (fp32)"] == 4000


def test_sampling_components_by_hand():
    su = tiny_setup()
    assert P.infer_bytes_per_token(8, 4.0, bf16=True) == 38 * 8  # the RoPE step; the MLP needs (2 + 8) x 2
    assert P.infer_bytes_per_token(8, 4.0, bf16=False) == 44 * 8
    # 5 frames of 8x8: fits one tile (16 px) and one chunk (1 + 4 frames): the working set only,
    # 6.6 top-level tensors of 4 B x 8 channels / 2x2 patch = 8 B per pixel-frame
    d = P.decode_bytes(VAE, 5, 8, 8, 1, tiling=True)
    assert d == {"VAE decode working set": pytest.approx(6.6 * 8 * 5 * 64)}
    # 32x32 frames with tiling: one 16x16 tile x 5 frames, two tile outputs, the fp32 accumulator
    d = P.decode_bytes(VAE, 5, 32, 32, 1, tiling=True)
    out, piece = 12 * 5 * 32 * 32, 12 * 5 * 16 * 16
    assert d["decoded video (fp32)"] == out
    assert d["VAE decode working set"] == pytest.approx(max(6.6 * 8 * 5 * 256 + 2 * piece, out))
    untiled = P.decode_bytes(VAE, 5, 32, 32, 1, tiling=False)
    assert untiled == {"VAE decode working set": pytest.approx(6.6 * 8 * 5 * 1024)}
    r = P.sampling_peak(su, 16, 64, (5, 8, 8), bf16=True, offload=False, vae_tiling=True, cfg_two_calls=False)
    forward = 2 * 16 * 38 * 8 + 6 * 4 * 64  # cond + uncond batched; the sampler's latents
    assert r["total"] == pytest.approx(2 * 1000 + 4 * 500 + 4 * 300 + max(forward, 6.6 * 8 * 5 * 64))
    r = P.sampling_peak(su, 16, 64, (5, 8, 8), bf16=False, offload=True, vae_tiling=True, cfg_two_calls=True)
    assert r["total"] == pytest.approx(4 * 1000 + max(4 * 500, 16 * 44 * 8 + 6 * 4 * 64, 4 * 300 + 6.6 * 8 * 5 * 64))


def _saved_per_block(dit: VideoDiT, grid: tuple[int, int, int], bf16: bool) -> int:
    """Bytes autograd saves in one DiTBlock forward (parameters excluded), by saved_tensors_hooks."""
    params = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    T, H, W = grid
    D = dit.hidden_size
    x = torch.randn(1, T * H * W, D, requires_grad=True)
    mod = torch.randn(1, 6 * D, requires_grad=True)
    ctx, mask = torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.bool)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        dit.blocks[0](x, mod, dit.rope(T, H, W), grid, ctx, mask)
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [False, True])
def test_saved_activation_count_matches_autograd(bf16):
    torch.manual_seed(0)
    dit = VideoDiT(in_channels=4, hidden_size=96, depth=1, num_heads=4, text_dim=32).train()
    a, b = _saved_per_block(dit, (2, 8, 8), bf16), _saved_per_block(dit, (4, 8, 8), bf16)
    # the slope; less the fp32 RoPE cos/sin tables (2 x head_dim per token), shared by all blocks and counted
    # once per model in training_peak; weight copies do not grow with tokens
    per_token = (b - a) / 128 - 2 * 4 * 24
    assert per_token == pytest.approx(P.saved_bytes_per_token(96, 4, 4.0, bf16), rel=0.01)
    if bf16:  # autocast's bf16 copies of the block's linear weights (not kv's: the text needs no gradient)
        a32, b32 = _saved_per_block(dit, (2, 8, 8), False), _saved_per_block(dit, (4, 8, 8), False)
        intercept, intercept32 = 2 * a - b, 2 * a32 - b32  # token counts 128 and 256: the value at 0 tokens
        copies = sum(m.weight.numel() for m in dit.blocks[0].modules() if isinstance(m, torch.nn.Linear))
        copies -= dit.blocks[0].cross_attn.kv.weight.numel()
        b0 = dit.blocks[0]  # recompute: RecomputedLinear saves these float32 weights and casts them in backward
        copies -= sum(m.weight.numel() for m in (b0.attn.qkv, b0.mlp.fc1, b0.mlp.fc2))
        # within 10%: the text's keys/values (8 tokens, not token-dependent) also shrink under bf16, by ~5 kB
        assert intercept - intercept32 == pytest.approx(2 * copies, rel=0.1)


def test_switches_lower_memory(setups):
    su = setups["B"]
    n = 5000
    base = dict(bf16=False, adamw8bit=False, checkpointing=False)
    r0 = P.training_peak(su, n, **base)
    ck = P.training_peak(su, n, **{**base, "checkpointing": True})
    assert ck["activations"] < r0["activations"] / 5 and ck["total"] < r0["total"]
    eight = P.training_peak(su, n, **{**base, "adamw8bit": True})
    assert r0["optimizer state"] / eight["optimizer state"] == pytest.approx(8 / 2.05)
    bf = P.training_peak(su, n, **{**base, "bf16": True})
    assert bf["activations"] < 0.75 * r0["activations"]
    v = (16 * 31 * 60 * 106, (121, 480, 848))
    s0 = dict(bf16=False, offload=False, vae_tiling=False, cfg_two_calls=False)
    total = P.sampling_peak(su, 49290, *v, **s0)["total"]
    for switch in ("bf16", "offload", "vae_tiling", "cfg_two_calls"):
        assert P.sampling_peak(su, 49290, *v, **{**s0, "vae_tiling": True, switch: True})["total"] <= \
            P.sampling_peak(su, 49290, *v, **{**s0, "vae_tiling": True})["total"]  # fmt: skip
    assert P.sampling_peak(su, 49290, *v, **{**s0, "vae_tiling": True})["total"] < total
    assert P.sampling_peak(su, 49290, *v, **{**s0, "offload": True})["total"] < total
    one = P.sampling_peak(su, 49290, *v, **{**s0, "vae_tiling": True, "cfg_two_calls": True})
    two = P.sampling_peak(su, 49290, *v, **{**s0, "vae_tiling": True})
    assert two["DiT forward working set"] == 2 * one["DiT forward working set"]


@pytest.mark.parametrize("preset,ckpt,readme_mb", [("S", False, 1394), ("S", True, 801), ("B", False, 3198),
                                                   ("B", True, 2292)])  # fmt: skip
def test_calibration_reproduces_readme_training(setups, preset, ckpt, readme_mb):
    # docs/benchmarks.md calibration: bench train, 17x256x256 = 1280 tokens, batch 1, fp32, AdamW8bit, no EMA, CPU
    # peak RSS (checkpointing off: measured again with recompute, bench train --threads 1 --variants base)
    r = P.training_peak(setups[preset], 1280, bf16=False, adamw8bit=True, checkpointing=ckpt, ema=False, device="cpu")
    assert P.on_device(r["total"], "cpu") / P.MIB == pytest.approx(readme_mb, rel=0.15)


def test_calibration_reproduces_sample_bench(setups):
    bench = json.loads((P.CONFIGS.parent / "bench" / "sample-memory-B-cpu.json").read_text())["memory"]
    su = setups["B"]
    assert su.params * 2 / P.MIB == pytest.approx(bench["dit_weights_mb"], abs=1)
    assert su.text_params * 4 / P.MIB == pytest.approx(bench["text_encoder_mb"], abs=1)
    assert su.vae_params * 4 / P.MIB == pytest.approx(bench["vae_weights_mb"], abs=1)
    per_1k = 2 * 1000 * P.infer_bytes_per_token(768, 4.0, bf16=True) / P.MIB
    assert per_1k == pytest.approx(bench["dit_mb_per_1k_tokens"], rel=0.05)
    for offload, key in ((True, "peak_offload_mb"), (False, "peak_no_offload_mb")):
        r = P.sampling_peak(su, bench["tokens"], 16 * 31 * 60 * 106, (121, 480, 848), bf16=True, offload=offload,
                            vae_tiling=True, cfg_two_calls=False)  # fmt: skip
        assert r["total"] / P.MIB == pytest.approx(bench[key], rel=0.15)


def test_parameter_counts_match_readme():
    assert P.load_setup("B", text_dim=512).params / 1e6 == pytest.approx(113.2, abs=0.05)
    assert P.load_setup("S").params / 1e6 == pytest.approx(33.1, abs=0.05)
    from minisora.models.text import TextEncoder

    tiny = TextEncoder(model_name="tiny", width=64, layers=2, heads=2, context_length=8)
    assert sum(p.numel() for p in tiny.parameters()) == P.clip_text_params(64, 2, 8, projection=False)


def test_round_clip():
    assert P.round_clip(48, 480, 854, 4, 8, 2, 2) == (49, 480, 864)  # up, never down
    assert P.round_clip(17, 256, 256, 4, 8, 2, 2) == (17, 256, 256)  # already valid
    assert P.round_clip(48, 480, 854, 8, 32, 1, 1) == (49, 480, 864)
    assert P.round_clip(48, 480, 854, 1, 8, 2, 2) == (48, 480, 864)  # a per-frame VAE keeps every frame
    assert P.round_clip(1, 8, 8, 4, 8, 2, 2) == (1, 16, 16)


def test_cli_names_the_fitting_switches(capsys):
    args = ["plan", "--preset", "B", "--frames", "48", "--height", "480", "--width", "854"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rounded up to 49x480x864" in out and "21,060 tokens" in out
    assert "Training: fits 24 GiB with bf16 (" in out and "Sampling: fits 24 GiB with bf16 (" in out
    assert main(args + ["--budget-gb", "6"]) == 0
    out = capsys.readouterr().out
    assert "Training: fits 6 GiB with bf16, checkpointing" in out
    assert "Sampling: fits 6 GiB with bf16, VAE tiling" in out
    assert main(args + ["--budget-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert "Training: does not fit 1 GiB even with all switches" in out and "reduce frames/size/batch" in out
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 21060 and res["rounded"] == [49, 480, 864]
    assert res["training"]["cheapest"]["switches"] == {"bf16": True, "adamw8bit": False, "checkpointing": False}


@pytest.mark.parametrize("argv,message", [
    (["--preset", "XL"], "unknown preset 'XL'; available: B, L, S, tiny"),
    (["--frames", "0"], "--frames must be positive, got 0"),
    (["--width", "-8"], "--width must be positive, got -8"),
    (["--budget-gb", "0"], "--budget-gb must be positive, got 0.0"),
    (["--tokens", "--fps", "0"], "--fps must be positive, got 0.0"),
    (["--vae", "missing.yaml"], "--vae missing.yaml: file not found"),
    (["--config", "configs/shapes.yaml"], "--config go with --hours"),
    (["trainer.max_steps=10"], "key=value go with --hours"),
    (["--hours", "--tokens"], "give one of --tokens, --hours, --released-table and --pretrained"),
    (["--hours", "--videos", "0"], "--videos must be positive, got 0"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"minisora plan: error: {message}")


def test_token_table_by_hand(capsys):
    rows = {(r["seconds"], r["setting"].split(" ")[0]): r for r in R.token_table()}
    std = rows[(5, "vae/standard.yaml")]  # 120 frames -> 121 = 1 + 4*30; 854 px -> 864 = 16*54
    assert (std["frames"], std["grid"], std["tokens"]) == (121, [31, 30, 54], 31 * 30 * 54)
    assert std["full_attention"] == 1.0
    assert std["factorized_attention"] == pytest.approx(50220 * (30 * 54 + 31) / 2 / 50220**2)
    deep = rows[(5, "vae/deep.yaml")]  # 121 = 1 + 8*15 -> 16 latent frames of 15x27
    assert deep["tokens"] == 16 * 15 * 27 and deep["full_attention"] == pytest.approx((6480 / 50220) ** 2)
    latte = rows[(5, "per-frame")]  # every frame: 120 x 30 x 54
    assert latte["tokens"] == 194400 and latte["full_attention"] == pytest.approx((194400 / 50220) ** 2)
    assert main(["plan", "--tokens"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| clip |") and "| 50,220 | 1.00x |" in out and out.count("\n") == 13


def test_constants_match_the_code():
    from minisora.pipeline import DECODE_PIXELS

    assert P.DECODE_PIXELS == DECODE_PIXELS


def test_token_settings_match_the_configs():
    from minisora.config import load_config

    for name, kt, s, _ in R.TOKEN_SETTINGS[:2]:
        vae = load_config(P.CONFIGS / name.split(" ")[0]).vae
        assert (vae.temporal_compression, vae.spatial_compression) == (kt, s)


LIVE_STEP = """
import ctypes, gc, json, sys, torch
from minisora import diffusion
from minisora.bench.report import reset_peak_rss, rss_mb
from minisora.models.dit import VideoDiT
from minisora.training.optim import build_optimizer
torch.set_num_threads(1)

def steps(args, latent, n):
    torch.manual_seed(0)
    model = VideoDiT(**args).train()
    opt = build_optimizer(list(model.parameters()), "adamw8bit", lr=1e-4, weight_decay=0.0, betas=[0.9, 0.99])
    x0, ctx = torch.randn(1, 16, *latent), torch.randn(1, 77, 768)
    for _ in range(n):
        loss = diffusion.flow_loss(model, x0, diffusion.sample_t(1), torch.randn_like(x0), context=ctx,
                                   context_mask=torch.ones(1, 77, dtype=torch.bool)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

args = dict(in_channels=16, text_dim=768, hidden_size=384, depth=12, num_heads=6, grad_checkpointing=sys.argv[1] == "1")
steps({**args, "hidden_size": 64, "depth": 2, "num_heads": 2}, (2, 4, 4), 2)  # library set-up, not counted
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
before = rss_mb("VmRSS")
reset_peak_rss()
steps(args, (5, 32, 32), 3)
print(json.dumps({"peak_mb": rss_mb("VmHWM") - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True])
def test_live_training_peak(setups, ckpt):
    """The live-tensor peak of preset S's training step (bench train's step; freed tensors leave RSS)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", LIVE_STEP, "1" if ckpt else "0"], capture_output=True, text=True,
                       env=env, check=True)  # fmt: skip
    measured = json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
    predicted = P.training_peak(setups["S"], 1280, bf16=False, adamw8bit=True, checkpointing=ckpt, ema=False,
                                device="cpu")["total"] / P.MIB  # fmt: skip
    assert predicted == pytest.approx(measured, rel=0.1), f"measured {measured:.0f} MiB, predicted {predicted:.0f}"


def test_lora_plan_counts_the_adapters_and_trains_only_them():
    from minisora.config import kwargs, load_config
    from minisora.models.dit import VideoDiT
    from minisora.models.lora import add_lora

    full = P.load_setup("S")
    su = P.load_setup("S", lora_rank=8, lora_targets=["self_attn", "mlp"])
    args = {**kwargs(load_config(P.CONFIGS / "model/S.yaml").model), "in_channels": su.latent_channels,
            "text_dim": su.text_dim, "condition": "text"}  # fmt: skip
    real = add_lora(VideoDiT(**args), 8, 8, 0.0, ["self_attn", "mlp"])
    assert su.lora_params == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert su.lora_block_params * su.depth == su.lora_params
    lora = P.training_peak(su, 1000, bf16=True, adamw8bit=False, checkpointing=True)
    dense = P.training_peak(full, 1000, bf16=True, adamw8bit=False, checkpointing=True)
    assert lora["optimizer state"] == 8 * su.lora_params  # the frozen base has no optimizer state
    assert lora["weights (fp32)"] == 4 * (full.params + su.lora_params)
    assert lora["total"] < dense["total"] - 8 * full.params


def test_issue_figure_lora_b_with_checkpointing_and_bf16_fits_12_gib_at_16x256x256():
    res = P.plan("B", 16, 256, 256, budget_gb=12, lora_rank=16)
    row = next(r for r in res["training"]["rows"] if r["switches"] == {"bf16": True, "adamw8bit": True, "checkpointing": True})
    assert row["fits"] and row["on_device"] < 3 * P.GIB


def test_recipe_hours_add_up_and_follow_the_recipe():
    from minisora.bench.flops import dit_train_step_flops, gpu_hours, gpu_peak_flops, recipe_flops
    from minisora.checkpoint import dit_args
    from minisora.config import load_config, to_plain

    cfg = load_config(P.CONFIGS / "shapes.yaml", ["trainer.max_steps=10", "vae_trainer.max_steps=5"])
    stages, per_clip = recipe_flops(cfg, videos=100, eval_samples=8)
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"))
    dit = VideoDiT(**dit_args(to_plain(cfg), cfg.vae.latent_channels, None))
    step = dit_train_step_flops(dit, 5, 8, 8, batch=cfg.latents.dit_batch_size, include_recompute=False)
    assert stages["DiT training"] == 10 * step  # 17x32x32 clips -> 5x8x8 latents
    assert stages["latent cache"] == pytest.approx(100 * per_clip["vae_encode"] * 1e9)
    clip_gflop = per_clip["vae_encode"] + per_clip["vae_decode"]
    assert stages["VAE training"] == pytest.approx(cfg.data.vae_batch_size * 5 * 3 * clip_gflop * 1e9)
    gpu = "NVIDIA GeForce RTX 4090"
    assert gpu_hours(3.6e15, gpu, 0.5) == pytest.approx(3.6e15 / (gpu_peak_flops(gpu) * 0.5) / 3600)
    with pytest.raises(ValueError, match="no bf16 peak known"):
        gpu_hours(1e15, "NVIDIA GeForce GTX 970", 0.35)


def test_hours_command_prints_the_table_and_json(capsys):
    shapes = str(P.CONFIGS / "shapes.yaml")
    assert main(["plan", "--hours", "--config", shapes, "trainer.max_steps=10", "--videos", "100"]) == 0
    text = capsys.readouterr().out
    assert "| total |" in text and "| RTX 4090 h at MFU 20% / 35% / 50% | RTX 3090 h at 35% |" in text
    assert "not measured" in text
    assert main(["plan", "--hours", "--config", shapes, "trainer.max_steps=10", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    total = res["stages"]["total"]
    assert res["mfu_assumed"] == [0.2, 0.35, 0.5] and len(total["hours"]["NVIDIA GeForce RTX 4090"]) == 3
    h20, h35, h50 = total["hours"]["NVIDIA GeForce RTX 4090"]
    assert h20 == pytest.approx(h35 * 35 / 20) and h50 == pytest.approx(h35 * 35 / 50)  # hours scale as 1 / MFU
