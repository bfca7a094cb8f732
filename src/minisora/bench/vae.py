"""Autoencoder quality and speed: PSNR/SSIM on clips it never trained on, encode/decode frames/s and peak memory.

    minisora bench vae --vae runs/shapes/vae/vae.safetensors --shapes 256        # fresh shapes clips (unseen seed)
    minisora bench vae --vae W.safetensors --data ../shared/videos --size 17x256x256 --clips-per-video 8
    minisora bench vae --config configs/vae/standard.yaml --speed --size 17x256x256  # random weights: speed only
    minisora bench vae      # (as in `minisora bench all`) the line above

Quality: clips are read through ClipDataset (resize the short side, centre crop), reconstructed with
encode -> decode (posterior mean, no sampling) and clamped to [-1, 1]; PSNR and SSIM are per clip, the
table gives their mean and median. `--shapes N` renders N new clips with a seed the training data never
used, so they are held out; `--data` takes a manifest or folder and cuts `--clips-per-video` clips at
evenly spaced times from each video (within a manifest row's start/end, so a time range can be held out).

Speed (--speed): one clip, after a warm-up call, `--repeats` timed calls each for encode and decode,
untiled and tiled (tiles of half the frame, so tiling is exercised even where the config's tile_size
would not trigger it); frames/s from the median. Peak memory is the peak RSS growth (VmHWM) during the
call in a fresh subprocess per (operation, tiled) point, so one measurement's allocations cannot hide another's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from minisora.bench.report import parse_size, reset_peak_rss, rss_mb, write_json
from minisora.bench.sample import CONFIGS


def build_vae(vae_path: str | None, config: str | None):
    """Trained weights from a safetensors file, or a random-init VideoVAE from a config's `vae` section."""
    from minisora.models.autoencoder import VideoVAE, load_autoencoder

    if vae_path:
        return load_autoencoder(vae_path).eval()
    from minisora.config import kwargs, load_config

    return VideoVAE(**kwargs(load_config(config).vae)).eval()


def clip_records(data: str, clips_per_video: int, num_frames: int) -> list:
    """`clips_per_video` records per video, each a window [start, end] at evenly spaced times."""
    from minisora.data.sources import ClipRecord, load_records
    from minisora.io import probe

    records, _ = load_records(data)
    out = []
    for r in records:
        info = probe(r.path)
        if info.is_image or clips_per_video == 1:
            out.append(r)
            continue
        lo = r.start or 0.0  # a manifest's start/end columns limit where clips are cut
        hi = min(r.end, info.num_frames / info.fps) if r.end is not None else info.num_frames / info.fps
        span = num_frames / info.fps  # one window holds exactly one clip: ClipDataset takes its middle
        for k in range(clips_per_video):
            start = lo + (hi - lo - span) * k / max(1, clips_per_video - 1)
            out.append(ClipRecord(r.path, r.caption, r.label, start, start + span, r.source_line))
    return out


def quality(vae, records: list, size: tuple[int, int, int], batch_size: int) -> dict:
    """Mean and median PSNR/SSIM of encode -> decode over every record's clip."""
    from minisora.data.clips import ClipDataset
    from minisora.eval.metrics import psnr, ssim

    T, H, W = size
    dataset = ClipDataset(records, num_frames=T, height=H, width=W, crop="center", train=False)
    psnrs, ssims = [], []
    with torch.inference_mode():
        for i in range(0, len(dataset), batch_size):
            video = torch.stack([dataset[j]["video"] for j in range(i, min(i + batch_size, len(dataset)))])
            recon = vae.decode(vae.encode(video)).clamp(-1, 1)  # (B, 3, T, H, W)
            psnrs += psnr(recon, video).tolist()
            ssims += ssim(recon, video).tolist()
    return {
        "clips": len(psnrs),
        "psnr_mean": statistics.fmean(psnrs),
        "psnr_median": statistics.median(psnrs),
        "ssim_mean": statistics.fmean(ssims),
        "ssim_median": statistics.median(ssims),
    }


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _calls(vae, size: tuple[int, int, int], tiled: bool):
    """(encode, decode) closures for one clip; tiled calls use tiles of half the frame with the config's overlap."""
    T, H, W = size
    video = torch.rand(1, 3, T, H, W) * 2 - 1
    latents = torch.randn(1, *vae.latent_shape(T, H, W))  # not encoded: the memory child must not encode first
    if tiled:
        s = vae.spatial_compression
        tile = max(s, (max(H, W) // 2) // s * s)
        vae.config["tile_size"] = tile
        vae.config["tile_overlap"] = min(vae.config["tile_overlap"], tile // 2) // s * s

    def encode() -> None:
        with torch.inference_mode():
            vae.encode(video, tiled=tiled)

    def decode() -> None:
        with torch.inference_mode():
            vae.decode(latents, tiled=tiled)

    return encode, decode


def memory_point(args: argparse.Namespace, op: str, tiled: bool) -> float:
    """Peak RSS growth (MB) of one encode or decode in a fresh subprocess."""
    cmd = [sys.executable, "-m", "minisora.bench.vae", "--_memory", op, "--size", args.size]
    cmd += ["--vae", args.vae] if args.vae else ["--config", args.config]
    cmd += ["--tiled"] if tiled else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    vae = build_vae(args.vae, args.config)
    encode, decode = _calls(vae, parse_size(args.size), args.tiled)
    reset_peak_rss()  # weights, input clip and latents are in place: the peak from here on is the call itself
    base = rss_mb("VmRSS")
    (encode if args._memory == "encode" else decode)()
    print(f"{rss_mb('VmHWM') - base:.1f}")


def speed(args: argparse.Namespace, vae) -> list[dict]:
    size = parse_size(args.size)
    rows = []
    for tiled in (False, True):
        encode, decode = _calls(vae, size, tiled)
        for op, fn in (("encode", encode), ("decode", decode)):
            seconds = _timed(fn, args.repeats)
            rows.append(
                {
                    "op": op,
                    "tiled": tiled,
                    "seconds": seconds,
                    "frames_per_s": size[0] / seconds,
                    "peak_mb": memory_point(args, op, tiled),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="minisora bench vae", description=__doc__.split("\n")[0])
    p.add_argument("--vae", help="trained autoencoder (.safetensors)")
    p.add_argument("--config", help="config whose `vae` section builds a random-init VideoVAE (speed only)")
    p.add_argument("--data", help="manifest or folder of videos to reconstruct")
    p.add_argument("--shapes", type=int, default=0, help="reconstruct N freshly rendered shapes clips")
    p.add_argument("--clips-per-video", type=int, default=8)
    p.add_argument("--size", default="17x32x32", help="frames x height x width (frames = 1 + k * temporal compression)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--speed", action="store_true", help="time encode/decode and measure peak memory, tiled and not")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one timed repeat (what `minisora bench all --quick` passes)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_memory", choices=["encode", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vae and args.config:
        p.error("give one of --vae (trained weights) and --config (random weights), not both")
    if not (args.vae or args.config):  # `minisora bench all`: speed of the real-video config
        args.config, args.speed = str(CONFIGS / "vae" / "standard.yaml"), True
        args.size = "17x256x256" if args.size == "17x32x32" else args.size
    if args.quick:
        args.repeats = 1
    if args._memory:
        return _memory_child(args)
    vae = build_vae(args.vae, args.config)
    T, H, W = parse_size(args.size)
    C, t, h, w = vae.latent_shape(T, H, W)
    n_params = sum(p.numel() for p in vae.parameters())
    results: dict = {
        "vae": args.vae or args.config,
        "parameters": n_params,
        "size": [T, H, W],
        "latent": [C, t, h, w],
        "compression": 3 * T * H * W / (C * t * h * w),
        "threads": torch.get_num_threads(),
    }
    print(
        f"{results['vae']}: {n_params / 1e6:.2f} M parameters; 3x{T}x{H}x{W} -> {C}x{t}x{h}x{w} "
        f"({results['compression']:.1f}x fewer values); {results['threads']} threads"
    )
    if args.shapes or args.data:
        if args.vae is None:
            p.error("quality needs trained weights (--vae)")
        with tempfile.TemporaryDirectory() as tmp:
            if args.shapes:
                from minisora.data.shapes import make_shapes

                # seed 12345: the default data uses seed 0, so none of these clips was seen in training
                data = str(make_shapes(tmp, num=args.shapes, seed=12345, size=H, width=W, num_frames=T))
                per_video = 1
            else:
                data, per_video = args.data, args.clips_per_video
            q = quality(vae, clip_records(data, per_video, T), (T, H, W), args.batch_size)
        results["quality"] = {"data": "shapes (seed 12345)" if args.shapes else args.data, **q}
        print(
            f"| data | clips | PSNR mean / median (dB) | SSIM mean / median |\n|---|---|---|---|\n"
            f"| {results['quality']['data']} | {q['clips']} | {q['psnr_mean']:.2f} / {q['psnr_median']:.2f} | "
            f"{q['ssim_mean']:.4f} / {q['ssim_median']:.4f} |"
        )
    if args.speed:
        results["speed"] = speed(args, vae)
        print("| op | tiled | s per clip (median) | frames/s | peak memory (MB) |\n|---|---|---|---|---|")
        for r in results["speed"]:
            print(f"| {r['op']} | {r['tiled']} | {r['seconds']:.3f} | {r['frames_per_s']:.2f} | {r['peak_mb']:.0f} |")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
