"""`minisora import-vae`: a pretrained diffusers autoencoder (pretrained_vae) written as a minisora file."""

from __future__ import annotations

import argparse
import sys

from minisora.cli.common import add_config_args, load


def cmd_import_vae(args: argparse.Namespace) -> int:
    from minisora.config import ConfigError, kwargs
    from minisora.models.diffusers_vae import save_pretrained_vae
    from minisora.training.run import vae_path

    cfg = load(args)
    if cfg.pretrained_vae is None:
        raise ConfigError(f"{args.config}: pretrained_vae is not set (see configs/vae/ltx.yaml, wan.yaml, sd.yaml)")
    try:
        out = save_pretrained_vae(args.out or vae_path(cfg), **kwargs(cfg.pretrained_vae))
    except (ImportError, ValueError, OSError) as e:  # diffusers missing, a bad kind/dtype, no such repo or folder
        print(f"minisora import-vae: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: the {cfg.pretrained_vae.kind} autoencoder {cfg.pretrained_vae.path}; runs use it with vae_weights={out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("import-vae", help="write a pretrained diffusers autoencoder (pretrained_vae) as a minisora file")
    add_config_args(p, "configs/vae/ltx.yaml")
    p.add_argument("--out", help="autoencoder .safetensors to write (default: the config's run, vae/vae.safetensors)")
    p.set_defaults(func=cmd_import_vae)
