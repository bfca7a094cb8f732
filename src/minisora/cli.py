"""The `minisora` command: train, train-vae, make-shapes, bench, config, ..."""

from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "configs/shapes.yaml"


def _add_config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG) -> None:
    p.add_argument("--config", default=default, help=f"experiment YAML (default: {default})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=100")


def cmd_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from minisora.config import load_config

    print(OmegaConf.to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from minisora.data.shapes import make_shapes

    manifest = make_shapes(
        args.out, num=args.num, seed=args.seed, size=args.size, num_frames=args.frames, fps=args.fps
    )
    print(f"wrote {args.num} clips and {manifest}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from minisora.config import load_config
    from minisora.training.run import run_pipeline

    run_pipeline(load_config(args.config, args.overrides))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from minisora.config import load_config
    from minisora.training.run import cache_latents

    cache_latents(load_config(args.config, args.overrides))
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    from minisora.config import load_config
    from minisora.training.run import train_vae

    train_vae(load_config(args.config, args.overrides))
    return 0


def cmd_vae_stats(args: argparse.Namespace) -> int:
    from minisora.config import load_config
    from minisora.training.run import vae_stats

    vae_stats(load_config(args.config, args.overrides), args.vae, args.batches)
    return 0


def cmd_import_vae(args: argparse.Namespace) -> int:
    from minisora.config import ConfigError, kwargs, load_config
    from minisora.models.diffusers_vae import save_pretrained_vae
    from minisora.training.run import vae_path

    cfg = load_config(args.config, args.overrides)
    if cfg.pretrained_vae is None:
        raise ConfigError(f"{args.config}: pretrained_vae is not set (see configs/vae/ltx.yaml, wan.yaml, sd.yaml)")
    try:
        out = save_pretrained_vae(args.out or vae_path(cfg), **kwargs(cfg.pretrained_vae))
    except (ImportError, ValueError, OSError) as e:  # diffusers missing, a bad kind/dtype, no such repo or folder
        print(f"minisora import-vae: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: the {cfg.pretrained_vae.kind} autoencoder {cfg.pretrained_vae.path}; runs use it with vae_weights={out}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    import json

    from minisora.config import load_config
    from minisora.data.buckets import BucketError
    from minisora.data.stats import data_stats, format_stats
    from minisora.sample import plain_warnings
    from minisora.training.run import ensure_data

    cfg = load_config(args.config, args.overrides)
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


def _user_errors(command: str, fn, args: argparse.Namespace) -> int:
    """Run a sample/export command; bad input (a ValueError naming the file or option) is one line, exit code 2."""
    from minisora.sample import plain_warnings

    try:
        with plain_warnings(command):
            fn(args)
    except ValueError as e:  # CheckpointError, SampleError, MediaError, ConfigError and the pipeline's checks
        print(f"minisora {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from minisora.sample import run_sample

    return _user_errors("sample", run_sample, args)


def cmd_export(args: argparse.Namespace) -> int:
    from minisora.sample import run_export

    return _user_errors("export", run_export, args)


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from minisora.sample import run_merge_lora

    return _user_errors("merge-lora", run_merge_lora, args)


def cmd_eval(args: argparse.Namespace) -> int:
    from minisora.eval.run_eval import run_eval

    return _user_errors("eval", run_eval, args)


def cmd_plan(args: argparse.Namespace) -> int:
    from minisora.plan_report import run_plan

    return _user_errors("plan", run_plan, args)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minisora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="full pipeline: data -> VAE -> latent cache -> DiT -> samples")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-vae", help="train (or resume) the video autoencoder")
    _add_config_args(p, "configs/vae/shapes.yaml")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("vae-stats", help="re-estimate an autoencoder's latent shift/scale on the config's data")
    _add_config_args(p)
    p.add_argument("--vae", help="autoencoder .safetensors to update (default: the config's run)")
    p.add_argument("--batches", type=int, help="batches to average over (default: vae_train.latent_stats_batches)")
    p.set_defaults(func=cmd_vae_stats)

    p = sub.add_parser("import-vae", help="write a pretrained diffusers autoencoder (pretrained_vae) as a minisora file")
    _add_config_args(p, "configs/vae/ltx.yaml")
    p.add_argument("--out", help="autoencoder .safetensors to write (default: the config's run, vae/vae.safetensors)")
    p.set_defaults(func=cmd_import_vae)

    p = sub.add_parser("cache", help="encode the dataset once into the latent cache (VAE + text encoder)")
    _add_config_args(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("data-stats", help="clips per bucket, skipped files and why, token histogram (before training)")
    _add_config_args(p)
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

    p = sub.add_parser("config", help="print the fully resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    from minisora.sample import add_export_args, add_merge_lora_args, add_sample_args

    p = sub.add_parser("sample", help="sample videos from a checkpoint, run folder or exported folder")
    add_sample_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="export a checkpoint to safetensors + config.yaml (no Lightning, no pickle)")
    add_export_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base: an exported folder with merged weights")
    add_merge_lora_args(p)
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("plan", help="predict peak GPU memory of training and sampling; --tokens: token budget "
                       "table; --hours: GPU-hours of a recipe")
    from minisora.plan_report import add_plan_args

    add_plan_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="FVD and CLIP score of a model's samples (or a folder of videos) vs real clips")
    from minisora.eval.run_eval import add_eval_args

    add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHMARKS)} (runs that train models: experiments/)")
    p.add_argument("what", help=f"which benchmark: {', '.join(BENCHMARKS)}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=cmd_bench)
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


if __name__ == "__main__":
    sys.exit(main())
