"""Latent cache memory: peak RSS of the DiT stage on caches of N and 8N clips, and the read time per batch.

    minisora bench cache                  # N = 512 clips of 16x4x64x64 latents: 0.27 and 2.1 GB; minutes on 2 cores
    minisora bench cache --quick          # toy sizes, fitted in this process: a smoke run (the test suite's)
    minisora bench cache --clips 256 --latent 16x4x64x64 --json out.json

The caches hold random latents written through the cache writer (build_cache with an identity autoencoder):
what is measured is the reader, not the encoders. For each cache a fresh subprocess builds the DiT stage as
training does (LatentDataModule over the cache, LitVideoDiT on a tiny VideoDiT whose large patch keeps the
token count small, a Lightning Trainer) and fits one full epoch, so every row is read once. Its peak RSS
growth is VmHWM at the end minus RSS just before the fit (Lightning's start-up and the model's activations
included: the same at both sizes). Targets: growth at 8N within 10% + 100 MB of growth at N, and under
300 MB on a cache of at least 2 GB.

Then the read time of the default run's cache (configs/shapes.yaml: 1000 clips of 8x5x8x8 latents, 76
captions, batch 32, num_workers 0): wall and CPU ms per batch of the train loader, median over the batches of
`--read-epochs` epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minisora.bench.report import reset_peak_rss, rss_mb, run_and_report

GROWTH_RATIO, GROWTH_SLACK_MB = 1.10, 100.0  # growth at 8N within 10% + 100 MB of growth at N
BIG_CACHE_BYTES, BIG_GROWTH_MB = 2e9, 300.0  # a cache of >= 2 GB trains with < 300 MB of growth
TEXT = dict(model_name="tiny", context_length=16, width=128, layers=2, heads=2)  # configs/shapes.yaml's text tower


class Identity(torch.nn.Module):
    """The autoencoder of a cache of random latents: the "videos" fed to build_cache already are latents."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


def parse_dims(text: str, n: int, what: str) -> tuple[int, ...]:
    """'16x4x64x64' -> (16, 4, 64, 64), with n positive numbers."""
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != n or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{what} must be {n} positive integers joined by 'x', got {text!r}")
    return dims


def latent_module(root: Path, latent: tuple[int, int, int, int], batch_size: int, val_fraction: float):
    """The DiT stage's LatentDataModule for a cache of `latent`-shaped rows under `root` (the same in every process).

    The one clip size is what a 4x8x8 autoencoder would encode to these latents; it only names the bucket.
    """
    from minisora.data.datamodule import VideoDataModule
    from minisora.data.latent_datamodule import LatentDataModule
    from minisora.models.text import TextEncoder

    _, t, h, w = latent
    video = VideoDataModule(path=str(root / "random-latents"), num_frames=1 + 4 * (t - 1), height=8 * h, width=8 * w)
    return LatentDataModule(video, Identity(), TextEncoder(**TEXT), cache_root=str(root), dit_batch_size=batch_size,
                            num_workers=0, val_fraction=val_fraction)  # fmt: skip


def write_random_cache(dm, clips: int, latent: tuple[int, int, int, int], seed: int = 0) -> int:
    """Random latents (captions cycling through the shapes prompts) into dm's cache folder; returns its bytes."""
    from minisora.data.latents import build_cache, write_cache_index
    from minisora.data.shapes import train_prompts

    prompts = train_prompts()
    g = torch.Generator().manual_seed(seed)

    def batches(size: int = 64):
        for i in range(0, clips, size):
            n = min(size, clips - i)
            yield {"video": torch.randn((n, *latent), generator=g), "label": [-1] * n,
                   "caption": [prompts[(i + j) % len(prompts)] for j in range(n)]}  # fmt: skip

    [bucket] = dm.video.buckets
    build_cache(batches(), dm.vae, dm.text_encoder, dm.folder / bucket.name, key=f"{dm.key}-{bucket.name}",
                total=clips, desc=f"writing {clips} random latents")  # fmt: skip
    write_cache_index(dm.folder, dm.key, [(bucket, clips)])
    return sum(p.stat().st_size for p in dm.folder.rglob("*") if p.is_file())


def fit_child(args: argparse.Namespace) -> dict:
    """In a fresh process: one epoch of the DiT stage over the cache under args._child; RSS growth from before the fit."""
    import gc

    import lightning as L

    from minisora.models.dit import VideoDiT
    from minisora.training.lit_dit import LitVideoDiT

    class Rows(L.Callback):  # the cache rows the training batches held
        def __init__(self):
            self.rows: set[int] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.rows.update(batch["index"].tolist())

    torch.manual_seed(0)
    dm = latent_module(Path(args._child), args.latent, args.batch_size, val_fraction=0.0)
    dm.prepare_data()  # finds the cache the parent wrote complete (it would encode nothing: no clips to read)
    text = dm.text_encoder
    model = VideoDiT(in_channels=args.latent[0], patch_size=list(args.patch), hidden_size=32, depth=1, num_heads=2,
                     text_dim=text.dim)  # fmt: skip
    null, null_mask = text.null_embedding()  # (1, L, D), (1, L)
    lit = LitVideoDiT(model, null_context=null[0], null_mask=null_mask[0], optimizer="adamw", lr=1e-3,
                      warmup_steps=1, ema_decay=0.9)  # fmt: skip
    rows = Rows()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[rows],
    )  # fmt: skip
    threads = torch.get_num_threads()
    # Memory is what is measured: one thread spares the tiny model's steps the intra-op hand-offs that made them
    # 10x slower on a loaded 2-core machine (12 ms per small linear layer).
    torch.set_num_threads(1)
    gc.collect()
    before = rss_mb("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    try:
        trainer.fit(lit, datamodule=dm)
    finally:
        torch.set_num_threads(threads)  # --quick fits in the caller's process
    seconds = time.perf_counter() - t0
    peak = rss_mb("VmHWM")
    return {"steps": trainer.global_step, "rows_read": len(rows.rows), "seconds": seconds, "rss_before_mb": before,
            "peak_rss_mb": peak, "growth_mb": peak - before}  # fmt: skip


def measure(root: Path, clips: int, args: argparse.Namespace) -> dict:
    """Write a cache of `clips` random rows under root, fit one epoch on it in a subprocess; its figures."""
    dm = latent_module(root, args.latent, args.batch_size, val_fraction=0.0)
    t0 = time.perf_counter()
    size = write_random_cache(dm, clips, args.latent)
    written = time.perf_counter() - t0
    if args.quick:  # a smoke run: fitting here spares two processes' 20 s of imports, but its figures mean nothing
        child = fit_child(argparse.Namespace(**{**vars(args), "_child": str(root)}))
        return {"clips": clips, "size_bytes": size, "write_seconds": written, **child}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", "minisora.bench.cache", "--_child", str(root), "--latent", "x".join(map(str, args.latent)),
               "--patch", "x".join(map(str, args.patch)), "--batch-size", str(args.batch_size), "--json", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True)
        child = json.loads(out.read_text())
    return {"clips": clips, "size_bytes": size, "write_seconds": written, **child}


def read_time(root: Path, clips: int, epochs: int) -> dict:
    """Wall and CPU ms per batch of the train loader over the default run's cache shape (median of all batches)."""
    dm = latent_module(root, (8, 5, 8, 8), batch_size=32, val_fraction=0.05)
    write_random_cache(dm, clips, (8, 5, 8, 8))
    dm.setup("fit")
    loader = dm.train_dataloader()
    walls, cpus = [], []
    for _ in range(epochs):
        batches = iter(loader)
        while True:
            t0, c0 = time.perf_counter(), time.process_time()
            if next(batches, None) is None:
                break
            walls.append(1e3 * (time.perf_counter() - t0))
            cpus.append(1e3 * (time.process_time() - c0))
    return {"clips": clips, "latent": [8, 5, 8, 8], "batch_size": 32, "batches": len(walls),
            "wall_ms_median": statistics.median(walls), "cpu_ms_median": statistics.median(cpus)}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    if args._child:
        return fit_child(args)
    if args.quick:
        args.clips, args.latent, args.patch, args.batch_size, args.read_clips, args.read_epochs = 8, (4, 2, 8, 8), (1, 2, 2), 4, 64, 2
    if args.clips % args.batch_size:
        raise SystemExit(f"--clips ({args.clips}) must be a multiple of --batch-size ({args.batch_size}): one epoch reads every row")
    out = Path(args.out)
    folders = {n: out / f"clips-{n}" for n in (args.clips, 8 * args.clips)} | {"read": out / "read"}
    for folder in folders.values():  # fresh caches: nothing reused from an earlier run
        shutil.rmtree(folder, ignore_errors=True)
    results: dict = {
        "what": "random latents written through the cache writer (the reader is measured, not the encoders); "
        + ("--quick: both fits in this process, a smoke run whose memory figures mean nothing" if args.quick else
           "one epoch of the DiT stage per cache in a fresh subprocess"),
        "latent": list(args.latent), "patch": list(args.patch), "batch_size": args.batch_size, "caches": [],
    }  # fmt: skip
    try:
        for clips in (args.clips, 8 * args.clips):
            results["caches"].append(measure(folders[clips], clips, args))
        results["read"] = read_time(folders["read"], args.read_clips, args.read_epochs)
    finally:
        if not args.keep:  # only what this run wrote: --out may name a folder that holds other things
            for folder in folders.values():
                shutil.rmtree(folder, ignore_errors=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
    small, big = results["caches"]
    results["targets"] = {
        "growth_8n_within_10pct_plus_100mb": big["growth_mb"] <= GROWTH_RATIO * small["growth_mb"] + GROWTH_SLACK_MB,
        "cache_2gb_under_300mb": big["growth_mb"] < BIG_GROWTH_MB if big["size_bytes"] >= BIG_CACHE_BYTES else None,
    }
    return results


def format_results(r: dict) -> str:
    if "caches" not in r:  # a child's figures, read back by the parent
        return json.dumps(r)
    lines = [
        f"latent cache memory: {r['what']}",
        f"latents {'x'.join(map(str, r['latent']))} (DiT patch {'x'.join(map(str, r['patch']))}), batch {r['batch_size']}",
        "",
        "| clips | cache on disk | steps | rows read | fit (s) | RSS before fit (MB) | peak RSS growth (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in r["caches"]:
        lines.append(f"| {c['clips']} | {c['size_bytes'] / 1e9:.2f} GB | {c['steps']} | {c['rows_read']} | "
                     f"{c['seconds']:.0f} | {c['rss_before_mb']:.0f} | {c['growth_mb']:.0f} |")  # fmt: skip
    small, big = r["caches"]
    t = r["targets"]
    lines.append(f"growth at 8N ({big['growth_mb']:.0f} MB) within 10% + 100 MB of growth at N "
                 f"({small['growth_mb']:.0f} MB): {'met' if t['growth_8n_within_10pct_plus_100mb'] else 'NOT met'}")  # fmt: skip
    big_ok = t["cache_2gb_under_300mb"]
    lines.append("cache >= 2 GB trains with < 300 MB growth: "
                 + ("not measured (the larger cache is under 2 GB)" if big_ok is None else "met" if big_ok else "NOT met"))  # fmt: skip
    rd = r["read"]
    lines.append(f"read time, {rd['clips']} clips of {'x'.join(map(str, rd['latent']))} in batches of {rd['batch_size']}: "
                 f"{rd['wall_ms_median']:.2f} ms wall, {rd['cpu_ms_median']:.2f} ms CPU per batch (median of {rd['batches']})")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minisora bench cache", description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=512, help="N: the caches hold N and 8N clips")
    p.add_argument("--latent", type=lambda s: parse_dims(s, 4, "--latent"), default=(16, 4, 64, 64),
                   help="C x t x h x w of one clip's latents (default %(default)s: 512 KB in float16)")  # fmt: skip
    p.add_argument("--patch", type=lambda s: parse_dims(s, 3, "--patch"), default=(4, 16, 16),
                   help="the tiny DiT's patch (pt x ph x pw): 16 tokens a clip at the default latents")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8,
                   help="8 clips of 512 KB: the step's activations (~150 MB) stay a fixed, small part of the growth")  # fmt: skip
    p.add_argument("--read-clips", type=int, default=1000, help="clips of the read-time cache (the default run's count)")
    p.add_argument("--read-epochs", type=int, default=20)
    p.add_argument("--out", default="runs/bench-cache", help="folder for the caches (removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the caches")
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke run in seconds")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_child", metavar="ROOT", help=argparse.SUPPRESS)  # the subprocess that fits on ROOT's cache
    return run_and_report(p, run, format_results, argv)


if __name__ == "__main__":
    sys.exit(main())
