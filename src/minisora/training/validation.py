"""Validation loss on a fixed grid of t with fixed noise per clip: a curve that moves only when the model does.

A validation loss drawn like the training loss (random t, random noise) swings by more than a late model
improves, and its draw depends on batch order and rank. Here every held-out clip is scored at the same
`points` timesteps, t_k = (k + 1/2) / points (midpoints: each quarter of [0, 1] gets points / 4 of them), with
noise seeded by (seed, clip, k) alone: two evaluations of the same weights give the same number bit for bit,
whatever the batch order, batch size or number of ranks (diffusion-pipe's eval discipline). The best
checkpoint by this loss is kept as checkpoints/best.ckpt (best_checkpoint_callback).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minisora import diffusion

QUARTERS = 4  # val/loss_q1 .. val/loss_q4: t in [0, 1/4) (nearly clean) .. [3/4, 1] (nearly noise)
MONITOR = "val/loss"
BEST = "best"  # checkpoints/best.ckpt


def t_grid(points: int) -> torch.Tensor:
    """The validation timesteps (points,): midpoints of `points` equal parts of [0, 1]."""
    if points < QUARTERS or points % QUARTERS:
        raise ValueError(f"dit_train.val_t_points must be a positive multiple of {QUARTERS} (one or more per "
                         f"quarter of t), got {points}")  # fmt: skip
    return (torch.arange(points, dtype=torch.float64) + 0.5) / points


def clip_ids(batch: dict) -> list[tuple[int, ...]]:
    """Each clip's identity in the latent cache: (t, h, w) of its bucket and its row there (batch["index"])."""
    if "index" not in batch:
        raise ValueError("validation needs batch['index'] (each clip's row in the latent cache, as LatentDataModule "
                         f"batches hold); this batch has {sorted(batch)}")  # fmt: skip
    shape = tuple(int(s) for s in batch["latents"].shape[2:])
    return [(*shape, int(i)) for i in batch["index"]]


def clip_seed(seed: int, clip: tuple[int, ...], k: int) -> int:
    """A 63-bit generator seed from (seed, clip, grid point) alone: the same on every run, rank and process."""
    digest = hashlib.blake2b(repr((seed, clip, k)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def fixed_noise(x0: torch.Tensor, ids: list[tuple[int, ...]], seed: int, k: int) -> torch.Tensor:
    """Noise like x0 (B, ...) for grid point k: drawn on the CPU per clip, so every device gets the same values."""
    noise = [torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(clip_seed(seed, c, k))) for c in ids]
    return torch.stack(noise).to(device=x0.device, dtype=x0.dtype)  # (B, ...)


@torch.no_grad()
def grid_losses(model: Callable, x0: torch.Tensor, ids: list[tuple[int, ...]], *, points: int, seed: int,
                prediction: str, **cond) -> torch.Tensor:
    """Flow losses (B, points) of clips x0 (B, C, t, h, w) at every grid timestep, one model call per timestep."""
    B = x0.shape[0]
    losses = []
    for k, t in enumerate(t_grid(points).tolist()):
        tk = torch.full((B,), t, device=x0.device)
        losses.append(diffusion.flow_loss(model, x0, tk, fixed_noise(x0, ids, seed, k), prediction=prediction, **cond))
    return torch.stack(losses, dim=1)  # (B, points)


def quarter_means(losses: torch.Tensor) -> list[torch.Tensor]:
    """Mean loss (scalar) per quarter of t from grid losses (B, points); grid points are in increasing t."""
    return [q.mean() for q in losses.chunk(QUARTERS, dim=1)]


def best_checkpoint_callback(folder: Path) -> ModelCheckpoint:
    """Keeps <folder>/checkpoints/best.ckpt: the weights with the lowest val/loss so far (saved after validation)."""
    return ModelCheckpoint(
        dirpath=folder / "checkpoints", filename=BEST, monitor=MONITOR, mode="min", save_top_k=1, save_last=False,
        auto_insert_metric_name=False, enable_version_counter=False,  # one file, replaced when the loss improves
        save_on_train_epoch_end=False,  # after validation, where val/loss is fresh
    )  # fmt: skip
