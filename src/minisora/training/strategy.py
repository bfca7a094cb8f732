"""Lightning strategies from the config: one device, DDP, or FSDP (torch's fully_shard, DiT blocks as units).

The same code runs under `minisora train` on one machine (Lightning starts the other processes),
`torchrun`, or SLURM `srun`: Lightning's cluster environments read the rank variables each launcher sets.
Every strategy writes one full checkpoint file through SafeCheckpointIO, so a run resumes, samples and
exports on any number of devices.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy

from minisora.training.checkpoint_io import SafeCheckpointIO

STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "fsdp")
NOT_SUPPORTED = {  # name prefix -> why
    "deepspeed": "DeepSpeed writes checkpoints as folders of shards, which resume, sampling and export do not read",
    "fsdp_": "Lightning's FSDPStrategy (FSDP1) flattens the model and its EMA copy into different shards",
}


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every process: each parameter split along its first dimension (torch fully_shard).

    The LightningModule calls `shard(module)` in configure_model for each module to shard: its `units`
    (whole transformer blocks) become FSDP units, then the module itself. Two modules of one architecture
    sharded this way hold the same slices of every tensor on each rank, so an EMA copy sharded alongside
    its model updates from local shards alone. Checkpoints are one full state dict gathered to rank 0.
    """

    def __init__(self, units: set[type[nn.Module]] | None = None):
        super().__init__(save_distributed_checkpoint=False)
        self.units = tuple(units or ())
        self.checkpoint_io = SafeCheckpointIO()

    def setup_environment(self) -> None:
        # One data-parallel axis over all processes: FSDP alone, no tensor parallelism.
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def shard(self, module: nn.Module) -> nn.Module:
        """Make every `units` block of `module`, then `module`, an FSDP unit on the data-parallel mesh."""
        from torch.distributed.fsdp import fully_shard

        # VideoDiT returns a view (its output cropped in time); FSDP2 warns in case the caller modifies it in
        # place. The loss does not: the 2-process test matches one process's weights and gradients.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
        mesh = self.device_mesh["data_parallel"]
        for block in module.modules():
            if isinstance(block, self.units):
                fully_shard(block, mesh=mesh)
        return fully_shard(module, mesh=mesh)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Tensors and plain containers only, as SafeCheckpointIO loads them: resume cannot run code.
        return super().load_checkpoint(checkpoint_path, weights_only=True if weights_only is None else weights_only)


def build_strategy(
    name: str,
    options: dict[str, Any] | None = None,
    wrap: set[type[nn.Module]] | None = None,
    find_unused: bool = False,
    section: str = "trainer",
) -> str | Strategy:
    """A Strategy (or a name Lightning resolves) for `<section>.strategy` + `<section>.strategy_options`.

    `wrap` is the set of block classes FSDP shards as units; None for a model that is not sharded (the
    autoencoder), which refuses fsdp. `find_unused` is for models with parameters a step may not touch (a
    GAN discriminator before it starts).
    """
    opts = dict(options or {})
    if name not in STRATEGIES:
        why = next((why for prefix, why in NOT_SUPPORTED.items() if name.startswith(prefix)), "not one minisora runs")
        raise ValueError(f"{section}.strategy={name!r} is not supported: {why}; use {section}.strategy=ddp "
                         f"(a model that fits one GPU) or fsdp (shards the DiT across GPUs); valid: "
                         f"{', '.join(STRATEGIES)}")  # fmt: skip
    if name in ("ddp", "ddp_find_unused_parameters_true"):
        opts.setdefault("find_unused_parameters", find_unused or name.endswith("_true"))
        return DDPStrategy(checkpoint_io=SafeCheckpointIO(), **opts)
    if name == "fsdp":
        if not wrap:
            raise ValueError(f"{section}.strategy='fsdp' shards a model's transformer blocks and this model (the "
                             f"autoencoder) has none: use {section}.strategy=ddp")  # fmt: skip
        if opts:
            raise ValueError(f"{section}.strategy_options={opts}: fsdp takes none (every DiT block is an FSDP unit, "
                             "resharded after forward); activation checkpointing is model.grad_checkpointing=true")
        return ShardedStrategy(wrap)
    if opts:
        raise ValueError(f"{section}.strategy_options is only read for ddp, not {name!r}: {opts}")
    return name  # "auto": one device (Lightning's SingleDeviceStrategy), or DDP when devices > 1


def uses_checkpoint_io(strategy: str | Strategy) -> bool:
    """Whether SafeCheckpointIO must be passed as a Trainer plugin (strategies built here carry their own)."""
    return isinstance(strategy, str)
