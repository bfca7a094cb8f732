"""Pretrained diffusers autoencoders at full size on CPU: parameters, weight memory, encode/decode time and peak memory.

    minisora bench pretrained                     # ltx, wan and sd at 17x256x256: ~7 minutes on 2 CPU cores
    minisora bench pretrained --kinds wan --frames 17 --size 256 --json bench/pretrained-vae-cpu.json

Each model is its real diffusers class built from its released configuration with random weights, so nothing
is downloaded and the figures hold for the real checkpoints (same layers, same shapes; values do not change
the cost): LTX-Video 0.9 = AutoencoderKLLTXVideo's defaults, Wan2.1 = AutoencoderKLWan's defaults, SD =
AutoencoderKL as stabilityai/sd-vae-ft-ema's config.json has it (SD_CONFIG), run frame by frame.
Parameters are counted on the meta device (no memory); weight memory is parameters x 4 (float32) or x 2 bytes.
Per clip, encode (a random 3 x T x S x S video) and decode (random latents) each run once, through the
DiffusersVAE adapter in float32 with its default tiling (diffusers tiles only above 512 px for LTX, 256 px for
Wan and SD, so a 256 px clip is not tiled), in a fresh subprocess: "peak" is the growth of the peak RSS
(VmHWM) over the RSS with weights and input in place, so one call's allocations cannot hide another's.
The machine's load average before and after goes into the JSON: on a shared machine the seconds depend on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

from minisora.bench.report import reset_peak_rss, rss_mb, write_json

# stabilityai/sd-vae-ft-ema's config.json (AutoencoderKL's own defaults are a 1-block toy): the VAE Latte encodes
# frames with; its 83,653,863 parameters are the published count of the SD 1.x VAE.
SD_CONFIG = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
# kind -> diffusers config of the released model ({} = the class defaults, which are the released VAE).
CONFIGS: dict[str, dict] = {"ltx": {}, "wan": {}, "sd": SD_CONFIG}
NAMES = {"ltx": "LTX-Video 0.9", "wan": "Wan2.1", "sd": "SD (per frame)"}


def model_facts(kind: str, config: dict) -> dict:
    """Parameter counts and compression of `kind` built on the meta device (shapes only, no memory, no weights)."""
    from minisora.models.diffusers_vae import DIFFUSERS_CLASSES, _compression, require_diffusers

    cls = getattr(require_diffusers(), DIFFUSERS_CLASSES[kind])
    with torch.device("meta"):  # LTX's 419 M parameters would take 1.6 GB and seconds of random init
        model = cls.from_config(config)
    kt, s = _compression(kind, model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "class": DIFFUSERS_CLASSES[kind],
        "parameters": count(model),  # encoder + decoder + the (post_)quant convs between them
        "encoder_parameters": count(model.encoder),
        "decoder_parameters": count(model.decoder),
        "compression": [kt, s],
    }


def measure(kind: str, op: str, frames: int, size: int, config: dict) -> dict:
    """Seconds and peak RSS growth (MiB) of one `op` ("encode" or "decode") of one clip, in this process."""
    from minisora.models.diffusers_vae import DiffusersVAE

    torch.manual_seed(0)
    vae = DiffusersVAE(kind, config, dtype="float32", tiling=True)
    C, t, h, w = vae.latent_shape(frames, size, size)
    x = torch.rand(1, 3, frames, size, size) * 2 - 1 if op == "encode" else torch.randn(1, C, t, h, w)
    gc.collect()
    reset_peak_rss()  # weights and input are in place: the peak from here on is the call itself
    base = rss_mb("VmRSS")
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = vae.encode(x) if op == "encode" else vae.decode(x)  # (1, C, t, h, w) or (1, 3, T, S, S)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_mib": rss_mb("VmHWM") - base,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "latent": [C, t, h, w],
        "output": list(y.shape),
    }


def run_child(kind: str, op: str, frames: int, size: int, threads: int, config: dict) -> dict:
    """measure() in a fresh Python process, so peaks of earlier calls (and their freed memory) do not mix in."""
    cmd = [sys.executable, "-m", "minisora.bench.pretrained", "--_child", kind, op, "--frames", str(frames),
           "--size", str(size), "--threads", str(threads), "--_config", json.dumps(config)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode:
        raise RuntimeError(f"{kind} {op} of a {frames}x{size}x{size} clip failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(kinds: list[str], frames: int, size: int, threads: int) -> dict:
    """Facts and per-clip costs of every kind, with the run's settings and the load average around it."""
    import diffusers

    results: dict = {
        "clip": [3, frames, size, size],
        "dtype": "float32",
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "load_average_before": list(os.getloadavg()),
        "models": {},
    }
    for kind in kinds:
        config = CONFIGS[kind]
        facts = model_facts(kind, config)
        kt, s = facts["compression"]
        if (frames - 1) % kt or size % s:
            raise ValueError(f"{kind} needs frames = 1 + {kt}k and size a multiple of {s}; got --frames {frames} "
                             f"--size {size}")  # fmt: skip
        n = facts["parameters"]
        row = {**facts, "weights_mib": {"float32": n * 4 / 2**20, "bfloat16": n * 2 / 2**20}}
        for op in ("encode", "decode"):
            m = run_child(kind, op, frames, size, threads, config)
            if m["parameters"] != facts["parameters"]:  # the meta-device count must be the built model's
                raise RuntimeError(f"{kind}: {m['parameters']} parameters built, {facts['parameters']} counted")
            row["latent"] = m["latent"]
            row[op] = {"seconds": m["seconds"], "peak_mib": m["peak_mib"]}
            print(f"{kind} {op}: {m['seconds']:.1f} s, +{m['peak_mib']:.0f} MiB", flush=True)
        results["models"][kind] = row
    results["load_average_after"] = list(os.getloadavg())
    return results


def format_table(r: dict) -> str:
    _, T, H, W = r["clip"]
    rows = [
        f"| model | parameters (encoder / decoder) | weights fp32 / bf16 | latent of 3x{T}x{H}x{W} | "
        f"encode s | encode peak | decode s | decode peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, m in r["models"].items():
        rows.append(
            f"| {NAMES[kind]} (`{kind}`) | {m['parameters'] / 1e6:.1f} M ({m['encoder_parameters'] / 1e6:.1f} / "
            f"{m['decoder_parameters'] / 1e6:.1f}) | {m['weights_mib']['float32']:.0f} / "
            f"{m['weights_mib']['bfloat16']:.0f} MiB | "
            f"{'x'.join(map(str, m['latent']))} | {m['encode']['seconds']:.1f} | +{m['encode']['peak_mib']:.0f} MiB | "
            f"{m['decode']['seconds']:.1f} | +{m['decode']['peak_mib']:.0f} MiB |"
        )  # fmt: skip
    load = lambda k: "/".join(f"{v:.2f}" for v in r[k])  # noqa: E731
    rows.append(f"\n(one clip per call, float32, {r['threads']} threads, {r['cpu_count']} CPUs; random weights; "
                f"load average 1/5/15 min before {load('load_average_before')}, "
                f"after {load('load_average_after')})")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minisora bench pretrained", description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="default: all three")
    p.add_argument("--frames", type=int, default=17, help="T = 1 + 8k for ltx, 1 + 4k for wan (default 17)")
    p.add_argument("--size", type=int, default=256, help="height = width, a multiple of 32 for ltx (default 256)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per call")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--_child", nargs=2, metavar=("KIND", "OP"), help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(*args._child, args.frames, args.size, json.loads(args._config))))
        return 0
    from minisora.models.diffusers_vae import require_diffusers

    try:
        require_diffusers()
        results = run(args.kinds, args.frames, args.size, args.threads)
    except (ImportError, ValueError) as e:  # diffusers missing, or a clip size the model cannot take
        print(f"minisora bench pretrained: error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
