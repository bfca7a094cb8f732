"""`minisora bench WHAT ...`: the measured benchmarks of minisora.bench (each module parses its own arguments)."""

from __future__ import annotations

import argparse
import sys

BENCHMARKS = {"data": "minisora.bench.data", "train": "minisora.bench.train", "sample": "minisora.bench.sample",
              "vae": "minisora.bench.vae", "budget": "minisora.bench.budget", "cache": "minisora.bench.cache",
              "latte": "minisora.bench.latte", "all": "minisora.bench.all"}  # fmt: skip


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    module = BENCHMARKS.get(args.what)
    if module is None:
        print(f"unknown benchmark {args.what!r}; choose from: {', '.join(BENCHMARKS)} (runs that train models are "
              "scripts in experiments/)", file=sys.stderr)  # fmt: skip
        return 2
    sys.argv = [module, *args.rest]
    runpy.run_module(module, run_name="__main__")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHMARKS)} (runs that train models: experiments/)")
    p.add_argument("what", help=f"which benchmark: {', '.join(BENCHMARKS)}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_bench)
