"""ClipDataset: clip sampling, resize and crop, short clips, and bad files skipped with a warning and counted."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from minisora.data.clips import ClipDataset, SkippedClipWarning
from minisora.data.sources import ClipRecord, load_records


def rec(path, caption="c", label=-1, start=None, end=None) -> ClipRecord:
    return ClipRecord(str(path), caption, label, start, end)


def test_item_fields_shape_dtype_and_range(make_video, frame_index):
    path = make_video(num_frames=20, width=96, height=64)
    ds = ClipDataset([rec(path, "a caption", 4)], num_frames=8, height=32, width=48)
    item = ds[0]
    first = frame_index(item["video"])[0]  # 96x64 resized to 48x32 (no crop): frames still readable
    assert frame_index(item["video"]) == list(range(first, first + 8))
    assert set(item) == {"video", "caption", "label", "path", "skipped"}
    video = item["video"]
    assert video.shape == (3, 8, 32, 48) and video.dtype == torch.float32 and video.is_contiguous()
    assert video.min() >= -1 and video.max() <= 1
    assert video.min() < -0.9 and video.max() > 0.9  # black bars and white bars both present
    assert (item["caption"], item["label"], item["path"], item["skipped"]) == ("a caption", 4, str(path), [])


def test_train_samples_random_consecutive_windows_val_the_centre(make_video, frame_index):
    path = make_video(num_frames=40)
    train = ClipDataset([rec(path)], num_frames=5, height=64, width=96, train=True)
    starts = set()
    for _ in range(30):
        idx = frame_index(train[0]["video"])
        assert idx == list(range(idx[0], idx[0] + 5))  # same-size read: no crop, frames intact
        starts.add(idx[0])
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 35
    val = ClipDataset([rec(path)], num_frames=5, height=64, width=96, train=False)
    assert frame_index(val[0]["video"]) == [17, 18, 19, 20, 21] == frame_index(val[0]["video"])  # centred, repeatable


def test_start_end_window_stride_and_fps(make_video, frame_index):
    path = make_video(num_frames=60, fps=10)
    window = ClipDataset([rec(path, start=2.0, end=3.0)], num_frames=4, height=64, width=96)
    for _ in range(20):
        idx = frame_index(window[0]["video"])
        assert idx[0] >= 20 and idx[-1] <= 29  # frames shown within [2 s, 3 s)
    strided = ClipDataset([rec(path)], num_frames=4, height=64, width=96, frame_stride=3, train=False)
    assert np.diff(frame_index(strided[0]["video"])).tolist() == [3, 3, 3]
    resampled = ClipDataset([rec(path, start=1.0)], num_frames=4, height=64, width=96, fps=5.0, train=False)
    idx = frame_index(resampled[0]["video"])
    assert np.diff(idx).tolist() == [2, 2, 2] and idx[0] >= 10  # 10 fps source read at 5 fps


def test_portrait_video_resizes_its_width_to_fit_and_crops_rows(make_video):
    path = make_video(num_frames=3, width=48, height=96)
    ds = ClipDataset([rec(path)], num_frames=2, height=32, width=32, crop="center")
    video = ds[0]["video"]  # 48x96 -> 32x64, rows 16..48 kept: the bars (top half) end at row 32
    assert video.shape == (3, 2, 32, 32)
    ramp = (video[0, 0, -1] + 1) * 127.5  # bottom row of the crop: the full grey ramp, 0..255 across
    assert ramp[0] < 12 and ramp[-1] > 243


def test_resize_short_side_then_center_or_random_crop(make_video):
    # Source 96x64 -> clips 32x32: resized to 48x32 (short side fits), then 16 columns cropped away.
    path = make_video(num_frames=6, width=96, height=64)
    ramp_left = lambda item: (item["video"][0, 0, -1, 0].item() + 1) * 127.5  # bottom-left pixel of the grey ramp
    centre = ClipDataset([rec(path)], num_frames=2, height=32, width=32, crop="center")
    # Centre crop starts at column 8 of 48, i.e. ~ 8/47 of the ramp's 0..255.
    assert ramp_left(centre[0]) == pytest.approx(8 / 47 * 255, abs=12)
    rand = ClipDataset([rec(path)], num_frames=2, height=32, width=32, crop="random")
    lefts = [ramp_left(rand[0]) for _ in range(20)]
    assert min(lefts) < 30 and max(lefts) > 60  # offsets spread over 0..16 columns of 48
    val = ClipDataset([rec(path)], num_frames=2, height=32, width=32, crop="random", train=False)
    assert ramp_left(val[0]) == pytest.approx(ramp_left(centre[0]), abs=1)  # val always crops the centre


def test_flip_is_off_by_default_and_mirrors_when_on(make_video):
    path = make_video(num_frames=4, width=64, height=64)
    plain = ClipDataset([rec(path)], num_frames=2, height=64, width=64)
    for _ in range(10):
        assert plain[0]["video"][0, 0, -1, 0] < plain[0]["video"][0, 0, -1, -1]  # ramp rises left to right
    flipping = ClipDataset([rec(path)], num_frames=2, height=64, width=64, flip=True)
    rising = [bool(v[0, 0, -1, 0] < v[0, 0, -1, -1]) for v in (flipping[0]["video"] for _ in range(30))]
    assert 0 < sum(rising) < 30


def test_same_seed_repeats_and_seed_changes_samples(make_video, frame_index):
    path = make_video(num_frames=80, width=96, height=64)

    def starts(seed):
        torch.manual_seed(123)
        ds = ClipDataset([rec(path)], num_frames=4, height=64, width=96, seed=seed)
        return [frame_index(ds[0]["video"])[0] for _ in range(8)]

    assert starts(0) == starts(0)
    assert starts(0) != starts(1)


def test_upscaling_limit(make_video):
    path = make_video(num_frames=4, width=32, height=16)
    too_small = r"32x16 is too small for 128x128 clips \(8.0x upscaling > max_upscale=4\)"
    with pytest.warns(SkippedClipWarning, match=too_small), pytest.raises(RuntimeError):
        ClipDataset([rec(path)], num_frames=2, height=128, width=128)[0]
    assert ClipDataset([rec(path)], num_frames=2, height=64, width=64)[0]["video"].shape == (3, 2, 64, 64)


def test_short_video_skip_or_loop(make_video, frame_index):
    short = make_video("short.mp4", num_frames=6)
    long = make_video("long.mp4", num_frames=30, first=100)
    skip = ClipDataset([rec(short), rec(long)], num_frames=8, height=64, width=96)
    with pytest.warns(
        SkippedClipWarning, match=r"short\.mp4: too short: 6 frames but a clip of 8 frames at stride 1 needs 8"
    ):
        item = skip[0]
    assert item["path"] == str(long) and min(frame_index(item["video"])) >= 100
    assert item["skipped"] == [(str(short), skip._bad[0])]
    loop = ClipDataset([rec(short)], num_frames=8, height=64, width=96, short_policy="loop")
    assert frame_index(loop[0]["video"]) == [0, 1, 2, 3, 4, 5, 0, 1]
    window = ClipDataset([rec(long, start=0.5, end=1.0)], num_frames=8, height=64, width=96, short_policy="loop")
    assert frame_index(window[0]["video"]) == [105, 106, 107, 108, 109, 105, 106, 107]  # loops within the window


def test_images_are_one_frame_clips_or_static_loops(make_image, make_video, frame_index):
    still = make_image("still.jpg", index=9)
    one = ClipDataset([rec(still)], num_frames=1, height=32, width=48)
    assert one[0]["video"].shape == (3, 1, 32, 48) and frame_index(one[0]["video"]) == [9]
    static = ClipDataset([rec(still)], num_frames=4, height=32, width=48, short_policy="loop")
    assert frame_index(static[0]["video"]) == [9, 9, 9, 9]
    video = make_video("v.mp4", num_frames=10)
    mixed = ClipDataset([rec(still), rec(video)], num_frames=4, height=32, width=48)
    with pytest.warns(SkippedClipWarning, match="a still image is 1 frame, clips need 4"):
        assert mixed[0]["path"] == str(video)


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "audio_only", "bad_image"])
def test_each_bad_file_kind_is_skipped_once_with_a_warning(bad_media, make_video, kind):
    good = make_video("good.mp4", num_frames=12)
    bad = bad_media[kind]
    ds = ClipDataset([rec(bad), rec(good)], num_frames=4, height=32, width=48)
    with pytest.warns(SkippedClipWarning) as caught:
        item = ds[0]
    assert [str(w.message).split(":")[0] for w in caught] == [f"skipping {bad}"]
    assert item["path"] == str(good) and item["video"].shape == (3, 4, 32, 48)
    assert len(item["skipped"]) == 1 and item["skipped"][0][0] == str(bad)
    # Remembered in this process: no second warning, no second attempt, still counted as skipped.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ds[0]
    assert again["skipped"] == item["skipped"]
    assert ds[1]["skipped"] == []


def test_truncated_file_with_header_first_is_reported_as_truncated(tmp_path, coded_frame, make_video):
    import av

    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(60):
            for packet in stream.encode(av.VideoFrame.from_ndarray(coded_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download: header intact, frames cut
    good = make_video("good.mp4")
    ds = ClipDataset([rec(path), rec(good)], num_frames=4, height=32, width=48)
    with pytest.warns(SkippedClipWarning, match=r"cut\.mp4: truncated: the header lists 60 frames"):
        assert ds[0]["path"] == str(good)


def test_all_bad_raises_naming_the_source(bad_media, tmp_path):
    (tmp_path / "bad" / "manifest.csv").write_text(
        "path,caption\n" + "".join(f"{p.name},x\n" for p in bad_media.values())
    )
    ds = ClipDataset.from_path(str(tmp_path / "bad"), num_frames=4, height=32, width=32)
    assert len(ds) == 5
    with (
        pytest.warns(SkippedClipWarning),
        pytest.raises(RuntimeError, match=r"bad: none of the 5 clips could be read") as e,
    ):
        ds[2]
    assert "empty.mp4: file is empty" in str(e.value)
    assert ds.check(3) == (
        0,
        [(str(bad_media[k]), ds._bad[i]) for i, k in ((0, "empty"), (2, "truncated"), (4, "bad_image"))],
    )


def test_construction_is_lazy_and_checks_arguments(tmp_path):
    records = [rec(tmp_path / f"missing{i}.mp4") for i in range(1000)]
    ds = ClipDataset(records, num_frames=4, height=8, width=8)  # nothing is opened here
    assert len(ds) == 1000 and ds._media == {}
    for kwargs, message in [
        ({"crop": "left"}, "crop must be one of random, center, got 'left'"),
        ({"short_policy": "pad"}, "short_policy must be one of skip, loop"),
        ({"num_frames": 0}, "num_frames must be an integer >= 1"),
        ({"fps": 8.0, "frame_stride": 2}, "give fps"),
        ({"max_upscale": 0.5}, "max_upscale must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            ClipDataset(records, **kwargs)


def test_manifest_line_is_named_in_the_warning(tmp_path, bad_media, make_video):
    make_video("bad/ok.mp4")
    (tmp_path / "bad" / "list.csv").write_text("path,caption\nok.mp4,fine\nempty.mp4,broken\n")
    records, _ = load_records(str(tmp_path / "bad" / "list.csv"))
    ds = ClipDataset(records, num_frames=2, height=16, width=16)
    with pytest.warns(SkippedClipWarning, match=r"empty\.mp4 \(manifest line 3\): file is empty"):
        assert ds[1]["path"] == os.path.abspath(tmp_path / "bad" / "ok.mp4")
