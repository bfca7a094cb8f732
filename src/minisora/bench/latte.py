"""VideoDiT's training step against Latte's own model at the same configuration: step time and peak RSS growth.

    minisora bench latte --latte-dir /work/latte                 # Latte-S/2: minutes per round on 2 CPU cores
    minisora bench latte --latte-dir /work/latte --rounds 3 --steps 3 --threads 1 --latte-attention flash math
    minisora bench latte --latte-dir DIR --quick                  # a toy size: a smoke run (the test suite's)

Latte is imported from a local copy of maxin-cn/Latte that you provide (its `models/latte.py`; nothing of it is
vendored here): `git clone https://github.com/maxin-cn/Latte DIR`. Both models are built from the same
arguments, Latte-S/2's by default: class-conditional, hidden 384, 12 blocks alternating spatial and temporal
attention, 6 heads, patch 2 (1x2x2 for VideoDiT), 4x16x32x32 latents (4096 tokens), batch 2, float32, AdamW.
VideoDiT is built with its own defaults otherwise (QK-norm, 3D RoPE, its default recompute setting); Latte
with its own (learned sigma, sin-cos position tables, `attention_mode` from --latte-attention: "flash" is its
scaled_dot_product_attention path, "math" its explicit softmax).

One step: noise the latents at a random t, forward, MSE to the model's target (VideoDiT: rectified-flow
velocity through diffusion.flow_loss; Latte: epsilon on its first 4 output channels, as its learned-sigma
loss does), backward, AdamW step. Every (model, round) runs in a fresh subprocess, and the models alternate
(the order flips each round), so both see the same machine state. A subprocess primes the libraries on a
tiny model of its kind, returns freed heap to the OS, then measures from just before building the model:
peak RSS growth is VmHWM at the end minus RSS then (weights, gradients, AdamW state and activations; the
allocator's retained heap counts too, as a user's OOM does). Step time: wall and process CPU seconds per
step after `--warmup` steps; the report gives the median over all measured steps and the spread of the
per-round medians. On a shared machine the CPU seconds are the steadier figure.

glibc's malloc keeps freed memory, so RSS growth is 1.8-2x the live tensor bytes and moves with allocation
order (docs/benchmarks.md, planner calibration). `--mmap-threshold 65536` runs both models' subprocesses with
MALLOC_MMAP_THRESHOLD_=65536, so freed tensors leave RSS and the growth is the live peak: what decides the
longest clip on a GPU, whose caching allocator reuses freed blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minisora.bench.report import reset_peak_rss, rss_mb, run_and_report

# Latte-S/2 (Latte's paper, Table 1 / models/latte.py Latte_S_2) on 16 frames of 32x32x4 SD-VAE latents.
LATTE_S2 = dict(hidden_size=384, depth=12, num_heads=6, patch=2, channels=4, frames=16, size=32, batch=2,
                num_classes=101)  # fmt: skip  # UCF-101's classes: Latte's class-conditional setting
QUICK = dict(hidden_size=48, depth=2, num_heads=2, patch=2, channels=4, frames=4, size=8, batch=2, num_classes=5)


def build(kind: str, cfg: dict, latte_dir: str | None, attention: str, checkpointing: bool = False,
          recompute: bool = True) -> torch.nn.Module:  # fmt: skip
    """VideoDiT or Latte from the same configuration dict (checkpointing, recompute: VideoDiT's switches)."""
    if kind == "minisora":
        from minisora.models.dit import VideoDiT

        return VideoDiT(in_channels=cfg["channels"], patch_size=[1, cfg["patch"], cfg["patch"]],
                        hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                        layout="factorized", condition="class", num_classes=cfg["num_classes"],
                        grad_checkpointing=checkpointing, recompute=recompute)  # fmt: skip
    latte_file = Path(latte_dir or "") / "models" / "latte.py"
    if not latte_file.is_file():
        raise FileNotFoundError(f"--latte-dir: {latte_file} not found; clone https://github.com/maxin-cn/Latte there")
    sys.path.insert(0, str(Path(latte_dir).resolve()))
    from models.latte import Latte  # noqa: the user's copy of Latte

    return Latte(input_size=cfg["size"], patch_size=cfg["patch"], in_channels=cfg["channels"],
                 hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=cfg["num_heads"],
                 num_frames=cfg["frames"], num_classes=cfg["num_classes"], extras=2, attention_mode=attention)  # fmt: skip


def step_fn(kind: str, model: torch.nn.Module, cfg: dict):
    """One training step's forward and loss: a callable (generator) -> scalar loss."""
    from minisora import diffusion

    B, C, T, S = cfg["batch"], cfg["channels"], cfg["frames"], cfg["size"]
    x0 = torch.randn(B, C, T, S, S)  # (B, C, T, H, W): minisora's layout
    labels = torch.arange(B) % cfg["num_classes"]

    def minisora_loss(gen: torch.Generator) -> torch.Tensor:
        t, noise = torch.rand(B, generator=gen), torch.randn(x0.shape, generator=gen)
        return diffusion.flow_loss(model, x0, t, noise, labels=labels).mean()

    def latte_loss(gen: torch.Generator) -> torch.Tensor:
        x = x0.transpose(1, 2)  # (B, T, C, H, W): Latte's layout
        t, noise = torch.randint(0, 1000, (B,), generator=gen), torch.randn(x.shape, generator=gen)
        a = (1 - t.float() / 1000)[:, None, None, None, None]  # any noising costs the same; the model is measured
        out = model(a.sqrt() * x + (1 - a).sqrt() * noise, t, y=labels)  # (B, T, 2C, H, W)
        return (out[:, :, :C] - noise).square().mean()

    return minisora_loss if kind == "minisora" else latte_loss


def matmul_floor(cfg: dict, threads: int) -> dict:
    """Seconds per step that the step's matrix products alone need at this machine's measured fp32 GEMM rate.

    Both models run the same products (q, k, v, out, the MLP, per token and block, and the attention), which are
    almost all of the step's FLOPs: no reshaping or saving less can make a step faster than this in float32.
    """
    from minisora.bench.flops import dit_train_step_flops

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    model = build("minisora", cfg, None, "math")
    flops = dit_train_step_flops(model, cfg["frames"], cfg["size"], cfg["size"], batch=cfg["batch"])
    rows, D = cfg["batch"] * cfg["frames"] * (cfg["size"] // cfg["patch"]) ** 2, cfg["hidden_size"]
    a, w = torch.randn(rows, D), torch.randn(4 * D, D)  # the MLP's first product, (tokens, D) x (D, 4D)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        a @ w.T
        times.append(time.perf_counter() - t0)
    gflops = 2 * rows * D * 4 * D / statistics.median(times[1:]) / 1e9
    torch.set_num_threads(old)
    return {"flops": flops, "gflops": gflops, "seconds": flops / gflops / 1e9, "threads": threads or old}


def child(args: argparse.Namespace) -> dict:
    """In a fresh process: prime, then build one model and time `warmup + steps` steps; peak RSS growth."""
    import ctypes
    import gc

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else LATTE_S2
    # A tiny model of the same kind absorbs one-time library set-up before the baseline: oneDNN, allocator arenas,
    # and torch._dynamo, which the first optimizer imports (175 MB; timm, which Latte imports, loads it anyway).
    prime = build(args._child, QUICK, args.latte_dir, args.attention)
    prime_opt = torch.optim.AdamW(prime.parameters(), lr=1e-4)
    step_fn(args._child, prime, QUICK)(torch.Generator().manual_seed(0)).backward()
    prime_opt.step()
    del prime, prime_opt
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_mb("VmRSS")
    reset_peak_rss()
    torch.manual_seed(0)
    model = build(args._child, cfg, args.latte_dir, args.attention, args.checkpointing, args.recompute).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn, gen = step_fn(args._child, model, cfg), torch.Generator().manual_seed(0)
    wall, cpu = [], []
    for i in range(args.warmup + args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    peak = rss_mb("VmHWM")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": args._child, "params": params, "wall_s": wall, "cpu_s": cpu, "rss_before_mb": before,
            "growth_mb": peak - before, "threads": torch.get_num_threads()}  # fmt: skip


def run_child(kind: str, attention: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", "minisora.bench.latte", "--_child", kind, "--attention", attention,
               "--latte-dir", str(args.latte_dir), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--json", str(out)] + (["--quick"] if args.quick else []) + (
               ["--checkpointing"] if args.checkpointing else []) + ([] if args.recompute else ["--no-recompute"])  # fmt: skip
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else None
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        return json.loads(out.read_text())


def summarise(rows: list[dict]) -> dict:
    per_round = [statistics.median(r["cpu_s"]) for r in rows]
    return {"params": rows[0]["params"], "threads": rows[0]["threads"],
            "wall_s_median": statistics.median([s for r in rows for s in r["wall_s"]]),
            "cpu_s_median": statistics.median([s for r in rows for s in r["cpu_s"]]),
            "cpu_s_round_medians": per_round,
            "growth_mb_median": statistics.median([r["growth_mb"] for r in rows]),
            "growth_mb_rounds": [r["growth_mb"] for r in rows], "rounds": rows}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    kinds = [("minisora", "-")] + [("latte", a) for a in args.latte_attention]
    rows: dict[str, list[dict]] = {f"{k}:{a}" if k == "latte" else k: [] for k, a in kinds}
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]  # alternate who goes first
        for kind, attention in order:
            key = f"{kind}:{attention}" if kind == "latte" else kind
            rows[key].append(run_child(kind, attention if kind == "latte" else "math", args))
            print(f"round {r + 1}/{args.rounds} {key}: {statistics.median(rows[key][-1]['cpu_s']):.2f} s CPU/step, "
                  f"{rows[key][-1]['growth_mb']:.0f} MB growth", file=sys.stderr, flush=True)  # fmt: skip
    results = {key: summarise(v) for key, v in rows.items()}
    mine = results["minisora"]
    ratios = {key: {"speedup_cpu": res["cpu_s_median"] / mine["cpu_s_median"],
                    "speedup_wall": res["wall_s_median"] / mine["wall_s_median"],
                    "memory_ratio": mine["growth_mb_median"] / res["growth_mb_median"]}
              for key, res in results.items() if key != "minisora"}  # fmt: skip
    return {"config": QUICK if args.quick else LATTE_S2, "rounds": args.rounds, "steps": args.steps,
            "mmap_threshold": args.mmap_threshold, "checkpointing": args.checkpointing, "recompute": args.recompute,
            "matmul_floor": matmul_floor(QUICK if args.quick else LATTE_S2, args.threads),
            "warmup": args.warmup, "results": results, "vs_latte": ratios,
            "targets": {key: {"speedup_1.5x": r["speedup_cpu"] >= 1.5, "memory_0.5x": r["memory_ratio"] <= 0.5}
                        for key, r in ratios.items()}}  # fmt: skip


def format_results(r: dict) -> str:
    c = r["config"]
    lines = [f"Latte-S/2 setting: hidden {c['hidden_size']}, {c['depth']} blocks, {c['num_heads']} heads, patch "
             f"{c['patch']}, latents {c['channels']}x{c['frames']}x{c['size']}x{c['size']}, batch {c['batch']}; "
             f"{r['rounds']} rounds x {r['steps']} steps (after {r['warmup']} warm-up); malloc: "
             f"{'MALLOC_MMAP_THRESHOLD_=' + str(r['mmap_threshold']) + ' (live peak)' if r['mmap_threshold'] else 'glibc default'}",
             "",
             "| model | params | CPU s/step (median) | per-round medians | wall s/step | peak RSS growth MB (rounds) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key, res in r["results"].items():
        lines.append(f"| {key} | {res['params'] / 1e6:.1f} M | {res['cpu_s_median']:.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in res['cpu_s_round_medians'])} | {res['wall_s_median']:.2f} | "
                     f"{res['growth_mb_median']:.0f} ({', '.join(f'{g:.0f}' for g in res['growth_mb_rounds'])}) |")  # fmt: skip
    lines.append("")
    f = r.get("matmul_floor")
    if f:
        lines.append(f"matmul floor: the step's {f['flops'] / 1e12:.3f} TFLOP of matrix products (bench/flops.py) at this "
                     f"machine's fp32 GEMM rate ({f['gflops']:.0f} GFLOP/s on {f['threads']} thread(s), the step's "
                     f"largest product) take {f['seconds']:.2f} s/step")  # fmt: skip
    if r.get("checkpointing"):
        lines.append("minisora ran with grad_checkpointing (each block's activations recomputed in backward)")
    if r.get("recompute") is False:
        lines.append("minisora ran with recompute=False (norms, modulation, QK-norm and RoPE saved, not redone)")
    for key, q in r["vs_latte"].items():
        t = r["targets"][key]
        lines.append(f"vs {key}: {q['speedup_cpu']:.2f}x faster (CPU s; wall {q['speedup_wall']:.2f}x) "
                     f"[target 1.5x: {'met' if t['speedup_1.5x'] else 'NOT met'}], {q['memory_ratio']:.2f}x its "
                     f"peak RSS growth [target 0.5x: {'met' if t['memory_0.5x'] else 'NOT met'}]")  # fmt: skip
        if f:
            need = r["results"][key]["cpu_s_median"] / 1.5
            lines.append(f"  1.5x faster than {key} means {need:.2f} s/step: {need / f['seconds']:.2f}x the matmul floor")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minisora bench latte", description=__doc__.split("\n")[0])
    p.add_argument("--latte-dir", required=True, help="a local copy of github.com/maxin-cn/Latte (models/latte.py)")
    p.add_argument("--rounds", type=int, default=3, help="fresh-subprocess runs of each model, alternating")
    p.add_argument("--steps", type=int, default=3, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=1, help="steps per run before measuring")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    p.add_argument("--latte-attention", nargs="+", default=["flash"], choices=["flash", "math"],
                   help="Latte's attention_mode(s) to compare against: flash = its SDPA path")  # fmt: skip
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="MALLOC_MMAP_THRESHOLD_ for both models' runs (65536: RSS growth = live peak); 0: glibc default")
    p.add_argument("--checkpointing", action="store_true", help="VideoDiT with grad_checkpointing: memory for time")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="VideoDiT's recompute (its default, on): redo norms and modulation in backward instead of saving")
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke run in seconds")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_child", choices=["minisora", "latte"], help=argparse.SUPPRESS)
    p.add_argument("--attention", default="flash", help=argparse.SUPPRESS)  # the child's Latte attention_mode
    args = p.parse_args(argv)
    if args._child:
        result = child(args)
        Path(args.json).write_text(json.dumps(result))
        return 0
    return run_and_report(p, run, format_results, argv)


if __name__ == "__main__":
    sys.exit(main())
