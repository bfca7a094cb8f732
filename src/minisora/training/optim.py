"""The optimizer and learning-rate schedule of every training stage (autoencoder and DiT): one builder, one key set.

Keys (vae_train.* and dit_train.*): optimizer, lr, weight_decay, betas, warmup_steps, lr_schedule, min_lr_ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

OPTIMIZERS = ("adamw8bit", "adamw")
LR_SCHEDULES = ("constant", "cosine")


def check_optim(optimizer: str, lr_schedule: str, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
    """Reject an unknown optimizer or schedule when the module is built, not at the first step."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}")


def build_optimizer(params: Iterable, name: str, lr: float, weight_decay: float, betas: list[float] | None):
    """AdamW, or AdamW8bit: 2 bytes of state per parameter instead of 8 (bitsandbytes blockwise quantisation).

    `params` may be parameter groups (dicts with their own "lr"), as the autoencoder's discriminator uses.
    """
    betas = tuple(betas) if betas is not None else (0.9, 0.99)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def lr_lambda(warmup_steps: int, lr_schedule: str, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then constant, or cosine decay to min_lr_ratio at total_steps."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def configure_optim(
    module, params: Iterable, *, optimizer: str, lr: float, weight_decay: float, betas: list[float] | None,
    warmup_steps: int, lr_schedule: str, min_lr_ratio: float,
) -> dict[str, Any]:  # fmt: skip
    """What a LightningModule's configure_optimizers returns: the optimizer and its per-step schedule.

    The cosine ends at the trainer's max_steps (its estimated steps when max_steps is unset).
    """
    opt = build_optimizer(params, optimizer, lr, weight_decay, betas)
    trainer = module._trainer
    if trainer is None:
        total = 10**6
    elif trainer.max_steps > 0:
        total = trainer.max_steps
    else:
        total = max(int(trainer.estimated_stepping_batches), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, lr_schedule, total, min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
