"""`minisora data-stats` and `make-shapes`: look at a dataset before training, or write the demo one."""

from __future__ import annotations

import argparse
import sys

from minisora.cli.common import add_config_args, load, plain_warnings


def cmd_data_stats(args: argparse.Namespace) -> int:
    import json

    from minisora.data.buckets import BucketError
    from minisora.data.stats import data_stats, format_stats
    from minisora.training.run import ensure_data

    cfg = load(args)
    ensure_data(cfg)
    try:
        with plain_warnings("data-stats"):  # skipped manifest rows: one line each, not Python's file:line form
            stats = data_stats(cfg)
    except BucketError as e:
        print(f"minisora data-stats: error: {e}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from minisora.data.shapes import make_shapes

    manifest = make_shapes(
        args.out, num=args.num, seed=args.seed, size=args.size, num_frames=args.frames, fps=args.fps
    )
    print(f"wrote {args.num} clips and {manifest}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("data-stats", help="clips per bucket, skipped files and why, token histogram (before training)")
    add_config_args(p)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("make-shapes", help="write the synthetic moving-shapes dataset")
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--fps", type=float, default=8)
    p.set_defaults(func=cmd_make_shapes)
