"""Can one model learn four clip sizes at once? Shapes at two aspect ratios and two lengths, scored per bucket.

    .venv/bin/python experiments/buckets_four_sizes.py --json bench/buckets-cpu.json    # ~38 min on a 2-core CPU
    .venv/bin/python experiments/buckets_four_sizes.py --train-steps 1000 --json out.json

1. Shapes clips are generated at four sizes (VARIANTS: 17 and 9 frames, 32x32 and 24x40), a quarter each.
2. The default pipeline (configs/shapes.yaml: VAE, latent cache, DiT) trains on them with the bucket set
   BUCKETS (32px area x {9, 17} frames x {1:1, 16:9}): every clip lands in the bucket of its own size,
   batches never mix buckets, and batch sizes follow the token count.
3. The trained model samples every shapes prompt at every bucket's size (`--seeds` seeds each) and the
   shapes evaluator scores colour and direction per bucket.
Reruns with the same --out resume. Figures: docs/data.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from minisora.bench.report import run_and_report

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["17x32x32", "9x32x32", "17x24x40", "9x24x40"]  # frames x height x width
BUCKETS = ("buckets.resolutions={32px: [9, 17]}", 'buckets.aspect_ratios=["1:1", "16:9"]')


def overrides(args: argparse.Namespace) -> list[str]:
    """The config of the run: configs/shapes.yaml plus these (docs/data.md shows the equivalent command line)."""
    out = Path(args.out)
    return [
        "name=buckets", f"run_dir={out / 'runs'}", f"latents.cache_root={out / 'cache'}",
        f"data.path={out / 'data' / 'manifest.csv'}", f"shapes.variants=[{','.join(VARIANTS)}]",
        f"shapes.num={args.clips}", f"trainer.max_steps={args.train_steps}", *BUCKETS,
        "sample.every_n_steps=0", "shapes_eval=null", "trainer.enable_progress_bar=false",
        "vae_trainer.enable_progress_bar=false", *args.extra,
    ]  # fmt: skip


def buckets(cfg, pipe) -> list:
    """The run's buckets for the trained model's autoencoder and patch."""
    from minisora.config import kwargs
    from minisora.data.buckets import BucketSpec, Geometry

    return BucketSpec(**kwargs(cfg.buckets)).build(Geometry.of(pipe.vae, pipe.model.patch_size))


def run(args: argparse.Namespace) -> dict:
    from minisora.config import load_config
    from minisora.pipeline import TextToVideoPipeline
    from minisora.training.run import run_dir, run_pipeline
    from minisora.eval.shapes import score_pipeline

    cfg = load_config(ROOT / "configs/shapes.yaml", overrides(args))
    t0 = time.time()
    run_pipeline(cfg)
    seconds = round(time.time() - t0)
    pipe = TextToVideoPipeline.from_pretrained(run_dir(cfg))
    results: dict = {"seconds_train": seconds, "buckets": {}}
    for bucket in buckets(cfg, pipe):
        t1 = time.time()
        m = score_pipeline(pipe, Path(args.out) / "eval" / bucket.name, samples_per_prompt=args.seeds, fps=8, seed=0,
                           steps=args.steps, guidance=cfg.sample.guidance, num_frames=bucket.frames,
                           height=bucket.height, width=bucket.width)  # fmt: skip
        results["buckets"][bucket.name] = {**m, "aspect": bucket.aspect, "tokens": bucket.tokens,
                                           "seconds": round(time.time() - t1)}  # fmt: skip
    results["args"] = {k: v for k, v in vars(args).items() if k != "json"}
    return results


def format_results(r: dict) -> str:
    rows = [f"{'bucket (TxHxW)':<15} {'aspect':>6} {'tokens':>6} {'colour train':>12} {'colour held-out':>15} "
            f"{'direction train':>15} {'direction held-out':>18}"]  # fmt: skip
    for name, m in r["buckets"].items():
        rows.append(f"{name:<15} {m['aspect']:>6} {m['tokens']:>6} {m['train/color_accuracy']:>12.2f} "
                    f"{m['heldout/color_accuracy']:>15.2f} {m['train/direction_accuracy']:>15.2f} "
                    f"{m['heldout/direction_accuracy']:>18.2f}")  # fmt: skip
    samples = next(iter(r["buckets"].values()))["samples"]
    rows.append(f"({samples} samples per bucket; training took {r['seconds_train']} s)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments/buckets_four_sizes.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench-buckets", help="folder for data, run and cache (reruns resume)")
    p.add_argument("--clips", type=int, default=1000, help="shapes clips over the four sizes (default 1000)")
    p.add_argument("--train-steps", type=int, default=4000, help="DiT steps (default 4000, as make train)")
    p.add_argument("--seeds", type=int, default=4, help="samples per prompt and bucket (default 4)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides of the run")
    p.add_argument("--json", help="write the results here")
    return run_and_report(p, run, format_results, argv)


if __name__ == "__main__":
    raise SystemExit(main())
