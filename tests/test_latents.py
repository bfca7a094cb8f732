"""Latent cache: what prepare_data writes, what LatentDataset returns, when the cache key changes, atomic builds."""

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
from minisora.data.latents import (
    LatentDataset,
    build_cache,
    is_complete,
    split_indices,
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
                batch_size=4)  # fmt: skip
    return VideoDataModule(**{**args, **kw})


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), num=CLIPS, size=SIZE, num_frames=FRAMES)


@pytest.fixture(scope="module")
def parts() -> tuple[VideoVAE, TextEncoder]:
    return tiny_vae(), tiny_text()


def latent_module(manifest: Path, cache_root: Path, vae=None, text=None, video=None, **kw) -> LatentDataModule:
    args = dict(cache_root=str(cache_root), batch_size=4, num_workers=0, val_fraction=0.25, encode_batch_size=5)
    return LatentDataModule(video or video_module(manifest), vae, text, **{**args, **kw})


def test_prepare_data_writes_a_complete_cache_that_matches_the_encoders(manifest, parts, tmp_path):
    vae, text = parts
    dm = latent_module(manifest, tmp_path / "cache", vae, text)
    dm.prepare_data()
    folder = dm.folder
    assert folder.parent == tmp_path / "cache" and folder.name == dm.key
    assert {p.name for p in folder.iterdir()} == {"index.json", "captions.safetensors", "shard-00000.safetensors"}
    assert is_complete(folder, dm.key) and not is_complete(folder, "another-key")
    assert not list((tmp_path / "cache").glob(".*partial"))

    records, _ = load_records(str(manifest), "auto")
    index = json.loads((folder / "index.json").read_text())
    assert index["key"] == dm.key and index["count"] == CLIPS
    assert index["latent_shape"] == [4, 3, 8, 8]  # (C, 1 + (9-1)/4, 32/4, 32/4)
    assert sorted(index["captions"]) == sorted({r.caption for r in records})
    shard = load_file(str(folder / "shard-00000.safetensors"))
    assert shard["latents"].dtype == torch.float16 and shard["latents"].shape == (CLIPS, 4, 3, 8, 8)

    ds = LatentDataset(folder)
    assert len(ds) == CLIPS
    clips = ClipDataset(records, train=False, **video_module(manifest).clip_args)  # what prepare_data encoded
    for j in (0, 5, CLIPS - 1):
        item = ds[j]
        assert item["latents"].shape == (4, 3, 8, 8) and item["latents"].dtype == torch.float32
        assert item["context"].shape == (16, 32) and item["context"].dtype == torch.float32
        assert item["context_mask"].shape == (16,) and item["context_mask"].dtype == torch.bool
        assert item["caption"] == records[j].caption and item["label"] == -1
        emb, mask = text([records[j].caption])  # (1, L, D), (1, L)
        torch.testing.assert_close(item["context"], emb[0], rtol=2e-3, atol=2e-3)  # stored as float16
        assert torch.equal(item["context_mask"], mask[0])
        with torch.no_grad():
            z = vae.encode(clips[j]["video"][None])[0]  # (C, t, h, w)
        torch.testing.assert_close(item["latents"], z, rtol=2e-3, atol=2e-3)

    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == CLIPS and len(dm.val_set) == 3
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (4, 4, 3, 8, 8) and batch["context"].shape == (4, 16, 32)
    assert batch["context_mask"].shape == (4, 16) and batch["labels"].dtype == torch.long
    assert len(batch["caption"]) == 4


def test_second_prepare_data_reuses_the_cache_without_encoding(manifest, parts, tmp_path, monkeypatch):
    vae, text = parts
    first = latent_module(manifest, tmp_path, vae, text)
    first.prepare_data()
    stamp = (first.folder / "index.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("build_cache called although a complete cache exists")

    monkeypatch.setattr(latents_mod, "build_cache", fail)
    # Same inputs, new objects and different loader settings: same key, same folder, nothing encoded.
    again = latent_module(manifest, tmp_path, tiny_vae(), tiny_text(), batch_size=2, num_workers=1,
                          video=video_module(manifest, batch_size=7, num_workers=3))  # fmt: skip
    assert again.key == first.key
    again.prepare_data()
    assert (again.folder / "index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.key]


def test_cache_key_follows_what_is_encoded_and_nothing_else(manifest, parts, tmp_path):
    vae, text = parts
    key = latent_module(manifest, tmp_path, vae, text).key

    def key_with(**changes) -> str:
        args = dict(vae=vae, text=text, video=video_module(manifest))
        args.update(changes)
        return latent_module(manifest, tmp_path, **args).key

    # Loader settings do not change the latents.
    assert key_with(video=video_module(manifest, batch_size=1, num_workers=4, val_fraction=0.5)) == key
    assert latent_module(manifest, tmp_path, vae, text, batch_size=1, num_workers=3, val_fraction=0.1).key == key
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
    assert is_complete(first.folder) and is_complete(second.folder)
    assert len(LatentDataset(first.folder)) == 6 and len(LatentDataset(second.folder)) == 8


class Identity(torch.nn.Module):
    """A stand-in autoencoder whose latents are its input."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


def batches(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("decoder crashed")
        yield {"video": torch.full((2, 4, 1, 2, 2), float(i)), "caption": [f"clip {i}", "same"], "label": [i, -1]}


def test_interrupted_build_leaves_no_cache(tmp_path):
    text = tiny_text()
    out = tmp_path / "cache" / "abc"
    with pytest.raises(RuntimeError, match="decoder crashed"):
        build_cache(batches(4, fail_at=2), Identity(), text, out, key="abc", shard_size=2)
    assert not out.exists() and not is_complete(out, "abc")
    with pytest.raises(FileNotFoundError, match="no complete latent cache"):
        LatentDataset(out)

    # A rerun replaces the leftover partial folder and produces the whole cache.
    build_cache(batches(4), Identity(), text, out, key="abc", shard_size=3)
    assert is_complete(out, "abc")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["abc"]
    ds = LatentDataset(out)
    assert len(ds) == 8 and ds.meta["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert [float(ds[j]["latents"].mean()) for j in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [ds[j]["caption"] for j in range(4)] == ["clip 0", "same", "clip 1", "same"]
    assert [ds[j]["label"] for j in range(4)] == [0, -1, 1, -1]
    assert len(ds.captions) == 5  # distinct captions are embedded once


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
