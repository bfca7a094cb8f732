"""The `minisora` command: train, train-vae, sample, export, eval, plan, bench, config, ...

One module per command group; each adds its commands with `add_commands(sub)`. Nothing in the library
imports this package.
"""

from __future__ import annotations

import argparse
import sys

from minisora.cli import bench, config, data, import_vae, plan, sample, train
from minisora.cli import eval as evaluate  # not shadowing the builtin

GROUPS = (train, import_vae, data, config, sample, plan, evaluate, bench)  # the order `minisora --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minisora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from minisora.checkpoint import CheckpointError
    from minisora.config import ConfigError
    from minisora.io import MediaError
    from minisora.models.lora import LoraError

    try:
        return args.func(args)
    except (ConfigError, MediaError, CheckpointError, LoraError, FileNotFoundError) as e:
        # A user error: one clear line, no traceback wall.
        print(f"minisora {args.command}: error: {e}", file=sys.stderr)
        return 2
