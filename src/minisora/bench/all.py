"""`make bench`: every benchmark in one go, merged into bench/results-<device>.json.

    minisora bench all [--quick] [--out bench]

Runs data loading (needs ../shared/videos; skipped with the reason when absent), DiT training steps (presets
S and B at 17x256x256 with every one-switch variant), sampling (tiny and S, shapes size and 17x256x256) and
the autoencoder (speed and memory of configs/vae/standard.yaml), each printing its own markdown table; on a
GPU also the 24 GiB budget search (bench/budget.py).
`--quick` runs each on toy sizes in well under a minute: the test suite runs it and checks the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

from minisora.bench.report import write_json
from minisora.bench.sample import CONFIGS

# torch.compile's variant only on a GPU: inductor compiled the tiny preset's step for ~10 s on this CPU and then
# ran it at 0.016 vs 0.019 s/step; compiling S and B would take most of the 10-minute budget of `make bench`.
TRAIN_VARIANTS = ["base", "grad_ckpt", "optimizer", "precision", "factorized"]
FULL: dict[str, list[str]] = {
    "data": [],
    "train": ["--reps", "3", "--variants", *TRAIN_VARIANTS, *(["compile"] if torch.cuda.is_available() else [])],
    "sample": [],
    "vae": ["--config", str(CONFIGS / "vae" / "standard.yaml"), "--speed", "--size", "17x256x256"],
    **({"budget": []} if torch.cuda.is_available() else {}),  # the 24 GiB search needs a GPU to cap
}
QUICK: dict[str, list[str]] = {
    "data": ["--clips", "4", "--repeats", "1", "--workers", "0"],
    "train": ["--quick", "--threads", "1"],
    "sample": ["--presets", "tiny", "--sizes", "17x32x32", "--timed", "1", "--steps", "2"],
    "vae": ["--config", str(CONFIGS / "vae" / "shapes.yaml"), "--speed", "--size", "5x32x32", "--repeats", "1"],
}


def device_name() -> str:
    """'cpu' or the GPU's name as a file-name slug, e.g. 'nvidia-h100-80gb-hbm3'."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def run_one(name: str, argv: list[str]) -> dict:
    """Run one benchmark's main() with --json into a temporary file and return what it wrote."""
    import importlib

    module = importlib.import_module(f"minisora.bench.{name}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        threads = torch.get_num_threads()
        try:
            module.main([*argv, "--json", str(out)])
        finally:
            torch.set_num_threads(threads)  # a benchmark's --threads must not leak into the next one
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="minisora bench all", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, one repetition: a smoke run of every benchmark")
    p.add_argument("--out", default="bench", help="folder for results-<device>.json (default: bench)")
    p.add_argument("--only", nargs="+", choices=[*FULL, "budget"], help="a subset of the benchmarks")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    results: dict = {
        "device": device_name(),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},  # fmt: skip
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": {},
    }
    for name in args.only or list(plan):
        argv = plan.get(name, [])
        print(f"## minisora bench {name} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = run_one(name, argv)
        except (FileNotFoundError, SystemExit) as e:  # the data benchmark without ../shared/videos, a bad option
            results[name] = {"skipped": str(e) or repr(e)}
            print(f"skipped: {results[name]['skipped']}", flush=True)
        results["seconds"][name] = round(time.perf_counter() - t0, 1)
    out = Path(args.out) / f"results-{results['device']}{'-quick' if args.quick else ''}.json"
    write_json(str(out), results)
    return results


if __name__ == "__main__":
    main()
