"""VideoDataModule (split, loaders, collate, seeding, workers) and the SkippedFilesLogger callback."""

from __future__ import annotations

import json
import logging
import shutil
import typing
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from minisora.data.clips import SkippedClipWarning
from minisora.data.datamodule import VideoDataModule, collate_clips, split_records
from minisora.data.sources import ClipRecord
from minisora.training.callbacks import SkippedFilesLogger

SMALL = {"num_frames": 4, "height": 16, "width": 16, "vae_batch_size": 4, "num_workers": 0}


@pytest.fixture
def dataset_dir(tmp_path, make_video):
    """data/: 20 short coded videos (captions 'clip i', label i % 3) and manifest.csv."""
    rows = []
    for i in range(20):
        make_video(f"data/clips/{i:02d}.mp4", num_frames=8, width=32, height=24, first=10 * i)
        rows.append(f"clips/{i:02d}.mp4,clip {i},{i % 3}")
    (tmp_path / "data" / "manifest.csv").write_text("path,caption,label\n" + "\n".join(rows) + "\n")
    return tmp_path / "data"


def test_constructor_arguments_are_configurable():
    scalars = (int, float, bool, str)
    allowed = {*scalars, *(t | None for t in scalars), list[int], list[float], list[str]}
    hints = typing.get_type_hints(VideoDataModule.__init__)
    hints.pop("return", None)
    for built in ("buckets", "geometry"):  # objects built from the `buckets` section, not keys of `data`
        hints.pop(built)
    assert hints and all(h in allowed for h in hints.values()), hints
    with pytest.raises(ValueError, match="crop must be one of random, center, got 'middle'"):
        VideoDataModule(crop="middle")
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        VideoDataModule(val_fraction=1.5)


def records(data) -> list:
    """The records of a fixed-size module's train or val set (its one bucket)."""
    [dataset] = data.datasets
    return dataset.records


def test_split_sizes_deterministic_and_by_file(dataset_dir):
    dm = VideoDataModule(str(dataset_dir / "manifest.csv"), val_fraction=0.2, seed=3, **SMALL)
    dm.setup("fit")
    train, val = [r.path for r in records(dm.train_set)], [r.path for r in records(dm.val_set)]
    assert (len(train), len(val)) == (16, 4) and not set(train) & set(val)
    again = VideoDataModule(str(dataset_dir), val_fraction=0.2, seed=3, **SMALL)  # the folder finds manifest.csv
    again.setup("fit")
    assert [r.path for r in records(again.val_set)] == val
    other = VideoDataModule(str(dataset_dir / "manifest.csv"), val_fraction=0.2, seed=4, **SMALL)
    other.setup("fit")
    assert [r.path for r in records(other.val_set)] != val
    # The split does not depend on where the data lives (hash of the path relative to the manifest).
    moved = shutil.copytree(dataset_dir, dataset_dir.parent / "moved")
    dm_moved = VideoDataModule(str(moved / "manifest.csv"), val_fraction=0.2, seed=3, **SMALL)
    dm_moved.setup("fit")
    assert [r.path.replace(str(moved), str(dataset_dir)) for r in records(dm_moved.val_set)] == val


def test_split_keeps_clips_of_one_file_together():
    records = [ClipRecord(f"/d/v{i // 3}.mp4", "c", start=float(i % 3)) for i in range(30)]  # 10 files x 3 clips
    train, val = split_records(records, 0.2, seed=0, root="/d")
    assert len(val) == 6 and len(train) == 24
    assert not {r.path for r in train} & {r.path for r in val}
    assert split_records(records, 0.0, seed=0, root="/d") == (records, [])


def test_batches_and_collate_fields(dataset_dir):
    dm = VideoDataModule(str(dataset_dir / "manifest.csv"), val_fraction=0.2, **SMALL)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 3, 4, 16, 16) and batch["video"].dtype == torch.float32
    assert isinstance(batch["caption"], list) and all(c.startswith("clip ") for c in batch["caption"])
    assert batch["label"].dtype == torch.long
    assert batch["label"].tolist() == [int(c.split()[1]) % 3 for c in batch["caption"]]
    assert batch["skipped"] == [] and len(batch["path"]) == 4
    val = list(dm.val_dataloader())
    assert sum(b["video"].shape[0] for b in val) == 4
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.persistent_workers, loader.timeout) == (0, False, 0)
    assert loader.pin_memory == torch.cuda.is_available()


def test_collate_concatenates_skipped():
    item = lambda i, skipped: {
        "video": torch.full((3, 2, 4, 4), float(i)), "caption": f"c{i}", "label": i, "path": f"p{i}", "skipped": skipped,
    }  # fmt: skip
    batch = collate_clips([item(0, [("a.mp4", "empty")]), item(1, []), item(2, [("b.mp4", "short"), ("c.mp4", "x")])])
    assert batch["video"].shape == (3, 3, 2, 4, 4) and batch["video"][2].eq(2).all()
    assert batch["caption"] == ["c0", "c1", "c2"] and batch["label"].tolist() == [0, 1, 2]
    assert batch["skipped"] == [("a.mp4", "empty"), ("b.mp4", "short"), ("c.mp4", "x")]


def test_same_seed_same_first_batch(dataset_dir, make_video):
    make_video("data/long.mp4", num_frames=60, width=32, height=24)  # random start positions matter here
    with open(dataset_dir / "manifest.csv", "a") as f:
        f.write("long.mp4,long one,0\n" * 3)

    def first(seed):
        dm = VideoDataModule(str(dataset_dir / "manifest.csv"), val_fraction=0.1, seed=seed, **SMALL)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b, c = first(0), first(0), first(1)
    assert a["caption"] == b["caption"] and torch.equal(a["video"], b["video"])
    assert a["caption"] != c["caption"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_resumed_run_continues_with_the_batches_it_would_have_drawn(dataset_dir, num_workers):
    # 20 clips in batches of 4: 5 steps an epoch. A run resumed at step 7 starts with batch 3 of epoch 2, also
    # with workers (their DataLoader calls iter() on the sampler twice, dropping the first iterator).
    def batches(step: int, epochs: int) -> list[list[str]]:
        dm = VideoDataModule(str(dataset_dir / "manifest.csv"), val_fraction=0.0, seed=2,
                             **SMALL | {"num_workers": num_workers})  # fmt: skip
        dm.trainer = SimpleNamespace(global_step=step, accumulate_grad_batches=1, global_rank=0, world_size=1)
        loader = dm.train_dataloader()
        return [b["path"] for _ in range(epochs) for b in loader]

    full = batches(0, 3)
    assert len(full) == 15 and len({p for b in full[:5] for p in b}) == 20  # every clip once an epoch
    assert full[5:10] != full[:5]  # a new shuffle each epoch
    assert batches(7, 2) == full[7:]  # the rest of epoch 2, then epoch 3


def test_two_workers_report_skipped_files(dataset_dir, bad_media):
    for name in ("empty", "text"):
        shutil.copy(bad_media[name], dataset_dir / bad_media[name].name)
    with open(dataset_dir / "manifest.csv", "a") as f:
        f.write("empty.mp4,broken,0\nnotes.mp4,broken too,0\n")
    kwargs = SMALL | {"num_workers": 2, "val_fraction": 0.0, "persistent_workers": True}
    dm = VideoDataModule(str(dataset_dir / "manifest.csv"), **kwargs)
    with pytest.warns(SkippedClipWarning):
        dm.setup("fit")  # the setup check decodes a few clips and meets the broken ones
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.timeout > 0
    seen, skipped = [], set()
    for _ in range(2):  # two epochs through persistent workers
        epoch_skipped = set()
        for batch in loader:
            seen += batch["caption"]
            epoch_skipped |= {p for p, _ in batch["skipped"]}
        assert epoch_skipped == {str(dataset_dir / "empty.mp4"), str(dataset_dir / "notes.mp4")}
        skipped |= epoch_skipped
    assert len(seen) == 2 * 22 and "broken" not in seen
    assert dm.val_dataloader() == []


def test_setup_fails_fast_when_nothing_is_usable(tmp_path, bad_media):
    (tmp_path / "bad" / "manifest.csv").write_text(
        "path,caption\n" + "".join(f"{p.name},x\n" for p in bad_media.values())
    )
    dm = VideoDataModule(str(tmp_path / "bad" / "manifest.csv"), val_fraction=0.0, **SMALL)
    with (
        pytest.warns(SkippedClipWarning),
        pytest.raises(RuntimeError, match=r"manifest\.csv: none of the 5 clips checked"),
    ):
        dm.setup("fit")


def test_val_path_is_the_validation_source(dataset_dir, tmp_path, make_video):
    make_video("held/a.mp4", num_frames=8, width=32, height=24)
    (tmp_path / "held" / "a.txt").write_text("held out")
    dm = VideoDataModule(str(dataset_dir / "manifest.csv"), val_path=str(tmp_path / "held"), **SMALL)
    dm.setup("fit")
    assert len(dm.train_set) == 20 and [r.caption for r in records(dm.val_set)] == ["held out"]
    assert not dm.val_set.datasets[0].train


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (batch["video"].mean() - self.w).pow(2)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", (batch["video"].mean() - self.w).pow(2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skipped_files_logger_counts_distinct_files_per_epoch(dataset_dir, bad_media, tmp_path, caplog):
    for name in ("empty", "audio_only"):
        shutil.copy(bad_media[name], dataset_dir / bad_media[name].name)
    with open(dataset_dir / "manifest.csv", "a") as f:
        f.write("empty.mp4,broken,0\n" * 2 + "audio.mp4,no picture,0\n")  # the same bad file twice counts once
    dm = VideoDataModule(str(dataset_dir / "manifest.csv"), val_fraction=0.0, **SMALL)
    logger = SkippedFilesLogger()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[logger], default_root_dir=tmp_path,
    )  # fmt: skip
    with caplog.at_level(logging.INFO), pytest.warns(SkippedClipWarning):
        trainer.fit(_Tiny(), datamodule=dm)
    assert trainer.callback_metrics["data/skipped_files_train"].item() == 2
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and "train file" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("epoch 0: skipped 2 train file(s):")
    assert "empty.mp4 (file is empty (0 bytes))" in lines[0] and "no video stream" in lines[0]


def test_data_benchmark_runs_and_reports(dataset_dir, tmp_path):
    from minisora.bench.data import main

    out = tmp_path / "bench.json"
    args = ["--videos", str(dataset_dir), "--clips", "4", "--workers", "0", "--repeats", "2"]
    results = main([*args, "--frames", "4", "--size", "16", "--json", str(out)])
    assert results["clips_per_s"]["0"] > 0 and len(results["runs"]["0"]) == 2
    assert results["breakdown"]["frames_decoded_per_clip"] >= 4
    assert json.loads(out.read_text())["clips_per_s"] == results["clips_per_s"]
