"""Latent cache: what prepare_data writes, what the store reads back (streamed, not loaded), when the key changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minisora.data.latent_datamodule as latents_mod
from minisora.data.clips import ClipDataset
from minisora.data.datamodule import VideoDataModule
from minisora.data.latent_datamodule import LatentDataModule
from minisora.bench.report import reset_peak_rss, rss_mb
from minisora.data.buckets import Bucket
from minisora.data.latent_store import LatentRows, LatentStore
from minisora.data.latents import (
    build_cache,
    cache_complete,
    is_complete,
    split_indices,
    write_cache_index,
)
from minisora.data.shapes import make_shapes
from minisora.data.sources import load_records
from minisora.models.autoencoder import VideoVAE
from minisora.models.text import TextEncoder

CLIPS, FRAMES, SIZE = 12, 9, 32  # 9 = 1 + 2*4 frames -> 3 latent frames; 32 px -> 8 latent px


def tiny_vae(seed: int = 0) -> VideoVAE:
    torch.manual_seed(seed)
    return VideoVAE(latent_channels=4, base_channels=8, channel_multipliers=[1, 2, 2],
                    temporal_compression=4, spatial_compression=4).eval()  # fmt: skip


def tiny_text(**kw) -> TextEncoder:
    args = dict(model_name="tiny", width=32, layers=1, heads=1, context_length=16)
    return TextEncoder(**{**args, **kw})


def video_module(manifest: Path, **kw) -> VideoDataModule:
    args = dict(path=str(manifest), num_frames=FRAMES, height=SIZE, width=SIZE, crop="center", num_workers=0,
                vae_batch_size=4)  # fmt: skip
    return VideoDataModule(**{**args, **kw})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), num=CLIPS, size=SIZE, num_frames=FRAMES)


@pytest.fixture(scope="module")
def parts() -> tuple[VideoVAE, TextEncoder]:
    return tiny_vae(), tiny_text()


def latent_module(manifest: Path, cache_root: Path, vae=None, text=None, video=None, **kw) -> LatentDataModule:
    args = dict(cache_root=str(cache_root), dit_batch_size=4, num_workers=0, val_fraction=0.25, encode_batch_size=5)
    return LatentDataModule(video or video_module(manifest), vae, text, **{**args, **kw})


def test_prepare_data_writes_a_complete_cache_that_matches_the_encoders(manifest, parts, tmp_path):
    vae, text = parts
    dm = latent_module(manifest, tmp_path / "cache", vae, text)
    dm.prepare_data()
    folder = dm.folder
    assert folder.parent == tmp_path / "cache" and folder.name == dm.key
    # Fixed-size data is one bucket: its folder and buckets.json, written last.
    bucket = folder / f"{FRAMES}x{SIZE}x{SIZE}"
    assert {p.name for p in folder.iterdir()} == {"buckets.json", bucket.name}
    assert {p.name for p in bucket.iterdir()} == {"index.json", "shard-00000.safetensors", "captions-00000.safetensors"}
    assert cache_complete(folder, dm.key) and not cache_complete(folder, "another-key")
    assert is_complete(bucket, f"{dm.key}-{bucket.name}")
    assert not list((tmp_path / "cache").glob(".*partial"))

    records, _ = load_records(str(manifest), "auto")
    index = json.loads((bucket / "index.json").read_text())
    assert index["key"] == f"{dm.key}-{bucket.name}" and index["count"] == CLIPS
    assert index["latent_shape"] == [4, 3, 8, 8]  # (C, 1 + (9-1)/4, 32/4, 32/4)
    assert index["captions"]["count"] == len({r.caption for r in records})
    shard = load_file(str(bucket / "shard-00000.safetensors"))
    assert shard["latents"].dtype == torch.float16 and shard["latents"].shape == (CLIPS, 4, 3, 8, 8)

    ds = LatentRows(LatentStore(folder), 0)
    assert len(ds) == CLIPS
    clips = ClipDataset(records, train=False, **video_module(manifest).clip_args)  # what prepare_data encoded
    for j in (0, 5, CLIPS - 1):
        item = ds[j]
        assert item["latents"].shape == (4, 3, 8, 8) and item["latents"].dtype == torch.float32
        assert item["context"].shape == (16, 32) and item["context"].dtype == torch.float32
        assert item["context_mask"].shape == (16,) and item["context_mask"].dtype == torch.bool
        assert item["caption"] == records[j].caption and item["label"] == -1 and item["index"] == j
        emb, mask = text([records[j].caption])  # (1, L, D), (1, L)
        torch.testing.assert_close(item["context"], emb[0], rtol=2e-3, atol=2e-3)  # stored as float16
        assert torch.equal(item["context_mask"], mask[0])
        with torch.no_grad():
            z = vae.encode(clips[j]["video"][None])[0]  # (C, t, h, w)
        torch.testing.assert_close(item["latents"], z, rtol=2e-3, atol=2e-3)

    dm.setup("fit")
    [train], [val] = dm.train_set.datasets, dm.val_set.datasets
    assert len(train) + len(val) == CLIPS and len(val) == 3
    assert not set(train.rows.tolist()) & set(val.rows.tolist())
    assert train.store is val.store is dm.store  # one store: one set of open files and one index, two views
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (4, 4, 3, 8, 8) and batch["context"].shape == (4, 16, 32)
    assert batch["context_mask"].shape == (4, 16) and batch["labels"].dtype == torch.long
    assert len(batch["caption"]) == 4 and batch["bucket"] == 0
    for i, row in enumerate(batch["index"].tolist()):  # a batch read holds what single reads of its rows hold
        assert batch["caption"][i] == ds[row]["caption"] and torch.equal(batch["latents"][i], ds[row]["latents"])


def test_forked_workers_read_through_their_own_files_and_give_the_same_batches(manifest, parts, tmp_path):
    vae, text = parts
    batches = {}
    for workers in (0, 2):
        dm = latent_module(manifest, tmp_path, vae, text, num_workers=workers)
        dm.prepare_data()
        dm.setup("fit")
        dm.train_set.datasets[0][0]  # noqa: B018  (the parent opens the shard files before the workers fork)
        batches[workers] = [(b["index"].tolist(), b["latents"], b["caption"]) for _ in range(2) for b in dm.train_dataloader()]
    assert len(batches[0]) == 4  # 9 train clips in batches of 4, the short one dropped, 2 epochs
    for (rows0, z0, c0), (rows2, z2, c2) in zip(batches[0], batches[2]):
        assert rows0 == rows2 and c0 == c2 and torch.equal(z0, z2)


def test_second_prepare_data_reuses_the_cache_without_encoding(manifest, parts, tmp_path, monkeypatch):
    vae, text = parts
    first = latent_module(manifest, tmp_path, vae, text)
    first.prepare_data()
    stamp = (first.folder / "buckets.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("build_cache called although a complete cache exists")

    monkeypatch.setattr(latents_mod, "build_cache", fail)
    # Same inputs, new objects and different loader settings: same key, same folder, nothing encoded.
    again = latent_module(manifest, tmp_path, tiny_vae(), tiny_text(), dit_batch_size=2, num_workers=1,
                          video=video_module(manifest, vae_batch_size=7, num_workers=3))  # fmt: skip
    assert again.key == first.key
    again.prepare_data()
    assert (again.folder / "buckets.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.key]


def test_cache_key_follows_what_is_encoded_and_nothing_else(manifest, parts, tmp_path):
    vae, text = parts
    key = latent_module(manifest, tmp_path, vae, text).key

    def key_with(**changes) -> str:
        args = dict(vae=vae, text=text, video=video_module(manifest))
        args.update(changes)
        return latent_module(manifest, tmp_path, **args).key

    # Loader settings do not change the latents.
    assert key_with(video=video_module(manifest, vae_batch_size=1, num_workers=4, val_fraction=0.5)) == key
    assert latent_module(manifest, tmp_path, vae, text, dit_batch_size=1, num_workers=3, val_fraction=0.1).key == key
    assert key_with(vae=tiny_vae(), text=tiny_text()) == key  # equal weights, other objects

    # Clip options.
    assert key_with(video=video_module(manifest, num_frames=13)) != key
    assert key_with(video=video_module(manifest, height=16)) != key
    assert key_with(video=video_module(manifest, frame_stride=2)) != key
    assert latent_module(manifest, tmp_path, vae, text, clips_per_video=2).key != key

    # The autoencoder: its weights, and its latent statistics (encode normalises with them).
    other = tiny_vae()
    with torch.no_grad():
        other.encoder.conv_in.conv.weight[0, 0, 0, 0, 0] += 1e-3
    assert key_with(vae=other) != key
    stats = tiny_vae()
    stats.set_latent_stats(torch.full((4,), 0.5), torch.full((4,), 2.0))
    assert key_with(vae=stats) != key
    assert key_with(vae=tiny_vae(seed=1)) != key

    # The text encoder's configuration.
    assert key_with(text=tiny_text(width=64, heads=2)) != key
    assert key_with(text=tiny_text(layers=2)) != key
    assert key_with(text=tiny_text(context_length=12)) != key
    assert key_with(text=tiny_text(seed=1)) != key

    # The manifest: a different file, or the same file with other content.
    edited = tmp_path / "edited" / "manifest.csv"
    edited.parent.mkdir()
    rows = manifest.read_text().splitlines()
    edited.write_text("\n".join(rows) + "\n")
    (edited.parent / "clips").symlink_to(manifest.parent / "clips")
    same_bytes = key_with(video=video_module(edited))
    edited.write_text("\n".join(rows[:-1]) + "\n")  # one clip fewer
    assert key_with(video=video_module(edited)) not in (key, same_bytes)
    assert same_bytes != key  # another path is another source, even with equal bytes


def test_changed_manifest_builds_a_new_folder(manifest, parts, tmp_path):
    vae, text = parts
    data = tmp_path / "data"
    data.mkdir()
    (data / "clips").symlink_to(manifest.parent / "clips")
    local = data / "manifest.csv"
    rows = manifest.read_text().splitlines()
    local.write_text("\n".join(rows[:7]) + "\n")  # header + 6 clips
    first = latent_module(local, tmp_path / "cache", vae, text, val_fraction=0.0)
    first.prepare_data()
    local.write_text("\n".join(rows[:9]) + "\n")  # header + 8 clips
    second = latent_module(local, tmp_path / "cache", vae, text, val_fraction=0.0)
    second.prepare_data()
    assert second.folder != first.folder
    assert cache_complete(first.folder, first.key) and cache_complete(second.folder, second.key)
    assert LatentStore(first.folder).count(0) == 6 and LatentStore(second.folder).count(0) == 8


class Identity(torch.nn.Module):
    """A stand-in autoencoder whose latents are its input."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


def batches(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("decoder crashed")
        yield {"video": torch.full((2, 4, 1, 2, 2), float(i)), "caption": [f"clip {i}", "same"], "label": [i, -1]}


ONE = Bucket(1, 2, 2, "1:1", "data", None)  # the size of the stand-in "videos" below: (4, 1, 2, 2) latents


def test_interrupted_build_leaves_no_cache(tmp_path):
    text = tiny_text()
    out = tmp_path / "cache" / "abc" / ONE.name
    with pytest.raises(RuntimeError, match="decoder crashed"):
        build_cache(batches(4, fail_at=2), Identity(), text, out, key="abc", shard_size=2)
    assert not out.exists() and not is_complete(out, "abc")
    with pytest.raises(FileNotFoundError, match="no complete latent cache"):
        LatentStore(out.parent)

    # A rerun replaces the leftover partial folder and produces the whole cache, in shards of 3 rows (a batch of
    # 2 is split across shards) and captions in shards of 3 too.
    build_cache(batches(4), Identity(), text, out, key="abc", shard_size=3)
    assert is_complete(out, "abc")
    assert [p.name for p in out.parent.iterdir()] == [ONE.name]
    write_cache_index(out.parent, "abc", [(ONE, 8)])
    ds = LatentRows(LatentStore(out.parent), 0)
    assert len(ds) == 8 and [s["rows"] for s in ds.meta["shards"]] == [3, 3, 2]
    assert [s["rows"] for s in ds.meta["captions"]["shards"]] == [3, 2]  # distinct captions are embedded once
    assert [float(ds[j]["latents"].mean()) for j in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [ds[j]["caption"] for j in range(4)] == ["clip 0", "same", "clip 1", "same"]
    assert [ds[j]["label"] for j in range(4)] == [0, -1, 1, -1]
    batch = ds.batch([7, 2, 3, 0])  # rows from three shards, captions from both caption shards
    assert batch["latents"].mean(dim=(1, 2, 3, 4)).tolist() == [3, 1, 1, 0]
    assert batch["caption"] == ["same", "clip 1", "same", "clip 0"] and batch["labels"].tolist() == [-1, 1, -1, 0]
    emb, _ = text(["clip 3", "same"])
    torch.testing.assert_close(ds.batch([6, 7])["context"], emb, rtol=2e-3, atol=2e-3)


def test_reading_streams_rows_from_disk_instead_of_loading_the_cache(tmp_path):
    """RSS grows by a few batch buffers, not by the cache: 96 MB read twice over with < 24 MB growth."""
    text = tiny_text()
    rows, shape = 1200, (8, 5, 32, 32)  # 80 KB a row in float16

    def random_batches():
        g = torch.Generator().manual_seed(0)
        for i in range(0, rows, 100):
            yield {"video": torch.randn((100, *shape), generator=g), "caption": [f"c{j % 7}" for j in range(100)],
                   "label": list(range(i, i + 100))}  # fmt: skip

    bucket = Bucket(17, 128, 128, "1:1", "data", None)
    build_cache(random_batches(), Identity(), text, tmp_path / bucket.name, key="big", shard_size=256)
    write_cache_index(tmp_path, "big", [(bucket, rows)])
    size = sum(p.stat().st_size for p in (tmp_path / bucket.name).iterdir())
    assert size > 95e6
    store = LatentStore(tmp_path)
    train, val = LatentRows(store, 0, range(0, rows, 2)), LatentRows(store, 0, range(1, rows, 2))
    before = rss_mb("VmRSS")
    reset_peak_rss()
    seen = 0
    for _ in range(2):
        for view in (train, val):
            for i in range(0, len(view), 16):
                batch = view.batch(list(range(i, min(i + 16, len(view)))))
                seen += len(batch["labels"])
                assert batch["labels"].tolist() == view.rows[i : i + 16].tolist()  # each row's own label
    assert seen == 2 * rows
    growth = rss_mb("VmHWM") - before
    assert growth < 24, f"reading a {size / 1e6:.0f} MB cache grew RSS by {growth:.0f} MB"


def test_incomplete_folders_are_not_complete(tmp_path):
    text = tiny_text()
    out = build_cache(batches(2), Identity(), text, tmp_path / "k", key="k")
    (out / "shard-00000.safetensors").unlink()
    assert not is_complete(out)
    (out / "index.json").write_text("{not json")
    assert not is_complete(out)
    with pytest.raises(ValueError, match="no clips"):
        build_cache(batches(0), Identity(), text, tmp_path / "empty", key="e")
    assert not (tmp_path / "empty").exists()


def test_split_indices_is_deterministic_and_disjoint():
    train, val = split_indices(100, 0.1, seed=3)
    assert (train, val) == split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_indices(100, 0.1, seed=4)[1] != val
    assert split_indices(10, 0.0, seed=0) == (list(range(10)), [])
    assert split_indices(1, 0.5, seed=0) == ([0], [])  # one item: nothing to hold out
    assert len(split_indices(3, 0.01, seed=0)[1]) == 1  # a fraction > 0 holds out at least one
