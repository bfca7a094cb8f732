"""`minisora train`, `train-vae`, `cache` and `vae-stats`: the stages of a run, from a config."""

from __future__ import annotations

import argparse

from minisora.cli.common import add_config_args, load


def cmd_train(args: argparse.Namespace) -> int:
    from minisora.training.run import run_pipeline

    run_pipeline(load(args))
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    from minisora.training.run import train_vae

    train_vae(load(args))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from minisora.training.run import cache_latents

    cache_latents(load(args))
    return 0


def cmd_vae_stats(args: argparse.Namespace) -> int:
    from minisora.training.run import vae_stats

    vae_stats(load(args), args.vae, args.batches)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="full pipeline: data -> VAE -> latent cache -> DiT -> samples")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-vae", help="train (or resume) the video autoencoder")
    add_config_args(p, "configs/vae/shapes.yaml")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("vae-stats", help="re-estimate an autoencoder's latent shift/scale on the config's data")
    add_config_args(p)
    p.add_argument("--vae", help="autoencoder .safetensors to update (default: the config's run)")
    p.add_argument("--batches", type=int, help="batches to average over (default: vae_train.latent_stats_batches)")
    p.set_defaults(func=cmd_vae_stats)

    p = sub.add_parser("cache", help="encode the dataset once into the latent cache (VAE + text encoder)")
    add_config_args(p)
    p.set_defaults(func=cmd_cache)
