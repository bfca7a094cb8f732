"""GPU-hours a recipe needs, computed from FLOPs: `minisora bench hours --config configs/experiments/ucf101.yaml`.

Hours = FLOPs / (peak x MFU). FLOPs per stage: the DiT from bench/flops.py's counters (checked against
torch's FlopCounterMode in tests/test_flops.py), the VAE and its discriminator from FlopCounterMode on a
real forward pass of one clip; training = 3 x forward (backward = 2 x forward), plus one more forward of
the DiT blocks under gradient checkpointing. Peaks are the dense bf16 tensor-core peaks in flops.py; MFU
is ASSUMED (20 / 35 / 50%) until `make bench` measures it on a GPU. Computed, not measured.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from minisora.bench.report import write_json

GPUS = ("RTX 4090", "RTX 3090")
MFUS = (0.2, 0.35, 0.5)


def _forward_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def stage_flops(cfg, videos: int, eval_samples: int) -> tuple[dict[str, float], dict[str, float]]:
    """(FLOPs per stage, GFLOPs per clip) of the config's recipe: VAE training, latent cache, DiT training, eval."""
    from minisora.bench.flops import dit_forward_flops, dit_train_step_flops
    from minisora.checkpoint import dit_args
    from minisora.config import kwargs, to_plain
    from minisora.models.autoencoder import VideoVAE
    from minisora.models.dit import VideoDiT
    from minisora.training.lit_autoencoder import PatchDiscriminator

    vae = VideoVAE(**kwargs(cfg.vae))
    dit = VideoDiT(**dit_args(to_plain(cfg), vae.latent_channels, None))
    x = torch.zeros(1, 3, cfg.data.num_frames, cfg.data.height, cfg.data.width)  # one clip (1, 3, T, H, W)
    enc = _forward_flops(lambda: vae.encode(x, tiled=False))
    dec = _forward_flops(lambda: vae.decode(vae.encode(x, tiled=False), tiled=False)) - enc
    gan = _forward_flops(lambda: PatchDiscriminator()(x))
    grid = vae.latent_shape(*x.shape[2:])[1:]  # latent (t, h, w)
    fwd = dit_forward_flops(dit, *grid)["total"]
    step = dit_train_step_flops(dit, *grid, batch=cfg.latents.batch_size, include_recompute=cfg.model.grad_checkpointing)
    vb, vs = cfg.data.batch_size, cfg.vae_trainer.max_steps
    gan_steps = max(0, vs - cfg.vae_train.disc_start) if cfg.vae_train.disc_start >= 0 else 0
    stages = {
        # generator 3x(encode + decode); discriminator on fake for G, and on real + fake for D: 3 x 3 forwards
        "VAE training": vb * (vs * 3 * (enc + dec) + gan_steps * 9 * gan),
        "latent cache": videos * cfg.latents.clips_per_video * enc,
        "DiT training": cfg.trainer.max_steps * step,
        f"eval, {eval_samples} samples": eval_samples * (cfg.sample.steps * 2 * fwd + dec),  # guidance: 2 per step
    }
    stages["total"] = sum(stages.values())
    per_clip = {"vae_encode": enc / 1e9, "vae_decode": dec / 1e9, "discriminator": gan / 1e9, "dit_forward": fwd / 1e9}
    return stages, per_clip


def hours(flops: float, gpu: str, mfu: float) -> float:
    from minisora.bench.flops import gpu_peak_flops

    return flops / (gpu_peak_flops(f"NVIDIA GeForce {gpu}") * mfu) / 3600


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minisora bench hours", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/experiments/ucf101.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--videos", type=int, default=13320, help="videos in the dataset (default: UCF-101's 13,320)")
    p.add_argument("--eval-samples", type=int, default=2048, help="clips sampled for FVD (default 2048)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    from minisora.config import load_config

    cfg = load_config(args.config, args.overrides)
    stages, per_clip = stage_flops(cfg, args.videos, args.eval_samples)
    print("per clip: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} GFLOP" for k, v in per_clip.items()))
    head = " / ".join(f"{m:.0%}" for m in MFUS)
    print(f"| stage | EFLOP | {GPUS[0]} h at MFU {head} | {GPUS[1]} h at 35% |\n|---|---|---|---|")
    table = {}
    for name, f in stages.items():
        h = [hours(f, GPUS[0], m) for m in MFUS]
        table[name] = {"eflop": f / 1e18, GPUS[0]: h, f"{GPUS[1]} at 35%": hours(f, GPUS[1], 0.35)}
        print(f"| {name} | {f / 1e18:.3f} | {' / '.join(f'{x:.1f}' for x in h)} | {table[name][f'{GPUS[1]} at 35%']:.1f} |")
    print("computed from FLOPs with an assumed MFU, not measured")
    write_json(args.json, {"config": args.config, "overrides": args.overrides, "per_clip_gflop": per_clip,
                           "stages": table, "mfu_assumed": list(MFUS)})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
