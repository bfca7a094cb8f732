"""Lightning strategies from the config: one GPU, DDP, FSDP (DiT blocks as wrap units) or DeepSpeed ZeRO-2.

The same code runs under `minisora train` on one machine (Lightning starts the other processes),
`torchrun`, or SLURM `srun`: Lightning's cluster environments read the rank variables each launcher sets.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from minisora.training.checkpoint_io import SafeCheckpointIO


def build_strategy(
    name: str, options: dict[str, Any] | None = None, wrap: set[type[nn.Module]] | None = None, find_unused: bool = False
) -> str | Strategy:
    """A Strategy (or a name Lightning resolves) for `trainer.strategy` + `trainer.strategy_options`.

    `wrap` is the set of block classes FSDP shards as units (and checkpoints, with
    `activation_checkpointing: true`): whole transformer blocks, the granularity FSDP is designed for.
    `find_unused` is for models with parameters a step may not touch (a GAN discriminator before it starts).
    """
    opts = dict(options or {})
    if name in ("ddp", "ddp_find_unused_parameters_true"):
        opts.setdefault("find_unused_parameters", find_unused or name.endswith("_true"))
        return DDPStrategy(checkpoint_io=SafeCheckpointIO(), **opts)
    if name == "fsdp":
        if opts.pop("activation_checkpointing", False) and wrap:
            opts["activation_checkpointing_policy"] = set(wrap)
        opts.setdefault("auto_wrap_policy", set(wrap) if wrap else None)
        # One full state dict written by rank 0: the file resumes on any number of GPUs, or none.
        opts.setdefault("state_dict_type", "full")
        return FSDPStrategy(checkpoint_io=SafeCheckpointIO(), **opts)
    if name.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                f"trainer.strategy={name!r} needs DeepSpeed, which is not installed: `.venv/bin/pip install deepspeed` "
                "(CUDA only), or use trainer.strategy=ddp or fsdp"
            )
        if opts:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            stage = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}.get(name, 2)
            return DeepSpeedStrategy(stage=stage, **opts)
        return name  # DeepSpeed writes its own checkpoint folders; Lightning's registry configures it
    if opts:
        raise ValueError(f"trainer.strategy_options is only read for ddp, fsdp and deepspeed, not {name!r}: {opts}")
    if name == "auto":
        return "auto"  # one device: Lightning's SingleDeviceStrategy; the plugin below gives it SafeCheckpointIO
    return name  # any other Lightning strategy name (e.g. ddp_spawn): Lightning validates it


def uses_checkpoint_io(strategy: str | Strategy) -> bool:
    """Whether SafeCheckpointIO must be passed as a Trainer plugin (strategies built here carry their own)."""
    return isinstance(strategy, str) and not strategy.startswith("deepspeed")
