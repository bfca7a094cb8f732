"""`minisora <command> ...` with a callback that records, per rank, the cache rows of every training batch.

Used by test_distributed.py: Lightning's DDP launcher re-runs this same script for ranks 1.., so every
rank records. Writes <RECORD_DIR>/<tag>-rank<r>-start.json ({"step": the step training starts from}) when
training starts, and <RECORD_DIR>/<tag>-rank<r>.json ({"world": W, "batches": [[rows], ...], "steps": N}) at
its end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L

from minisora.training import run


class RecordBatches(L.Callback):
    def __init__(self, out: Path, tag: str):
        self.out, self.tag, self.batches = out, tag, []

    def on_train_start(self, trainer, pl_module) -> None:
        start = {"step": trainer.global_step}
        (self.out / f"{self.tag}-rank{trainer.global_rank}-start.json").write_text(json.dumps(start))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "index" in batch:  # cache rows; with buckets "<bucket>:<row>" (rows count within a bucket)
            rows = batch["index"].tolist()
            self.batches.append([f"{batch['bucket']}:{i}" for i in rows] if "bucket" in batch else rows)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"world": trainer.world_size, "batches": self.batches, "steps": trainer.global_step}
        (self.out / f"{self.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def install() -> None:
    """Make every Trainer the pipeline builds record its batches (for this process)."""
    build = run.build_trainer

    def build_trainer(tcfg, folder, callbacks, tag, **kw):
        return build(tcfg, folder, [*callbacks, RecordBatches(Path(os.environ["RECORD_DIR"]), tag)], tag, **kw)

    run.build_trainer = build_trainer


if __name__ == "__main__":
    from minisora.cli import main

    install()
    sys.exit(main(sys.argv[1:]))
