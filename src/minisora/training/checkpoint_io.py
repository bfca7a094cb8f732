"""Checkpoint files: when they are written (StepCheckpoint) and how (SafeCheckpointIO, surviving a kill, a crash
or a full disk).

Lightning's TorchCheckpointIO writes through an fsspec transaction whose temporary file lives in the
system temp folder (often another filesystem, e.g. a tmpfs /tmp): the final "rename" is then a copy, and a
kill during that copy leaves a truncated checkpoint under the real name. Here the bytes go to a hidden
partial file beside the target (minisora.files), are fsynced, and replace the target with os.replace, which
is atomic on POSIX: the file under the real name is always the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from minisora.files import partial_path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested checkpoint dict: the bulk of what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after os.replace could otherwise undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic checkpoint writes with a free-space check; loads with weights_only=True.

    Before writing, the free space of the target's filesystem is compared with the checkpoint's tensor
    bytes times `margin`: when short (or when the disk fills during the write), the write is skipped with
    a warning and the previous checkpoint stays, so a full disk costs checkpoints, never the run or its
    last good state.
    """

    def __init__(self, margin: float = 1.1, reserve_mb: float = 16.0):
        super().__init__()
        if margin < 1 or reserve_mb < 0:
            raise ValueError(f"need margin >= 1 and reserve_mb >= 0, got {margin}, {reserve_mb}")
        self.margin, self.reserve = margin, int(reserve_mb * 2**20)
        self.skipped: list[str] = []  # checkpoint paths not written for lack of space

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        need = int(tensor_bytes(checkpoint) * self.margin) + self.reserve
        free = shutil.disk_usage(path.parent).free
        if free < need:
            return self._skip(path, f"{free / 2**20:.0f} MiB free, about {need / 2**20:.0f} MiB needed")
        tmp = partial_path(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            return self._skip(path, f"the disk filled during the write ({e.strerror})")
        finally:
            tmp.unlink(missing_ok=True)

    def _skip(self, path: Path, why: str) -> None:
        self.skipped.append(str(path))
        kept = "the previous file is kept" if path.exists() else "earlier checkpoints are kept"
        rank_zero_warn(f"checkpoint {path} not written: {why} in {path.parent}; {kept}. Free some space.")

    def load_checkpoint(
        self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Tensors and plain containers only: a checkpoint from a stranger cannot run code on load.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint every `every_n_train_steps` steps and at the step training ends, whatever max_steps is.

    Lightning's saves only at multiples of every_n_train_steps, so a 150-step run saving every 7 steps ended
    with step 147 as its newest checkpoint (last.ckpt included): resume, fine-tuning and sampling started 3
    steps back. The final save goes through the same top-k and last.ckpt machinery as the periodic ones.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # A resumed run's start step is already on disk (it was resumed from): a finished run rerun saves nothing.
        self._last_global_step_saved = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        # Replaces Lightning's, which only writes last.ckpt when no checkpoint was saved at all.
        if not self._should_skip_saving_checkpoint(trainer):  # skipped when this step is already saved
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
