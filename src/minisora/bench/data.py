"""Data pipeline throughput: clips/s of 16-frame 256x256 clips at random positions of real H.264 videos.

    python -m minisora.bench.data [--videos DIR] [--clips N] [--workers 0 2] [--json OUT]

Runs ClipDataset + DataLoader exactly as training does (random start, resize in the decoder, random
crop, float tensor), excludes a warm-up, repeats and reports the median. Then splits one process's
time per clip into seek+decode, RGB conversion with resize, and crop + tensor conversion, so a slow
figure says where the time goes. The target is >= 15 clips/s with 2 workers on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import av
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, RandomSampler

from minisora.bench.report import write_json
from minisora.data.clips import ClipDataset
from minisora.data.datamodule import collate_clips
from minisora.data.sources import load_records
from minisora.io import frame_pts, read_frames

TARGET_CLIPS_PER_S = 15.0  # with 2 workers on a 2-core machine
DEFAULT_VIDEOS = "../shared/videos"


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children (DataLoader workers) so far."""
    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:  # a worker that exited since the listing
            continue
        total += t.user + t.system
    return total


def throughput(
    dataset: ClipDataset, workers: int, clips: int, repeats: int, batch_size: int, warmup: int, seed: int
) -> list[tuple[float, float]]:
    """(clips/s, CPU ms per clip) of `repeats` passes over `clips` random clips, after `warmup` clips not timed.

    CPU time per clip does not depend on how loaded the machine is; 1000 * cores / (CPU ms per
    clip) is the clips/s an idle machine could reach if the work spread perfectly.
    """
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=clips, generator=g)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_clips,
        persistent_workers=workers > 0, generator=g,
    )  # fmt: skip
    for i, _ in enumerate(loader):  # starts the workers, fills caches (probe, packet tables)
        if (i + 1) * batch_size >= warmup:
            break
    runs = []
    for _ in range(repeats):
        n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
        for batch in loader:
            n += batch["video"].shape[0]
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        runs.append((n / wall, 1000 * cpu / n))
    return runs


def _decode_only(path: str, indices: list[int]) -> int:
    """Seek and decode like io.read_frames, without converting any frame; returns frames decoded."""
    table = frame_pts(path)
    decoded = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if indices[0] > 0:
            container.seek(table[indices[0]], stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            decoded += 1
            if frame.pts is not None and frame.pts >= table[indices[-1]]:
                break
    return decoded


def breakdown(dataset: ClipDataset, clips: int, seed: int) -> dict[str, float]:
    """CPU ms per clip (median) in this process: seek+decode, RGB at full size, RGB with resize, crop/tensor.

    Uses ClipDataset's own steps (_probe, _indices, _load) so the figures are those of training.
    """
    rng = np.random.default_rng(seed)
    plans = []  # (record index, probe, per-clip seed): the same seed gives _load the same start frame
    for _ in range(clips):
        i, clip_seed = int(rng.integers(len(dataset))), int(rng.integers(2**32))
        plans.append((i, dataset._probe(i), clip_seed))
    timings: dict[str, list[float]] = {k: [] for k in ("decode", "decode_rgb", "decode_rgb_resize", "item")}
    decoded = []
    for i, (info, count), clip_seed in plans:
        record = dataset.records[i]
        idx = dataset._indices(record, info, count, np.random.default_rng(clip_seed))
        scale = max(dataset.height / info.height, dataset.width / info.width)
        size = (max(dataset.width, round(info.width * scale)), max(dataset.height, round(info.height * scale)))
        t0 = time.process_time()  # CPU time of all threads (decoder, swscale): robust to machine load
        decoded.append(_decode_only(record.path, idx))
        t1 = time.process_time()
        read_frames(record.path, idx, info=info)
        t2 = time.process_time()
        read_frames(record.path, idx, size=size, info=info)
        t3 = time.process_time()
        dataset._load(record, (info, count), np.random.default_rng(clip_seed))
        t4 = time.process_time()
        for key, seconds in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            timings[key].append(1000 * seconds)
    med = {k: statistics.median(v) for k, v in timings.items()}

    def cost(total: str, part: str) -> float:
        # A step's cost is the difference of two separately timed runs; one cheaper than the noise between them
        # (crop and to-tensor on a few clips) would read as a negative cost: it reads 0, "below the noise".
        return max(0.0, med[total] - med[part])

    return {
        "seek_and_decode_cpu_ms": med["decode"],
        "rgb_full_size_cpu_ms": cost("decode_rgb", "decode"),
        "rgb_with_resize_cpu_ms": cost("decode_rgb_resize", "decode"),
        "crop_and_tensor_cpu_ms": cost("item", "decode_rgb_resize"),
        "item_total_cpu_ms": med["item"],
        "frames_decoded_per_clip": statistics.median(decoded),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m minisora.bench.data", description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS, help="folder with manifest.csv (default %(default)s)")
    parser.add_argument("--clips", type=int, default=48, help="clips per timed repetition")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not Path(args.videos).is_dir():
        parser.error(f"{args.videos}: no such folder (expected the real test videos with a manifest.csv)")

    records, _ = load_records(args.videos)
    dataset = ClipDataset(
        records, num_frames=args.frames, height=args.size, width=args.size, crop="random", seed=args.seed
    )
    info = dataset._probe(0)[0]
    load = os.getloadavg()
    print(
        f"{len(records)} videos ({info.width}x{info.height}, {info.fps:.1f} fps); {args.frames} frames at "
        f"{args.size}x{args.size}; {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    results: dict = {
        "config": vars(args) | {"videos": str(Path(args.videos).resolve())},
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": load,
            "python": platform.python_version(),
            "av": av.__version__,
        },
        "clips_per_s": {},
        "cpu_ms_per_clip": {},
        "runs": {},
    }
    for workers in args.workers:
        runs = throughput(dataset, workers, args.clips, args.repeats, args.batch_size, max(4, 2 * workers), args.seed)
        rate, cpu_ms = statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs)
        results["runs"][str(workers)] = [{"clips_per_s": r, "cpu_ms_per_clip": c} for r, c in runs]
        results["clips_per_s"][str(workers)] = rate
        results["cpu_ms_per_clip"][str(workers)] = cpu_ms
        print(
            f"workers={workers}: {rate:.1f} clips/s median ({', '.join(f'{r:.1f}' for r, _ in runs)}); "
            f"{cpu_ms:.0f} CPU ms per clip"
        )
    results["breakdown"] = breakdown(dataset, 24, args.seed)
    print("one process, median per clip: " + ", ".join(f"{k} {v:.1f}" for k, v in results["breakdown"].items()))
    results["machine"]["load_avg_after"] = os.getloadavg()
    if "2" in results["clips_per_s"]:
        ok = results["clips_per_s"]["2"] >= TARGET_CLIPS_PER_S
        print(f"target >= {TARGET_CLIPS_PER_S:g} clips/s with 2 workers: {'met' if ok else 'NOT met'}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
