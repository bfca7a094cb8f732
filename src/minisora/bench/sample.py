"""Sampling speed and memory: seconds per step and per video for DiT presets, and the peak memory of a long sample.

    minisora bench sample [--presets tiny S] [--sizes 17x32x32 17x256x256] [--steps 25] [--json OUT]
    minisora bench sample --memory [--preset B --frames 121 --height 480 --width 848]

Speed: every (preset, size) pairs the DiT preset (configs/model/<preset>.yaml) with the autoencoder and text
encoder of the config that trains at that size: configs/shapes.yaml up to 64 px, else
configs/experiments/t2v256.yaml (16-channel 8x VAE, ViT-L-14 text tower built without downloading
weights). Weights are random: speed does not depend on them. A step's time is the median gap between the
sampler's per-step callbacks after a warm-up step, for Euler and Heun (two model calls per step), with cond
and uncond in one batch and as two calls. Per video = text encoding + `steps` steps + decoding, each measured.

Memory (--memory): sampling a long, large video holds at its peak either the DiT's weights plus one guided
forward's activations, or the decoder's tile/chunk working set plus the output video. Both are measured on
the CPU as peak RSS growth in a fresh subprocess per point (large allocations mmap'd, so freed memory
leaves): the DiT forward (one block; activations do not add up over blocks without gradients) at several
token counts, fitted as a line and extrapolated; the VAE decode of one 17-frame 256x256 tile/chunk, plus
the full-size output buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from minisora.bench.report import CONFIGS, model_preset, parse_size, reset_peak_rss, rss_mb, write_json
from minisora.device import resolve_dtype


def build(preset: str, size: tuple[int, int, int], dtype: torch.dtype = torch.float32):
    """A TextToVideoPipeline of random weights: the preset's DiT with the autoencoder and text encoder for `size`."""
    from minisora.config import kwargs, load_config
    from minisora.models.autoencoder import VideoVAE
    from minisora.models.dit import VideoDiT
    from minisora.models.text import TextEncoder
    from minisora.pipeline import TextToVideoPipeline

    T, H, W = size
    experiment = CONFIGS / "shapes.yaml" if max(H, W) <= 64 else CONFIGS / "experiments" / "t2v256.yaml"
    cfg = load_config(experiment)
    vae = VideoVAE(**kwargs(cfg.vae))
    text = TextEncoder(**{**kwargs(cfg.text), "pretrained": None})  # architecture only: no download
    model = VideoDiT(**{**model_preset(preset), "in_channels": vae.latent_channels, "text_dim": text.dim}).to(dtype)
    pipe = TextToVideoPipeline(model, vae, text, prediction=cfg.dit_train.prediction, t_shift=cfg.dit_train.t_shift,
                               num_frames=T, height=H, width=W)  # fmt: skip
    return pipe, experiment.name


def step_seconds(pipe, sampler: str, batched_cfg: bool, timed: int) -> float:
    """Median seconds per sampler step over `timed` steps, after one warm-up step."""
    stamps: list[float] = []
    pipe.sample_latents(["a red circle moving left"], steps=timed + 2, sampler=sampler, batched_cfg=batched_cfg,
                        guidance=4.0, callback=lambda info: stamps.append(time.perf_counter()))  # fmt: skip
    # callback i fires after step i's first model call: gaps from the 2nd callback on are whole steps.
    return statistics.median(np.diff(stamps[1:]).tolist())


def seconds(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_speed(presets: list[str], sizes: list[tuple[int, int, int]], steps: int, timed: int) -> list[dict]:
    rows = []
    for size in sizes:
        for preset in presets:
            pipe, experiment = build(preset, size)
            C, t, h, w = pipe.latent_shape(*size)
            text_s = seconds(lambda p=pipe: p.text_encoder(["a red circle moving left"]))
            latents = torch.randn(1, C, t, h, w)
            decode_s = seconds(lambda p=pipe, z=latents: p.decode(z), repeats=1 if max(size) > 64 else 2)
            row = dict(preset=preset, size="x".join(map(str, size)), config=experiment, latent=f"{C}x{t}x{h}x{w}",
                       tokens=pipe.model.tokens(t, h, w), params_m=round(pipe.model.num_parameters() / 1e6, 2),
                       text_s=round(text_s, 4), decode_s=round(decode_s, 3), steps=steps)  # fmt: skip
            for sampler in ("euler", "heun"):
                for batched in (True, False):
                    s = step_seconds(pipe, sampler, batched, timed)
                    key = f"{sampler}_{'batched' if batched else 'two_calls'}"
                    row[f"{key}_step_s"] = round(s, 4)
                    row[f"{key}_video_s"] = round(text_s + steps * s + decode_s, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| preset | clip | tokens | Euler s/step (1 batch / 2 calls) | Heun s/step (1 batch / 2 calls) | "
            "decode s | Euler s/video | Heun s/video |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['size']} | {r['tokens']} | {r['euler_batched_step_s']:.3g} / "
            f"{r['euler_two_calls_step_s']:.3g} | {r['heun_batched_step_s']:.3g} / {r['heun_two_calls_step_s']:.3g} | "
            f"{r['decode_s']:.3g} | {r['euler_batched_video_s']:.3g} | {r['heun_batched_video_s']:.3g} |"
        )
    return "\n".join(lines)


# ---- memory ------------------------------------------------------------------------------------
def _child(kind: str, preset: str, tokens_frames: int, height: int, width: int, dtype: str) -> None:
    """In a fresh process: peak RSS growth (MB) of one guided DiT forward or one VAE tile/chunk decode."""
    torch.set_grad_enabled(False)
    dt = resolve_dtype(dtype)
    size = (tokens_frames, height, width)
    pipe, _ = build(preset, size, dt)
    if kind == "dit":
        pipe.model.blocks = pipe.model.blocks[:1]  # activations are freed block by block; weights are counted apart
        C, t, h, w = pipe.latent_shape(*size)
        x = torch.randn(2, C, t, h, w)  # cond + uncond in one batch
        ctx, mask = pipe.text_encoder(["a prompt", ""])
        before = rss_mb("VmRSS")
        reset_peak_rss()
        pipe.model(x.to(dt), torch.full((2,), 0.5), context=ctx, context_mask=mask)
        print(json.dumps({"tokens": pipe.model.tokens(t, h, w), "peak_mb": rss_mb("VmHWM") - before}))
    else:
        C, t, h, w = pipe.latent_shape(*size)
        z = torch.randn(1, C, t, h, w)
        before = rss_mb("VmRSS")
        reset_peak_rss()
        pipe.vae.decode(z)
        print(json.dumps({"frames": tokens_frames, "peak_mb": rss_mb("VmHWM") - before}))


def _run_child(*args: str, dtype: str = "fp32") -> dict:
    cmd = [
        sys.executable,
        "-m",
        "minisora.bench.sample",
        "--dtype",
        dtype,
        "--threads",
        str(torch.get_num_threads()),
        "--child",
        *args,
    ]
    # Every allocation above 64 KiB gets its own mmap, returned to the OS when freed: the peak RSS then tracks
    # live tensors (as CUDA's max_memory_allocated does) instead of glibc's reused heap (7 MB at 1590 tokens
    # without this, 98 MB with it).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_memory(preset: str, frames: int, height: int, width: int, dtype: str) -> dict:
    """Peak memory of sampling a frames x height x width video from `preset`, from CPU measurements (see module doc)."""
    pipe, experiment = build(preset, (frames, height, width))
    C, t, h, w = pipe.latent_shape(frames, height, width)
    tokens = pipe.model.tokens(t, h, w)
    bytes_per = 2 if dtype == "bf16" else 4
    weights_mb = pipe.model.num_parameters() * bytes_per / 2**20
    text_mb = sum(p.numel() for p in pipe.text_encoder.parameters()) * 4 / 2**20
    vae_mb = sum(p.numel() for p in pipe.vae.parameters()) * 4 / 2**20
    # The DiT forward at 1..4 latent frames of the full 480p grid, one block (see module doc).
    kt = pipe.vae.temporal_compression
    points = [_run_child("dit", preset, str(1 + kt * k), str(height), str(width), dtype=dtype) for k in (0, 1, 3)]
    slope, intercept = np.polyfit([p["tokens"] for p in points], [p["peak_mb"] for p in points], 1)
    dit_act_mb = float(intercept + slope * tokens)
    # One decoder tile/chunk: 1 + chunk_frames frames of tile_size^2 (the largest call tiled decoding makes).
    vcfg = pipe.vae.config
    tile = _run_child("vae", preset, str(1 + vcfg["chunk_frames"]), str(vcfg["tile_size"]), str(vcfg["tile_size"]))
    # Tiled decoding accumulates into a float32 output and a weight map; the per-tile output (all frames of a tile,
    # concatenated over chunks) is one more buffer; to_uint8 makes a 1-byte copy.
    out_mb = 3 * frames * height * width * 4 / 2**20
    tile_out_mb = 3 * frames * vcfg["tile_size"] ** 2 * 4 / 2**20
    decode_mb = tile["peak_mb"] + out_mb + tile_out_mb + out_mb / 4
    # With offload the text encoder visits the GPU before sampling and the VAE after it; the DiT stays.
    return dict(
        preset=preset, video=f"{frames}x{height}x{width}", config=experiment, latent=f"{C}x{t}x{h}x{w}", tokens=tokens,
        dit_dtype=dtype, dit_weights_mb=round(weights_mb), text_encoder_mb=round(text_mb), vae_weights_mb=round(vae_mb),
        dit_points=points, dit_mb_per_1k_tokens=round(slope * 1000, 1), dit_activations_mb=round(dit_act_mb),
        vae_tile_peak_mb=round(tile["peak_mb"]), decode_peak_mb=round(decode_mb + vae_mb),
        peak_offload_mb=round(max(weights_mb + dit_act_mb, weights_mb + decode_mb + vae_mb, weights_mb + text_mb)),
        peak_no_offload_mb=round(weights_mb + text_mb + vae_mb + max(dit_act_mb, decode_mb)),
    )  # fmt: skip


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minisora bench sample", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "S"])
    p.add_argument("--sizes", nargs="+", default=["17x32x32", "17x256x256"], help="TxHxW clips (T = 1 + 4k)")
    p.add_argument("--steps", type=int, default=25, help="steps per video for the per-video figure")
    p.add_argument("--timed", type=int, default=3, help="timed steps per measurement (after one warm-up step)")
    p.add_argument("--memory", action="store_true", help="measure the peak memory of one long sample instead")
    p.add_argument("--preset", default="B")
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=848)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="DiT dtype for --memory")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, preset, frames, height, width = args.child
        _child(kind, preset, int(frames), int(height), int(width), args.dtype)
        return 0
    info = machine()
    print(json.dumps(info), flush=True)
    with torch.no_grad():  # scoped: `minisora bench all` runs the training benchmark in the same process
        if args.memory:
            result = {
                "machine": info,
                "memory": bench_memory(args.preset, args.frames, args.height, args.width, args.dtype),
            }
            print(json.dumps(result["memory"], indent=1))
        else:
            rows = bench_speed(args.presets, [parse_size(s) for s in args.sizes], args.steps, args.timed)
            result = {"machine": info, "speed": rows, "load_avg_after": [round(v, 2) for v in os.getloadavg()]}
            print(table(rows))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
