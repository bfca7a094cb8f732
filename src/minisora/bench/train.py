"""DiT training cost: step time, throughput, FLOPs/MFU and peak memory per preset, clip size and switch.

    minisora bench train [--presets S B] [--clips 17x256x256 ...] [--batch 1] [--reps 5]
        [--precision auto] [--optimizer adamw8bit] [--variants base grad_ckpt optimizer precision factorized
        compile] [--threads N] [--quick] [--json OUT]

One step is what LitVideoDiT does per batch: rectified-flow loss on random latents of the stated clip size
(through a 4x temporal / 8x spatial / 16-channel autoencoder: 17x256x256 -> 16x5x32x32 -> 1280 tokens with
patch 1x2x2) and a CLIP ViT-L/14-sized text context (77 x 768), backward, optimizer step (AdamW8bit unless
--optimizer adamw). Warm-up steps are excluded; the median of --reps steps is reported, with the process's
CPU seconds per step beside the wall time (on a shared machine the CPU time is the steadier figure). Peak
memory is max_memory_allocated on CUDA; on CPU it is the peak resident set size sampled during the steps
minus the size before the model was built, so it counts weights, gradients, optimizer state and
activations (checked against ru_maxrss in a fresh process: 604 vs 677 MB, the difference being one-time
library set-up, which a priming step now absorbs). Also reported: optimizer state bytes per parameter for
AdamW8bit and AdamW, counted over the distinct tensors in optimizer.state after one step; analytic model
FLOPs per step (bench/flops.py), TFLOP/s achieved, and MFU against the GPU's dense bf16 peak (bf16 runs on a
known GPU; "-" elsewhere). Variants change one switch from the baseline: gradient checkpointing, the other
optimizer, the other precision, the factorized attention layout, torch.compile.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import psutil
import torch

from minisora import diffusion
from minisora.bench.flops import dit_train_step_flops, mfu, peak_flops
from minisora.bench.report import CONFIGS, model_preset, parse_size, write_json
from minisora.device import default_device, default_dtype
from minisora.models.dit import VideoDiT
from minisora.training.optim import build_optimizer

# The autoencoder the latent sizes assume (configs/experiments/t2v256.yaml): 4x time, 8x space, 16 channels.
LATENT_CHANNELS, TEMPORAL, SPATIAL = 16, 4, 8
# CLIP ViT-L/14 text tower (t2v256): 77 tokens of width 768.
CONTEXT_LENGTH, TEXT_DIM = 77, 768


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(C, t, h, w) of a frames x height x width clip through the causal autoencoder."""
    if (frames - 1) % TEMPORAL or height % SPATIAL or width % SPATIAL:
        raise ValueError(
            f"clip {frames}x{height}x{width}: need frames = 1 + {TEMPORAL}k and height, width multiples of {SPATIAL}"
        )
    return LATENT_CHANNELS, 1 + (frames - 1) // TEMPORAL, height // SPATIAL, width // SPATIAL


def preset(name: str, configs: str | Path = CONFIGS) -> dict:
    """VideoDiT's arguments for configs/model/<name>.yaml on the latents and text context assumed here."""
    return {**model_preset(name, configs), "in_channels": LATENT_CHANNELS, "text_dim": TEXT_DIM, "condition": "text"}


def _trim() -> None:
    """Return freed heap memory to the OS (glibc), so the next RSS baseline starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakRSS:
    """Samples this process's resident set size every `interval` s in a thread; .peak is the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(
    model_args: dict,
    latent: tuple[int, int, int, int],
    batch: int,
    *,
    grad_checkpointing: bool,
    device: torch.device,
    precision: str,
    reps: int,
    warmup: int,
    optimizer: str = "adamw8bit",
    context_length: int = CONTEXT_LENGTH,
    compile: bool = False,
) -> dict:
    """Median time of a training step (forward + backward + optimizer step) and the peak memory it needs."""
    _trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = psutil.Process().memory_info().rss
    torch.manual_seed(0)
    model = VideoDiT(**{**model_args, "grad_checkpointing": grad_checkpointing}).to(device).train()
    opt = build_optimizer(list(model.parameters()), optimizer, lr=1e-4, weight_decay=0.0, betas=[0.9, 0.99])
    net = torch.compile(model) if compile else model
    if compile:  # the first calls compile, and recompile once when dynamo marks a changed input dynamic
        warmup = max(warmup, 3)
    C, t, h, w = latent
    x0 = torch.randn(batch, C, t, h, w, device=device)  # (B, C, t, h, w)
    context = torch.randn(batch, context_length, model_args["text_dim"], device=device)  # (B, L, D)
    mask = torch.ones(batch, context_length, dtype=torch.bool, device=device)  # (B, L)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    fwd_bwd, opt_step, total, cpu = [], [], [], []
    with PeakRSS() as rss:
        for i in range(warmup + reps):
            tt = diffusion.sample_t(batch, device=device)  # (B,)
            noise = torch.randn_like(x0)
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            with autocast:
                loss = diffusion.flow_loss(net, x0, tt, noise, context=context, context_mask=mask).mean()
            loss.backward()
            _sync(device)
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t2, c2 = time.perf_counter(), time.process_time()
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark step")
            if i >= warmup:
                fwd_bwd.append(t1 - t0)
                opt_step.append(t2 - t1)
                total.append(t2 - t0)
                cpu.append(c2 - c0)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, kind = rss.peak - rss0, "peak RSS minus RSS before the model"
    result = {
        "grad_checkpointing": grad_checkpointing,
        "step_s": statistics.median(total),
        "fwd_bwd_s": statistics.median(fwd_bwd),
        "optimizer_s": statistics.median(opt_step),
        "steps_s": total,
        # CPU seconds of this process per step: on a shared machine, with one thread, close to what the
        # wall time would be on an idle one (the wall time also counts time waiting for a core).
        "cpu_s": statistics.median(cpu),
        "peak_mem_mb": peak / 2**20,
        "mem_kind": kind,
    }
    del model, net, opt, x0, context, loss
    _trim()
    return result


def optimizer_state_bytes_per_param(model_args: dict, name: str) -> float:
    """Bytes of every tensor in optimizer.state after one step, divided by the number of parameters."""
    torch.manual_seed(0)
    model = VideoDiT(**model_args)
    params = list(model.parameters())
    opt = build_optimizer(params, name, lr=1e-4, weight_decay=0.0, betas=[0.9, 0.99])
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    seen: set[int] = set()  # bitsandbytes shares its quantisation maps between parameters: count once
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def variants(precision: str, optimizer: str, names: list[str]) -> list[tuple[str, dict]]:
    """The baseline and one-switch-at-a-time changes from it: (name, measure_step keyword overrides)."""
    other_precision = "fp32" if precision == "bf16" else "bf16"
    other_optimizer = "adamw" if optimizer == "adamw8bit" else "adamw8bit"
    table = {
        "base": {},
        "grad_ckpt": {"grad_checkpointing": True},
        other_optimizer: {"optimizer": other_optimizer},
        other_precision: {"precision": other_precision},
        "factorized": {"layout": "factorized"},
        "compile": {"compile": True},
    }
    unknown = [n for n in names if n not in table and n not in ("optimizer", "precision")]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from base, grad_ckpt, optimizer, precision, "
                         "factorized, compile")  # fmt: skip
    aliases = {"optimizer": other_optimizer, "precision": other_precision}
    return [(aliases.get(n, n), table[aliases.get(n, n)]) for n in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked; --quick applied; `device`, `precision`, `context_length`, `todo`, `clips` and
    `latents` resolved."""
    parser = argparse.ArgumentParser(prog="minisora bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["S", "B"], help="model presets (configs/model/*.yaml)")
    parser.add_argument("--clips", nargs="+", default=["17x256x256"], help="clip sizes FRAMESxHEIGHTxWIDTH")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per setting (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on a GPU that supports it, else fp32")  # fmt: skip
    parser.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit", help="of the baseline")
    parser.add_argument("--variants", nargs="+", default=["base", "grad_ckpt", "optimizer", "precision", "factorized",
                                                          "compile"],
                        help="baseline and one-switch changes: base grad_ckpt optimizer precision factorized compile")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    # On a loaded machine use 1: two OpenMP threads sharing busy cores made a 0.2 M-parameter AdamW step 140x
    # slower here (262 vs 1.9 ms, load average 5.3 on 2 cores).
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--configs", default=str(CONFIGS), help="folder holding model/<preset>.yaml")
    parser.add_argument("--quick", action="store_true",
                        help="preset tiny at 5x32x32, 1 rep, no compile (what the tests and `bench all --quick` run)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.clips, args.reps, args.warmup = ["tiny"], ["5x32x32"], 1, 1
        args.variants = [v for v in args.variants if v != "compile"]  # inductor's first compile takes minutes on CPU
    if args.reps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 0:
        parser.error("need --reps >= 1, --warmup >= 0, --batch >= 1, --threads >= 0")
    args.device = torch.device(default_device() if args.device == "auto" else args.device)
    if args.precision == "auto":
        args.precision = default_dtype(args.device)
    args.context_length = 8 if args.quick else CONTEXT_LENGTH
    try:
        args.todo = variants(args.precision, args.optimizer, args.variants)
        args.clips = [parse_size(c) for c in args.clips]
        args.latents = [latent_shape(*c) for c in args.clips]
        for name in args.presets:
            model_preset(name, args.configs)
    except ValueError as e:
        parser.error(str(e))
    return args


def measure_variant(args: argparse.Namespace, name: str, clip: tuple, latent: tuple, variant: str,
                    change: dict) -> dict:  # fmt: skip
    """One row: a preset at a clip size with one switch changed, timed and counted."""
    base_args = preset(name, args.configs)
    model_args = {**base_args, "layout": change.get("layout", base_args.get("layout", "full"))}
    probe = VideoDiT(**model_args)
    params, tokens = probe.num_parameters(), probe.tokens(*latent[1:])
    # Model FLOPs: forward + backward = 3 x forward; checkpointing's recompute not counted (PaLM's MFU).
    step_flops = dit_train_step_flops(probe, *latent[1:], batch=args.batch, context_len=args.context_length)
    del probe
    settings = {"grad_checkpointing": False, "precision": args.precision, "optimizer": args.optimizer,
                "compile": False, **{k: v for k, v in change.items() if k != "layout"}}  # fmt: skip
    r = measure_step(model_args, latent, args.batch, device=args.device, reps=args.reps, warmup=args.warmup,
                     context_length=args.context_length, **settings)  # fmt: skip
    peak = peak_flops(args.device)  # dense bf16 FLOP/s; None on CPU and unknown GPUs
    r.update(
        preset=name, variant=variant, clip=list(clip), params=params, tokens=tokens, layout=model_args["layout"],
        precision=settings["precision"], optimizer=settings["optimizer"], compile=settings["compile"],
        clips_per_s=args.batch / r["step_s"], tokens_per_s=args.batch * tokens / r["step_s"],
        flops_per_step=step_flops, tflops_per_s=step_flops / r["step_s"] / 1e12,
        mfu=mfu(step_flops, r["step_s"], peak if settings["precision"] == "bf16" else None),
    )  # fmt: skip
    print(f"{name} {'x'.join(map(str, clip))} {variant}: {r['step_s']:.3f} s/step, peak {r['peak_mem_mb']:.0f} MB",
          flush=True)  # fmt: skip
    return r


def optimizer_states(name: str, configs: str) -> dict:
    base_args = preset(name, configs)
    return {"preset": name, "params": VideoDiT(**base_args).num_parameters(),
            "adamw8bit_bytes_per_param": optimizer_state_bytes_per_param(base_args, "adamw8bit"),
            "adamw_bytes_per_param": optimizer_state_bytes_per_param(base_args, "adamw")}  # fmt: skip


def print_results(args: argparse.Namespace, results: dict) -> None:
    print(f"\nbatch {args.batch}, text context {args.context_length}x{TEXT_DIM}, baseline {args.precision} "
          f"{args.optimizer}, {args.device} ({torch.get_num_threads()} threads), median of {args.reps} steps after "
          f"{args.warmup} warm-up")  # fmt: skip
    print(table(results["runs"]))
    print()
    print(_table([[s["preset"], f"{s['adamw8bit_bytes_per_param']:.2f}", f"{s['adamw_bytes_per_param']:.2f}"]
                  for s in results["optimizer_state"]],
                 ["preset", "AdamW8bit state B/param", "AdamW state B/param"]))  # fmt: skip
    load_before, load_after = results["loadavg_before"], results["loadavg_after"]
    print(f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # One untimed step of the tiny preset first: library and allocator set-up would otherwise land in the
    # first setting's memory (measured: 71 MB for the first tiny run, 9 MB for the second).
    measure_step(preset("tiny", args.configs), (LATENT_CHANNELS, 1, 2, 2), 1, grad_checkpointing=False,
                 device=args.device, precision=args.precision, reps=1, warmup=0, context_length=4)  # fmt: skip
    load_before = os.getloadavg()
    runs = [measure_variant(args, name, clip, latent, variant, change) for name in args.presets
            for clip, latent in zip(args.clips, args.latents) for variant, change in args.todo]  # fmt: skip
    states = [optimizer_states(name, args.configs) for name in args.presets]
    device = args.device
    results = {
        "clips": [list(c) for c in args.clips],
        "latents": [list(lat) for lat in args.latents],
        "context": [args.context_length, TEXT_DIM],
        "batch": args.batch,
        "precision": args.precision,
        "optimizer": args.optimizer,
        "reps": args.reps,
        "warmup": args.warmup,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "peak_flops": peak_flops(device),
        "flops": "model FLOPs per step: forward + backward = 3 x forward, matmuls only (multiply-add = 2), "
                 "no gradient-checkpointing recompute; MFU against the dense bf16 peak, bf16 runs only",
        "runs": runs,
        "optimizer_state": states,
    }
    print_results(args, results)
    write_json(args.json, results)
    return results


def table(runs: list[dict]) -> str:
    """Markdown: one row per (preset, clip, variant)."""
    return _table(
        [[r["preset"], "x".join(map(str, r["clip"])), str(r["tokens"]), r["variant"], f"{r['step_s']:.3f}",
          f"{r['clips_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['flops_per_step'] / 1e9:.4g}",
          f"{r['tflops_per_s']:.3g}", "-" if r.get("mfu") is None else f"{r['mfu']:.1%}", f"{r['cpu_s']:.3f}",
          f"{r['peak_mem_mb']:.0f}"]
         for r in runs],
        ["preset", "clip", "tokens", "variant", "step s", "clips/s", "tokens/s", "GFLOP/step", "TFLOP/s", "MFU",
         "CPU s", "peak MB"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
