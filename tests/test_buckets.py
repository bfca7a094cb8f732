"""Buckets: sizes from a config, assignment of real files, batch sizes by tokens, one-bucket batches, DDP shares."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minisora.data.bucket_sampler import BucketBatches, BucketBatchSampler
from minisora.data.buckets import BucketError, BucketSpec, Geometry, assign, probe_all
from minisora.data.sources import ClipRecord
from minisora.io import write_video

SHAPES = Geometry(temporal=4, spatial=4, patch=(1, 2, 2))  # the shapes VAE (4x4x4) and DiT patch: sizes of 8
STANDARD = Geometry(temporal=4, spatial=8, patch=(1, 2, 2))  # configs/vae/standard.yaml: sizes of 16


def video(path: Path, width: int, height: int, frames: int) -> ClipRecord:
    rng = np.random.default_rng(width * 1000 + height + frames)
    write_video(rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8), path, fps=8)
    return ClipRecord(str(path), path.stem)


def test_bucket_sizes_follow_area_aspect_and_what_the_model_takes():
    buckets = BucketSpec({"256px": [1, 17, 33], "360p": [1, 17]}).build(STANDARD)
    by = {(b.resolution, b.frames, b.aspect): b for b in buckets}
    assert len(buckets) == 25  # 5 aspect ratios x (3 + 2) lengths, all distinct
    sq, wide, tall = by["256px", 17, "1:1"], by["256px", 17, "16:9"], by["256px", 17, "9:16"]
    assert (sq.height, sq.width) == (256, 256)
    assert (wide.height, wide.width) == (192, 336) and (tall.height, tall.width) == (336, 192)
    p360 = by["360p", 17, "16:9"]
    assert (p360.height, p360.width) == (352, 640)  # 640x360 rounded to multiples of 16 (VAE 8 x patch 2)
    for b in buckets:
        assert b.height % 16 == 0 and b.width % 16 == 0 and (b.frames - 1) % 4 == 0
        assert abs(b.height * b.width / {"256px": 256**2, "360p": 640 * 360}[b.resolution] - 1) < 0.12
        assert b.tokens == (1 + (b.frames - 1) // 4) * (b.height // 16) * (b.width // 16)
    assert [b.tokens for b in buckets] == sorted((b.tokens for b in buckets), reverse=True)


def test_bucket_config_errors_name_the_key_and_what_was_expected():
    with pytest.raises(BucketError, match=r"resolutions.256px: 16 frames .* 1 \+ 4k \(1, 5, 9"):
        BucketSpec({"256px": [1, 16]}).build(STANDARD)
    with pytest.raises(BucketError, match="'wide' is not width:height"):
        BucketSpec({"256px": [1]}, ["wide"])
    with pytest.raises(BucketError, match="key 'big'"):
        BucketSpec({"big": [1]})
    with pytest.raises(BucketError, match="max_upscale must be >= 1"):
        BucketSpec({"256px": [1]}, max_upscale=0.5)
    with pytest.raises(BucketError, match="image_fraction"):
        BucketSpec({"256px": [1]}, image_fraction=1.0)
    with pytest.raises(BucketError, match=r"image_fraction 0.2 needs 1-frame buckets .* 256px: \[1, ...\]"):
        BucketSpec({"256px": [17]}, image_fraction=0.2)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 8])
def test_batch_sizes_keep_tokens_per_batch_within_a_stated_band(batch_size):
    spec = BucketSpec({"256px": [1, 17, 33], "360p": [1, 17]})
    buckets = spec.build(STANDARD)
    sizes = spec.batch_sizes(buckets, batch_size)
    budget = batch_size * buckets[0].tokens  # batch_size clips of the largest bucket
    for b, n in zip(buckets, sizes):
        # The band: a batch holds more than budget - tokens of one clip and at most the budget.
        assert budget - b.tokens < n * b.tokens <= budget, (b.name, n)
        assert n * b.tokens > budget / 2 or n == 1  # and so over half the budget
    assert sizes[0] == batch_size
    capped = BucketSpec({"256px": [1, 17, 33]}, max_batch_size=16).batch_sizes(buckets, batch_size)
    assert max(capped) <= 16


def test_real_files_go_to_the_bucket_of_their_aspect_with_the_most_tokens_they_fit(tmp_path):
    spec = BucketSpec({"64px": [1, 9], "32px": [1, 9]}, max_upscale=1.0)
    buckets = spec.build(SHAPES)
    img = tmp_path / "still.png"
    Image.fromarray(np.full((72, 128, 3), 200, np.uint8)).save(img)
    records = [
        video(tmp_path / "landscape.mp4", 128, 72, 12),
        video(tmp_path / "portrait.mp4", 72, 128, 12),
        video(tmp_path / "square.mp4", 80, 80, 12),
        video(tmp_path / "four_three.mp4", 96, 72, 12),
        video(tmp_path / "short.mp4", 128, 72, 5),  # too short for 9 frames: a 1-frame bucket
        ClipRecord(str(img), "a still image"),
        video(tmp_path / "small_square.mp4", 40, 40, 12),  # too small for 64px: the 32px bucket
        video(tmp_path / "tiny.mp4", 16, 16, 12),  # smaller than every bucket: skipped
    ]
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    records.append(ClipRecord(str(tmp_path / "broken.mp4"), "broken"))
    a = assign(records, probe_all(records), buckets, max_upscale=1.0)
    got = {Path(records[r].path).stem: buckets[b].name for r, b in a.bucket_of().items()}
    assert got == {
        "landscape": "9x48x88", "portrait": "9x88x48", "square": "9x64x64", "four_three": "9x56x72",
        "short": "1x48x88", "still": "1x48x88", "small_square": "9x32x32",
    }  # fmt: skip
    skipped = {Path(p).stem: why for p, why in a.skipped}
    assert set(skipped) == {"tiny", "broken"}
    assert skipped["tiny"].startswith("too small: 16x16") and "max_upscale 1" in skipped["tiny"]
    assert skipped["broken"].startswith("unreadable")
    assert a.reasons() == Counter({"too small": 1, "unreadable": 1})
    # A configured upscale limit lets the tiny clip in, but never beyond it: 2x reaches 32x32, not 64x64.
    a2 = assign(records, probe_all(records), buckets, max_upscale=2.0)
    assert buckets[a2.bucket_of()[7]].name == "9x32x32"
    # Joint image training: every video in a video bucket also gives a frame to its aspect's image bucket.
    a3 = assign(records, probe_all(records), buckets, image_frames=True)
    frames = {buckets[b].name: sorted(Path(records[r].path).stem for r in rs) for b, rs in enumerate(a3.frames) if rs}
    assert frames == {"1x48x88": ["landscape"], "1x88x48": ["portrait"], "1x64x64": ["square"],
                      "1x56x72": ["four_three"], "1x32x32": ["small_square"]}  # fmt: skip


def test_a_bucket_config_no_clip_fits_lists_the_sizes_seen(tmp_path):
    records = [video(tmp_path / f"{w}x{h}.mp4", w, h, 6) for w, h in ((40, 24), (64, 48))]
    buckets = BucketSpec({"256px": [1, 17]}).build(STANDARD)
    with pytest.raises(BucketError) as e:
        assign(records, probe_all(records), buckets)
    msg = str(e.value)
    assert "no clip fits any bucket" in msg and "widths 40-64, heights 24-48 pixels, 6-6 frames" in msg
    assert "1x256x256" in msg and "max_upscale" in msg and "too small: 2" in msg


def epochs(sampler: BucketBatchSampler, n: int) -> list[list[list[int]]]:
    return [list(sampler) for _ in range(n)]


def test_batches_never_mix_buckets_and_cover_each_clip_at_most_once_per_epoch():
    sizes, batch = [23, 7, 40, 3], [4, 6, 2, 8]
    sampler = BucketBatchSampler(sizes, batch, seed=3)
    offsets = np.cumsum([0, *sizes])
    owner = {i: k for k in range(len(sizes)) for i in range(offsets[k], offsets[k + 1])}
    seen_orders = []
    for epoch in epochs(sampler, 3):
        assert len(epoch) == len(sampler)
        flat = [i for b in epoch for i in b]
        assert len(flat) == len(set(flat))  # nothing twice in an epoch
        for b in epoch:
            assert len({owner[i] for i in b}) == 1  # one bucket per batch
            assert len(b) <= batch[owner[b[0]]]
        # Full batches, plus each bucket's remainder: every clip trains every epoch here (W = 1).
        assert sorted(flat) == list(range(sum(sizes)))
        seen_orders.append(flat)
    assert seen_orders[0] != seen_orders[1]  # a new shuffle each epoch
    again = BucketBatchSampler(sizes, batch, seed=3)
    assert list(again) == [b for b in BucketBatchSampler(sizes, batch, seed=3)]  # deterministic for a seed
    data = BucketBatches([list(range(n)) for n in sizes], lambda ds, rows: {"items": [ds[i] for i in rows]})
    first = next(iter(BucketBatchSampler(sizes, batch, seed=3)))
    assert data[first]["bucket"] == owner[first[0]]
    with pytest.raises(RuntimeError, match="mixes buckets"):
        data[[0, int(offsets[1])]]


def test_ddp_ranks_get_whole_batches_of_one_bucket_that_together_make_the_global_batch():
    # Remainders (28 % 6, 14 % 4) divisible by W: then even the last, short batches match one process's.
    sizes, batch, W = [28, 14, 50], [3, 2, 5], 2
    one = BucketBatchSampler(sizes, [b * W for b in batch], seed=7)  # one process, the global batch
    ranks = [BucketBatchSampler(sizes, batch, seed=7, rank=r, world_size=W) for r in range(W)]
    assert len({len(r) for r in ranks}) == 1 == len({len(r) for r in [*ranks, one]})  # same number of steps
    shares = [list(r) for r in ranks]
    global_batches = list(one)
    offsets = np.cumsum([0, *sizes])
    bucket = lambda i: int(np.searchsorted(offsets, i, side="right") - 1)  # noqa: E731
    seen = []
    for step, together in enumerate(global_batches):
        parts = [s[step] for s in shares]
        assert len({len(p) for p in parts}) == 1  # equal rows on every rank (DDP steps stay in lockstep)
        assert {bucket(i) for p in parts for i in p} == {bucket(together[0])}  # all ranks: the same bucket
        assert sorted(i for p in parts for i in p) == sorted(together)
        seen += [i for p in parts for i in p]
    assert len(seen) == len(set(seen))  # no clip twice per epoch across ranks
    # An odd remainder is cut to a multiple of W (one clip waits for the next epoch's shuffle).
    odd = [list(BucketBatchSampler([7], [2], seed=0, rank=r, world_size=2)) for r in range(2)]
    assert sorted(len(b) for b in odd[0]) == sorted(len(b) for b in odd[1]) == [1, 2]
    assert [len(b) for b in odd[0]] == [len(b) for b in odd[1]]
    assert sampler_resumes(ranks[0].__class__, sizes, batch)


def sampler_resumes(cls, sizes, batch) -> bool:
    """A sampler started `start` batches into epoch 1 yields exactly what an uninterrupted one does from there."""
    full = cls(sizes, batch, seed=1)
    list(full)
    epoch1 = list(full)
    resumed = cls(sizes, batch, seed=1)
    resumed.epoch, resumed.start = 1, 4
    return list(resumed) == epoch1[4:]


def test_image_fraction_sets_the_share_of_one_frame_batches():
    sizes, batch, is_image = [40, 40, 400], [4, 4, 8], [False, False, True]
    for f in (0.0, 0.2, 0.5):
        sampler = BucketBatchSampler(sizes, batch, seed=0, is_image=is_image, image_fraction=f)
        epoch = list(sampler)
        images = sum(i >= 80 for b in epoch for i in b[:1])
        assert images == round(f * 20 / (1 - f))  # 20 video batches an epoch
        assert math.isclose(images / len(epoch), f, abs_tol=0.03)
    natural = BucketBatchSampler(sizes, batch, seed=0, is_image=is_image)  # None: the data's own mix
    assert len(natural) == 20 + 50
    with pytest.warns(UserWarning, match="image_fraction 0.9 needs 180 image batches .* fill 50"):
        BucketBatchSampler(sizes, batch, seed=0, is_image=is_image, image_fraction=0.9)
