"""Data faults under load: corrupt files, a file deleted mid-run, and dead or hung DataLoader workers.

Each test runs a real Lightning fit (or the latent-cache build) on a folder of tiny generated clips and
asserts that bad data is skipped, counted and named, and that worker failures end the run with a
RuntimeError in bounded time instead of a hang.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerStatus

from minisora.data.clips import ClipDataset, SkippedClipWarning
from minisora.data.datamodule import VideoDataModule
from minisora.data.latent_datamodule import LatentDataModule
from minisora.models.autoencoder import VideoVAE
from minisora.models.text import TextEncoder
from minisora.training.callbacks import SkippedFilesLogger

CLIP = {"num_frames": 5, "height": 16, "width": 16, "crop": "center"}  # 5 = 1 + 4k frames for the tiny VAE
# How each corrupt file's skip reason starts (the reasons are minisora.io's MediaError texts).
BAD_REASONS = {
    "empty.mp4": "file is empty (0 bytes)",
    "garbage.mp4": "not a readable video",  # random bytes
    "notes.mp4": "not a readable video",  # a text file with a video extension
    "truncated.mp4": "not a readable video",  # the first half of an mp4: its index (moov) is at the end
    "audio.mp4": "no video stream (found audio)",
}


@pytest.fixture
def good_clips(tmp_path, make_video):
    """Factory: n coded 8-frame 32x24 clips under data/clips/ -> list of (relative path, caption)."""

    def make(n: int) -> list[tuple[str, str]]:
        rows = []
        for i in range(n):
            make_video(f"data/clips/{i:02d}.mp4", num_frames=8, width=32, height=24, first=10 * i)
            rows.append((f"clips/{i:02d}.mp4", f"clip {i}"))
        return rows

    return make


def write_manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    manifest = folder / "manifest.csv"
    manifest.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return manifest


@pytest.fixture
def faulty_dir(tmp_path, good_clips, bad_media) -> tuple[Path, set[str], set[str]]:
    """data/manifest.csv of 25 clips, 5 of them (20%) corrupt in different ways -> (manifest, good, bad paths)."""
    data = tmp_path / "data"
    good = good_clips(20)
    (data / "bad").mkdir()
    for kind in ("empty", "text", "truncated", "audio_only"):
        src = bad_media[kind]
        (data / "bad" / src.name).write_bytes(src.read_bytes())
    (data / "bad" / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    bad = [(f"bad/{name}", "broken") for name in BAD_REASONS]
    rows = list(good)
    for j, row in enumerate(bad):
        rows.insert(2 + 5 * j, row)  # rows 2, 7, 12, 17, 22 of 25
    manifest = write_manifest(data, rows)
    return manifest, {str(data / p) for p, _ in good}, {str(data / p) for p, _ in bad}


class Recorder(L.LightningModule):
    """A 1x1x1 Conv3d fitted to the clips; records the files each step trained on."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 3, 1)
        self.paths: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.paths.append(list(batch["path"]))
        video = batch["video"]  # (B, 3, T, H, W)
        return (self.conv(video) - video).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(tmp_path: Path, max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip


def skip_reports(caplog) -> dict[int, str]:
    """SkippedFilesLogger's per-epoch summary lines, by epoch."""
    lines = {}
    for record in caplog.records:
        m = re.match(r"epoch (\d+): skipped \d+ train file\(s\): ", record.getMessage())
        if m:
            lines[int(m.group(1))] = record.getMessage()
    return lines


# ---------------------------------------------------------------------------------------------
# 20% corrupt files


def test_training_on_a_fifth_corrupt_files_completes_and_names_every_skipped_file(faulty_dir, tmp_path, caplog):
    manifest, good, bad = faulty_dir
    dm = VideoDataModule(str(manifest), val_fraction=0.0, vae_batch_size=5, num_workers=0, **CLIP)
    model = Recorder()
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[SkippedFilesLogger(max_named=10)])  # 2 epochs of 5
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)

    assert trainer.state.status == TrainerStatus.FINISHED and trainer.global_step == 10
    # A bad file's slot is filled by a readable stand-in: every batch is full, and no bad file is trained on.
    assert [len(p) for p in model.paths] == [5] * 10
    trained = {p for step in model.paths for p in step}
    assert trained == good
    for epoch in (model.paths[:5], model.paths[5:]):  # a stand-in is used once more, never piled up
        counts = Counter(p for step in epoch for p in step)
        assert set(counts) == good and max(counts.values()) == 2 and sum(counts.values()) == 25
    assert trainer.callback_metrics["data/skipped_files_train"].item() == 5
    reports = skip_reports(caplog)
    assert sorted(reports) == [0, 1]
    for line in reports.values():
        assert line.startswith("epoch") and "skipped 5 train file(s)" in line
        for path in bad:
            assert re.search(re.escape(f"{path} ({BAD_REASONS[Path(path).name]}"), line), (path, line)
    # Each bad file is warned about once (in this process), naming it.
    skip_warnings = [str(w.message) for w in caught if issubclass(w.category, SkippedClipWarning)]
    assert sorted(re.match(r"skipping (\S+) ", m).group(1) for m in skip_warnings) == sorted(bad)


def test_latent_cache_over_a_fifth_corrupt_files_lists_exactly_the_corrupt_ones(faulty_dir, tmp_path):
    manifest, good, bad = faulty_dir
    torch.manual_seed(0)
    vae = VideoVAE(latent_channels=4, base_channels=8, channel_multipliers=[1, 2, 2], temporal_compression=4,
                   spatial_compression=4).eval()  # fmt: skip
    text = TextEncoder(model_name="tiny", width=32, layers=1, heads=1, context_length=16)
    video = VideoDataModule(str(manifest), vae_batch_size=4, num_workers=0, **CLIP)
    dm = LatentDataModule(video, vae, text, cache_root=str(tmp_path / "cache"), num_workers=0, encode_batch_size=8)
    with pytest.warns(SkippedClipWarning):
        dm.prepare_data()
    index = json.loads((dm.folder / "buckets.json").read_text())  # the files skipped while encoding are listed here
    assert set(index["skipped"]) == bad
    for path, reason in index["skipped"].items():
        assert reason.startswith(BAD_REASONS[Path(path).name]), (path, reason)
    [bucket] = index["buckets"]
    assert json.loads((dm.folder / bucket["name"] / "index.json").read_text())["latent_shape"] == [4, 2, 4, 4]
    dm.setup("fit")
    captions = {c for batch in dm.train_dataloader() for c in batch["caption"]}
    assert captions <= {f"clip {i}" for i in range(20)}  # no caption of a bad row
    assert len(dm.train_set) + len(dm.val_set or []) == dm.store.count(0) == len(good)  # stand-ins are not cached twice


def test_a_block_of_consecutive_corrupt_files_does_not_overweight_one_clip(tmp_path, good_clips):
    # A corrupt folder sorts together: 6 bad files in a row among 10 good ones.
    data = tmp_path / "data"
    good = good_clips(10)
    bad = []
    for i in range(6):
        (data / "bad").mkdir(exist_ok=True)
        (data / "bad" / f"b{i}.mp4").write_bytes(b"not a video" * (i + 1))
        bad.append((f"bad/b{i}.mp4", "broken"))
    manifest = write_manifest(data, good[:5] + bad + good[5:])
    ds = ClipDataset.from_path(str(manifest), train=False, **CLIP)
    with pytest.warns(SkippedClipWarning):
        items = [ds[i] for i in range(len(ds))]  # one epoch
    counts = Counter(item["path"] for item in items)
    assert set(counts) == {str(data / p) for p, _ in good}
    # Stand-ins are spread (one bad slot needs two steps here); stepping to the next record gave the file
    # after the block 7 of the 16 items.
    assert max(counts.values()) <= 3 and sum(counts.values()) == 16
    assert {p for item in items for p, _ in item["skipped"]} == {str(data / p) for p, _ in bad}


# ---------------------------------------------------------------------------------------------
# A file deleted while training runs


class DeleteAt(L.Callback):
    """Deletes `path` after batch `batch_idx` of epoch 0."""

    def __init__(self, path: str, batch_idx: int):
        self.path, self.batch_idx, self.deleted_at_step = path, batch_idx, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            os.remove(self.path)
            self.deleted_at_step = trainer.global_step


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_file_deleted_during_training_is_skipped_not_fatal(num_workers, tmp_path, good_clips, caplog):
    data = tmp_path / "data"
    manifest = write_manifest(data, good_clips(10))
    victim = str(data / "clips" / "04.mp4")
    dm = VideoDataModule(str(manifest), val_fraction=0.0, vae_batch_size=2, num_workers=num_workers,
                         persistent_workers=True, timeout=60.0, **CLIP)  # fmt: skip
    model, deleter = Recorder(), DeleteAt(victim, batch_idx=1)
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[SkippedFilesLogger(max_named=10), deleter])
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedClipWarning)  # workers warn in their own process
        trainer.fit(model, datamodule=dm)

    assert not os.path.exists(victim) and deleter.deleted_at_step == 2
    assert trainer.state.status == TrainerStatus.FINISHED and trainer.global_step == 10
    assert [len(p) for p in model.paths] == [2] * 10
    epoch1 = {p for step in model.paths[5:] for p in step}
    assert victim not in epoch1 and len(epoch1) == 9  # the other nine files all trained in epoch 1
    line = skip_reports(caplog)[1]
    assert line.startswith("epoch 1: skipped 1 train file(s): ") and victim in line
    assert re.search(r"file not found|No such file", line), line
    assert trainer.callback_metrics["data/skipped_files_train"].item() == 1


# ---------------------------------------------------------------------------------------------
# Dead and hung workers


def _patch_getitem(monkeypatch, index: int, action) -> None:
    """Make DataLoader workers run `action()` when asked for item `index`; the main process is unaffected.

    Patched on the class before the loader exists, so the forked workers inherit it.
    """
    original = ClipDataset.__getitem__

    def getitem(self, i):
        if i == index and torch.utils.data.get_worker_info() is not None:
            action()
        return original(self, i)

    monkeypatch.setattr(ClipDataset, "__getitem__", getitem)


def hint(error: BaseException) -> str:
    """The notes VideoDataModule.on_exception attached (Python >= 3.11; older versions log them instead)."""
    if sys.version_info < (3, 11):
        pytest.skip("exception notes need Python 3.11")
    return "\n".join(getattr(error, "__notes__", []))


def _sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_dying_worker_ends_the_run_at_once_with_a_clear_error(how, monkeypatch, tmp_path, good_clips):
    data = tmp_path / "data"
    manifest = write_manifest(data, good_clips(8))
    dm_args = dict(val_fraction=0.0, vae_batch_size=2, num_workers=2, timeout=30.0, **CLIP)
    # A healthy fit with workers first: Lightning's teardown used to leave PyTorch's SIGCHLD handler
    # uninstalled, so the next fit noticed a dead worker only when `timeout` (30 s) ran out.
    make_trainer(tmp_path, max_steps=2, callbacks=[]).fit(Recorder(), datamodule=VideoDataModule(str(manifest), **dm_args))
    _patch_getitem(monkeypatch, 3, (lambda: os._exit(7)) if how == "exit" else _sigkill_self)
    trainer = make_trainer(tmp_path, max_steps=20, callbacks=[])
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid") as err:
        trainer.fit(Recorder(), datamodule=VideoDataModule(str(manifest), **dm_args))
    assert time.monotonic() - start < 10  # noticed at once (SIGCHLD), not after the 30 s timeout
    assert trainer.state.status == TrainerStatus.INTERRUPTED
    chain = f"{err.value} <- {err.value.__cause__}"
    assert ("exit code 7" if how == "exit" else "killed by signal: Killed") in chain, chain
    notes = hint(err.value)
    assert f"VideoDataModule({manifest})" in notes and "worker process died" in notes and "num_workers" in notes


@pytest.mark.timeout(60)
def test_a_hung_worker_ends_the_run_after_the_timeout_with_a_hint(monkeypatch, tmp_path, good_clips):
    data = tmp_path / "data"
    manifest = write_manifest(data, good_clips(8))
    _patch_getitem(monkeypatch, 3, lambda: time.sleep(600))  # a decoder stuck on a network file system
    dm = VideoDataModule(str(manifest), val_fraction=0.0, vae_batch_size=2, num_workers=2, timeout=2.0, **CLIP)
    trainer = make_trainer(tmp_path, max_steps=20, callbacks=[])
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataLoader timed out after 2.0 seconds") as err:
        trainer.fit(Recorder(), datamodule=dm)
    assert time.monotonic() - start < 20  # 2 s timeout, plus up to 5 s for PyTorch to terminate the hung worker
    assert trainer.state.status == TrainerStatus.INTERRUPTED
    notes = hint(err.value)
    assert "no batch within timeout=2 s" in notes and "num_workers=0" in notes
