"""The one DataLoader builder: whole one-bucket batches chosen by BucketBatchSampler, for every stage.

The autoencoder's video loader, the loader that encodes the latent cache and the DiT's latent loader all
come from `make_loader`: a BucketBatches dataset (one dataset per bucket; fixed size is one bucket), the
resumable sampler, and the worker settings of a LoaderOptions. Here too: what to tell a user when a
worker dies or hangs, and the SIGCHLD handler Lightning's teardown removes.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

from minisora.data.bucket_sampler import BucketBatches, BucketBatchSampler
from minisora.data.buckets import Bucket


@dataclass
class LoaderOptions:
    """Worker settings of a DataModule's loaders (the `data` / `latents` config keys of the same names)."""

    num_workers: int = 0
    timeout: float = 0.0  # seconds a worker may take per batch; a hung decoder becomes an error, not a stall
    pin_memory: bool = False  # only where CUDA is available
    seed: int = 0
    persistent_workers: bool = True
    # One generator for every loader built from these options: the workers' base seeds (hence random clip
    # positions and crops) repeat for a seed, and a rebuilt loader continues the sequence instead of repeating it.
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.timeout < 0:
            raise ValueError(f"need num_workers >= 0 and timeout >= 0, got {self.num_workers} and {self.timeout}")
        self.generator = torch.Generator().manual_seed(self.seed)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch  # the dataset already built the batch (module level: picklable for worker processes)


def make_loader(
    data: BucketBatches, buckets: Sequence[Bucket], plan, batch_size: int, *, train: bool, options: LoaderOptions,
    trainer=None, drop_last: bool = False,
) -> DataLoader:  # fmt: skip
    """Batches of one bucket each, `plan.batch_sizes` clips (token-scaled for bucket sets, `batch_size` for one size).

    train: shuffled per epoch, with the plan's image_fraction and `drop_last` (BucketBatchSampler); with a
    `trainer`, this rank's share, resuming where the run is. Otherwise (validation, cache encoding): every
    item in order, in one process.
    """
    trainer = trainer if train else None
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = BucketBatchSampler(
        [len(d) for d in data.datasets], plan.batch_sizes(buckets, batch_size), shuffle=train, seed=options.seed,
        rank=rank, world_size=world, is_image=[b.is_image for b in buckets], image_fraction=plan.image_fraction,
        drop_last=drop_last,
    )  # fmt: skip
    if train:
        resume_position(sampler, trainer)
    workers = options.num_workers > 0
    if workers:
        rearm_worker_failure_handler()
    return DataLoader(
        data, sampler=sampler, batch_size=None, collate_fn=_as_is, num_workers=options.num_workers,
        persistent_workers=options.persistent_workers and workers, generator=options.generator,
        pin_memory=options.pin_memory and torch.cuda.is_available(), timeout=options.timeout if workers else 0,
    )  # fmt: skip


def resume_position(sampler: BucketBatchSampler, trainer) -> None:
    """Point the sampler at the batch a resumed run continues from (global step x gradient accumulation)."""
    per_epoch = len(sampler)
    if trainer is not None and trainer.global_step > 0 and per_epoch > 0:
        done = trainer.global_step * trainer.accumulate_grad_batches
        sampler.epoch, sampler.start = divmod(done, per_epoch)


def rearm_worker_failure_handler() -> None:
    """Let PyTorch reinstall its SIGCHLD handler (instant notice of a dead DataLoader worker) if a past fit removed it.

    Lightning saves every signal handler when a fit starts and restores them all when it ends, so after a
    fit that started workers SIGCHLD is back at its default while PyTorch still believes its handler is
    installed. In any later fit or loader of the process (`minisora train` fits the VAE, then encodes the
    latent cache and fits the DiT) a killed worker then went unnoticed until the loader's `timeout`:
    30 s instead of 0.1 s in tests/test_data_faults.py. make_loader calls this before every loader with workers.
    """
    lost = signal.getsignal(signal.SIGCHLD) in (signal.SIG_DFL, None)
    if lost and getattr(signal_handling, "_SIGCHLD_handler_set", False):
        signal_handling._SIGCHLD_handler_set = False  # the next worker iterator installs the handler again


def loader_failure_hint(exception: BaseException, timeout: float) -> str | None:
    """What to do about PyTorch's terse "DataLoader timed out" / "worker exited unexpectedly" errors; None for others."""
    message = str(exception) if isinstance(exception, RuntimeError) else ""
    if message.startswith("DataLoader timed out"):
        return (
            f"a DataLoader worker produced no batch within timeout={timeout:g} s: a decoder stuck on a file or "
            "stalled storage. num_workers=0 loads in the main process and shows where it hangs; raise the "
            "data `timeout` if the storage is just slow."
        )
    if message.startswith("DataLoader worker") and ("exited unexpectedly" in message or "killed by signal" in message):
        return (
            "a DataLoader worker process died. Killed (SIGKILL) usually means the kernel's out-of-memory killer: "
            "use fewer num_workers or a smaller batch_size. num_workers=0 loads in the main process and shows "
            "a Python traceback if it is a crash."
        )
    return None
