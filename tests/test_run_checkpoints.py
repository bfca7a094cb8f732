"""The trainer every run uses (training.run.build_trainer): periodic checkpoints land where asked."""

from pathlib import Path

import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from minisora.config import load_config
from minisora.training.run import build_trainer

ROOT = Path(__file__).resolve().parents[1]


class TwoBatchEpochs(BoringModel):
    """Epochs of 2 batches: every even step is an epoch's last batch."""

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 4), batch_size=2)

    def val_dataloader(self):
        return DataLoader(RandomDataset(32, 2), batch_size=2)


def test_every_n_steps_checkpoints_at_epoch_ends_without_validation_after_them(tmp_path):
    # Lightning 2.6 deferred these saves to a validation that, with step-based validation, never came.
    overrides = ["trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.val_check_interval=100",
                 "trainer.enable_progress_bar=false"]  # fmt: skip
    cfg = load_config(ROOT / "configs/shapes.yaml", overrides)
    torch.manual_seed(0)
    trainer = build_trainer(cfg.trainer, tmp_path, [], tag="t")
    trainer.fit(TwoBatchEpochs())
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert saved == ["last.ckpt", "step-000004.ckpt", "step-000006.ckpt"]  # the two newest are kept
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6


def test_resume_falls_back_past_a_corrupt_last_checkpoint(tmp_path, capsys):
    from minisora.training.run import last_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert last_checkpoint(tmp_path) is None
    for step in (4, 6):
        torch.save({"global_step": step, "w": torch.randn(1000)}, ckpts / f"step-{step:06d}.ckpt")
    good = (ckpts / "step-000006.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(good)
    assert last_checkpoint(tmp_path) == ckpts / "last.ckpt"
    (ckpts / "last.ckpt").write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    assert last_checkpoint(tmp_path) == ckpts / "step-000006.ckpt"
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF  # one corrupted byte inside the stored tensor data
    (ckpts / "step-000006.ckpt").write_bytes(bytes(flipped))
    assert last_checkpoint(tmp_path) == ckpts / "step-000004.ckpt"
    out = capsys.readouterr().out
    assert "last.ckpt is incomplete or corrupt" in out and "step-000006.ckpt is incomplete or corrupt" in out


def test_resume_takes_the_newest_complete_step_when_last_was_not_replaced(tmp_path):
    # A kill after step-8.ckpt was written but before last.ckpt was replaced: step 8 lives only in its file.
    from minisora.training.run import last_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step, name in ((6, "step-000006.ckpt"), (6, "last.ckpt"), (8, "step-000008.ckpt")):
        torch.save({"global_step": step, "w": torch.randn(100)}, ckpts / name)
    assert last_checkpoint(tmp_path) == ckpts / "step-000008.ckpt"
    torch.save({"global_step": 8, "w": torch.randn(100)}, ckpts / "last.ckpt")
    assert last_checkpoint(tmp_path) == ckpts / "last.ckpt"  # a tie goes to last.ckpt
    stale = ckpts / f".last.ckpt@{__import__('socket').gethostname()}-999999999.partial"
    stale.write_bytes(b"half a checkpoint")
    assert last_checkpoint(tmp_path) == ckpts / "last.ckpt" and not stale.exists()  # a dead writer's partial goes
