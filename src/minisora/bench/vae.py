"""Autoencoder quality and speed: PSNR/SSIM on clips it never trained on, encode/decode frames/s and peak memory.

    minisora bench vae --vae runs/shapes/vae/vae.safetensors --shapes 256        # fresh shapes clips (unseen seed)
    minisora bench vae --vae W.safetensors --data ../shared/videos --size 17x256x256 --clips-per-video 8
    minisora bench vae --config configs/vae/standard.yaml --speed --size 17x256x256  # random weights: speed only
    minisora bench vae --pretrained wan --speed --size 17x256x256 --repeats 0       # a released VAE (diffusers)
    minisora bench vae      # (as in `minisora bench all`) the --config line above

Quality: clips are read through ClipDataset (resize the short side, centre crop), reconstructed with
encode -> decode (posterior mean, no sampling) and clamped to [-1, 1]; PSNR and SSIM are per clip, the
table gives their mean and median. `--shapes N` renders N new clips with a seed the training data never
used, so they are held out; `--data` takes a manifest or folder and cuts `--clips-per-video` clips at
evenly spaced times from each video (within a manifest row's start/end, so a time range can be held out).

Speed (--speed): one clip, encode and decode, untiled and tiled (tiles of half the frame, so tiling is
exercised even where the config's tile_size would not trigger it); a pretrained VAE runs with diffusers' own
tiling, which starts above 512 px (LTX) or 256 px (Wan, SD). Seconds are the median of `--repeats` calls
after a warm-up call; `--repeats 0` times the one cold call instead (what a 100-second call of a full-size
model on a CPU affords). Peak memory is the peak RSS growth (VmHWM) during one call in a fresh subprocess
per point, with weights and input already in place, so one call's allocations cannot hide another's.
`--pretrained KIND` builds the released model's diffusers class from its configuration with random weights:
nothing is downloaded, and the cost is the real checkpoint's (same layers and shapes).
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
from contextlib import nullcontext

import torch

from minisora.bench.report import CONFIGS, parse_size, reset_peak_rss, rss_mb, write_json

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
# --pretrained kind -> diffusers config of the released model ({} = the class defaults, which are the released
# VAE: LTX-Video 0.9's and Wan2.1's).
PRETRAINED: dict[str, dict] = {"ltx": {}, "wan": {}, "sd": SD_CONFIG}


def build_vae(args: argparse.Namespace, meta: bool = False):
    """Trained weights (--vae), a random-init VideoVAE (--config) or a released diffusers VAE (--pretrained).

    meta=True builds --config and --pretrained models on the meta device: shapes and counts, no memory.
    """
    from minisora.models.autoencoder import VideoVAE, load_autoencoder

    if args.vae:
        return load_autoencoder(args.vae).eval()
    with torch.device("meta") if meta else nullcontext():
        if args.pretrained:
            from minisora.models.diffusers_vae import DiffusersVAE

            return DiffusersVAE(args.pretrained, PRETRAINED[args.pretrained], dtype="float32", tiling=True).eval()
        from minisora.config import kwargs, load_config

        return VideoVAE(**kwargs(load_config(args.config).vae)).eval()


def facts(vae) -> dict:
    """Parameters (encoder, decoder and all) and the weights' size in float32 and bfloat16."""
    net = getattr(vae, "vae", vae)  # a DiffusersVAE wraps the diffusers model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    n = count(vae)
    return {"parameters": n, "encoder_parameters": count(net.encoder), "decoder_parameters": count(net.decoder),
            "weights_mib": {"float32": n * 4 / 2**20, "bfloat16": n * 2 / 2**20}}  # fmt: skip


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


def _call(vae, op: str, size: tuple[int, int, int], tiled: bool | None):
    """A closure running one encode or decode of one clip; tiled=True uses tiles of half the frame."""
    T, H, W = size
    if tiled:
        s = vae.spatial_compression
        tile = max(s, (max(H, W) // 2) // s * s)
        vae.config["tile_size"] = tile
        vae.config["tile_overlap"] = min(vae.config["tile_overlap"], tile // 2) // s * s
    if op == "encode":
        x = torch.rand(1, 3, T, H, W) * 2 - 1
        run = lambda: vae.encode(x, tiled=tiled)  # noqa: E731
    else:
        z = torch.randn(1, *vae.latent_shape(T, H, W))  # not encoded: the memory child must not encode first
        run = lambda: vae.decode(z, tiled=tiled)  # noqa: E731

    def call() -> None:
        with torch.inference_mode():
            run()

    return call


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_point(args: argparse.Namespace, op: str, tiled: bool | None) -> dict:
    """Seconds and peak RSS growth (MB) of one cold call, in this process (point() gives it a fresh one)."""
    call = _call(build_vae(args), op, parse_size(args.size), tiled)
    reset_peak_rss()  # weights and input are in place: the peak from here on is the call itself
    base = rss_mb("VmRSS")
    t0 = time.perf_counter()
    call()
    return {"seconds": time.perf_counter() - t0, "peak_mb": rss_mb("VmHWM") - base}


def point(args: argparse.Namespace, op: str, tiled: bool | None, threads: int) -> dict:
    """measure_point in a fresh subprocess with `threads` torch threads."""
    mode = {True: "on", False: "off", None: "auto"}[tiled]
    cmd = [sys.executable, "-m", "minisora.bench.vae", "--_point", op, mode, "--size", args.size,
           "--threads", str(threads)]  # fmt: skip
    cmd += ["--vae", args.vae] if args.vae else ["--pretrained", args.pretrained] if args.pretrained else [
        "--config", args.config]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode:
        raise RuntimeError(f"{op} of a {args.size} clip failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace, vae) -> list[dict]:
    """Per (operation, tiling): seconds, frames/s and peak memory of one clip."""
    T = parse_size(args.size)[0]
    rows = []
    for tiled in [None] if args.pretrained else [False, True]:
        for op in ("encode", "decode"):
            # The child times the call itself only with --repeats 0; else it measures memory, on one thread.
            child = point(args, op, tiled, threads=torch.get_num_threads() if args.repeats == 0 else 1)
            seconds = child["seconds"] if args.repeats == 0 else _timed(_call(vae, op, parse_size(args.size), tiled),
                                                                        args.repeats)  # fmt: skip
            rows.append({"op": op, "tiled": tiled, "seconds": seconds, "frames_per_s": T / seconds,
                         "peak_mb": child["peak_mb"]})  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minisora bench vae", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--vae", help="trained autoencoder (.safetensors)")
    src.add_argument("--config", help="config whose `vae` section builds a random-init VideoVAE (speed only)")
    src.add_argument("--pretrained", choices=list(PRETRAINED), help="a released VAE, random weights (speed only)")
    p.add_argument("--data", help="manifest or folder of videos to reconstruct")
    p.add_argument("--shapes", type=int, default=0, help="reconstruct N freshly rendered shapes clips")
    p.add_argument("--clips-per-video", type=int, default=8)
    p.add_argument("--size", default="17x32x32", help="frames x height x width (frames = 1 + k * temporal compression)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--speed", action="store_true", help="time encode/decode and measure peak memory, tiled and not")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up (0: time the cold call)")
    p.add_argument("--quick", action="store_true", help="one timed repeat (what `minisora bench all --quick` passes)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_point", nargs=2, metavar=("OP", "TILED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.vae or args.config or args.pretrained):  # `minisora bench all`: speed of the real-video config
        args.config, args.speed = str(CONFIGS / "vae" / "standard.yaml"), True
        args.size = "17x256x256" if args.size == "17x32x32" else args.size
    if (args.shapes or args.data) and not args.vae:
        p.error("quality needs trained weights (--vae)")
    if args.repeats < 0:
        p.error(f"--repeats must be >= 0, got {args.repeats}")
    if args.quick:
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._point:  # the child of point()
        torch.set_num_threads(args.threads)
        op, tiled = args._point
        print(json.dumps(measure_point(args, op, {"on": True, "off": False, "auto": None}[tiled])))
        return 0
    try:  # a full-size pretrained model is only built for real where this process calls it
        vae = build_vae(args, meta=not (args.vae or args.speed and args.repeats))
        T, H, W = parse_size(args.size)
        vae.check_video(torch.empty(1, 3, T, H, W, device="meta"))  # a size the autoencoder cannot take
    except (ImportError, ValueError) as e:  # diffusers missing (names the install command), a bad --size
        print(f"minisora bench vae: error: {e}", file=sys.stderr)
        return 2
    C, t, h, w = vae.latent_shape(T, H, W)
    results: dict = {"vae": args.vae or args.pretrained or args.config, **facts(vae), "size": [T, H, W],
                     "latent": [C, t, h, w], "compression": 3 * T * H * W / (C * t * h * w),
                     "threads": torch.get_num_threads(), "load_average_before": list(os.getloadavg())}  # fmt: skip
    print(f"{results['vae']}: {results['parameters'] / 1e6:.2f} M parameters; 3x{T}x{H}x{W} -> {C}x{t}x{h}x{w} "
          f"({results['compression']:.1f}x fewer values); {results['threads']} threads")  # fmt: skip
    if args.shapes or args.data:
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
        print(f"| data | clips | PSNR mean / median (dB) | SSIM mean / median |\n|---|---|---|---|\n"
              f"| {results['quality']['data']} | {q['clips']} | {q['psnr_mean']:.2f} / {q['psnr_median']:.2f} | "
              f"{q['ssim_mean']:.4f} / {q['ssim_median']:.4f} |")  # fmt: skip
    if args.speed:
        results["speed"] = speed(args, vae)
        results["load_average_after"] = list(os.getloadavg())
        print(f"| op | tiled | s per clip ({'cold call' if args.repeats == 0 else 'median'}) | frames/s | "
              "peak memory (MB) |\n|---|---|---|---|---|")  # fmt: skip
        for r in results["speed"]:
            tiled = "auto" if r["tiled"] is None else r["tiled"]
            print(f"| {r['op']} | {tiled} | {r['seconds']:.3f} | {r['frames_per_s']:.2f} | {r['peak_mb']:.0f} |")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
