"""The trainer every run uses (training.run.build_trainer): periodic checkpoints land where asked, the final step is
always saved, and resume takes the newest complete checkpoint."""

import shutil
from pathlib import Path

import pytest
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


def test_the_final_step_is_saved_when_max_steps_is_not_a_multiple_of_checkpoint_every(tmp_path):
    # Lightning saved at 3 only: a 5-step run's newest checkpoint (last.ckpt included) held step 3.
    cfg = load_config(ROOT / "configs/shapes.yaml", ["trainer.max_steps=5", "trainer.checkpoint_every=3",
                                                     "trainer.enable_progress_bar=false"])  # fmt: skip
    torch.manual_seed(0)
    build_trainer(cfg.trainer, tmp_path, [], tag="t").fit(TwoBatchEpochs())
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step-000003.ckpt", "step-000005.ckpt"]
    steps = {p.name: torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in ckpts.glob("*.ckpt")}
    assert steps == {"last.ckpt": 5, "step-000003.ckpt": 3, "step-000005.ckpt": 5}
    # A rerun of the finished run resumes at its end: no step, no checkpoint rewritten.
    written = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    trainer = build_trainer(cfg.trainer, tmp_path, [], tag="t")
    trainer.fit(TwoBatchEpochs(), ckpt_path=str(ckpts / "last.ckpt"))
    assert trainer.global_step == 5 and {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == written


def test_resume_falls_back_past_a_corrupt_last_checkpoint(tmp_path):
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
    with pytest.warns(UserWarning, match="last.ckpt is incomplete or corrupt"):
        assert last_checkpoint(tmp_path) == ckpts / "step-000006.ckpt"
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF  # one corrupted byte inside the stored tensor data: only the CRC sees it
    (ckpts / "step-000006.ckpt").write_bytes(bytes(flipped))
    with pytest.warns(UserWarning) as warned:
        assert last_checkpoint(tmp_path) == ckpts / "step-000004.ckpt"
    messages = " ".join(str(w.message) for w in warned)
    assert "last.ckpt is incomplete or corrupt" in messages and "step-000006.ckpt is incomplete or corrupt" in messages


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


def test_each_stage_ends_in_a_checkpoint_and_a_finished_run_reruns_without_training(tmp_path_factory, tmp_path,
                                                                                    monkeypatch, capsys):
    from minisora.checkpoint import checkpoint_step
    from minisora.training.run import load_or_train_vae, train_dit
    from tiny_run import TINY_RUN, build_tiny_run

    root = build_tiny_run(tmp_path_factory)
    # The tiny run's VAE stage: 2 steps with checkpoint_every=500, so only the end-of-stage save holds them.
    vae_ckpts = root / "runs" / "shapes" / "vae" / "checkpoints"
    assert {p.name: checkpoint_step(p) for p in vae_ckpts.glob("*.ckpt")} == {"last.ckpt": 2, "step-000002.ckpt": 2}
    # Its DiT (4 steps, saved at 2 and 4), continued to step 5 with checkpoint_every=3.
    shutil.copytree(root / "runs" / "shapes", tmp_path / "odd", ignore=shutil.ignore_patterns("logs", "samples"))
    monkeypatch.chdir(root)  # the tiny run's data and latent cache
    cfg = load_config(ROOT / "configs/shapes.yaml", [*TINY_RUN, f"run_dir={tmp_path}", "name=odd",
                                                     "trainer.max_steps=5", "trainer.checkpoint_every=3"])  # fmt: skip
    vae = load_or_train_vae(cfg)
    train_dit(cfg, vae)
    ckpts = tmp_path / "odd" / "checkpoints"
    assert "DiT trained to step 5" in capsys.readouterr().out
    assert checkpoint_step(ckpts / "last.ckpt") == checkpoint_step(ckpts / "step-000005.ckpt") == 5
    # A rerun resumes at the end and trains nothing, also when last.ckpt was damaged meanwhile (it takes step 5's file).
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    written = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    with pytest.warns(UserWarning, match="last.ckpt is incomplete or corrupt"):
        train_dit(cfg, vae)
    out = capsys.readouterr().out
    assert f"resuming from {ckpts / 'step-000005.ckpt'}" in out and "DiT trained to step 5" in out
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == written  # no step, no checkpoint written
