"""Callbacks Lightning lacks."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class SkippedFilesLogger(L.Callback):
    """Counts the distinct files the data pipeline skipped (batch["skipped"]) per epoch, logs and summarises them.

    Logs `data/skipped_files_{train,val}` each epoch (rank 0's batches) and prints one line naming up
    to `max_named` files with their reasons, so a broken file in a 100k-clip dataset is seen, not
    silently dropped.
    """

    def __init__(self, max_named: int = 3):
        self.max_named = max_named
        self.skipped: dict[str, dict[str, str]] = {"train": {}, "val": {}}  # stage -> path -> reason

    def _collect(self, stage: str, batch) -> None:
        if isinstance(batch, dict):
            for path, reason in batch.get("skipped", ()):
                self.skipped[stage].setdefault(path, reason)

    def _report(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        files = self.skipped[stage]
        # rank_zero_only: each rank sees its own batches; summing ranks would count a file twice.
        pl_module.log(f"data/skipped_files_{stage}", float(len(files)), on_epoch=True, rank_zero_only=True)
        if files:
            named = "; ".join(f"{p} ({why})" for p, why in list(files.items())[: self.max_named])
            more = f"; and {len(files) - self.max_named} more" if len(files) > self.max_named else ""
            rank_zero_info(f"epoch {trainer.current_epoch}: skipped {len(files)} {stage} file(s): {named}{more}")
        files.clear()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.skipped["train"].clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._collect("train", batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report("train", trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.skipped["val"].clear()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect("val", batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._report("val", trainer, pl_module)
