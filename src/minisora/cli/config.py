"""`minisora config`: print the fully resolved config (schema defaults <- base files <- file <- key=value)."""

from __future__ import annotations

import argparse

from minisora.cli.common import add_config_args, load


def cmd_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(load(args)), end="")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("config", help="print the fully resolved config")
    add_config_args(p)
    p.set_defaults(func=cmd_config)
