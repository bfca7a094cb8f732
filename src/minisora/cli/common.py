"""What every `minisora` command shares: --config and key=value arguments, one-line warnings and errors."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator

DEFAULT_CONFIG = "configs/shapes.yaml"


def add_config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG) -> None:
    p.add_argument("--config", default=default, help=f"experiment YAML (default: {default})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=100")


def add_renamed_flag(p: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept a renamed flag only to fail with a message naming its new name (argparse's own error would not)."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{old} was renamed: use {new}")

    p.add_argument(old, action=Renamed, help=argparse.SUPPRESS)


def load(args: argparse.Namespace):
    """The config a command's --config and key=value arguments name."""
    from minisora.config import load_config

    return load_config(args.config, args.overrides)


@contextlib.contextmanager
def plain_warnings(command: str) -> Iterator[None]:
    """Show warnings (sizes rounded, ...) as one line each instead of Python's file:line format."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda msg, *a, **k: print(f"minisora {command}: warning: {msg}", file=sys.stderr)
        yield


def user_errors(command: str, fn: Callable, args: argparse.Namespace) -> int:
    """Run a command; bad input (a ValueError naming the file or option) is one line, exit code 2."""
    try:
        with plain_warnings(command):
            fn(args)
    except ValueError as e:  # CheckpointError, SampleError, MediaError, ConfigError and the pipeline's checks
        print(f"minisora {command}: error: {e}", file=sys.stderr)
        return 2
    return 0
