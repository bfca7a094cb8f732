"""minisora.io: writing and reading clips with PyAV, frame-exact seeking, and clear errors on bad files."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from minisora import io
from minisora.io import MediaError, probe, read_clip, read_frames, save_video, write_gif, write_video


def test_mp4_round_trip_keeps_values_and_metadata(tmp_path, coded_frame):
    frames = np.stack([coded_frame(i, 64, 96) for i in range(12)])
    path = write_video(frames, tmp_path / "a.mp4", fps=12)
    info = probe(path)
    assert (info.num_frames, info.width, info.height, info.is_image) == (12, 96, 64, False)
    assert info.fps == pytest.approx(12)
    back = read_clip(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    # H.264 at crf 17 on hard black/white edges: small mean error, a few larger values at the edges.
    err = np.abs(back.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 3.0
    assert np.percentile(err, 99) < 40
    assert not list(tmp_path.glob(".*partial*")), "the temporary file must be renamed away"


def test_float_tensor_round_trip(tmp_path, coded_frame, frame_index):
    frames = np.stack([coded_frame(i, 32, 48) for i in range(6)])
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W)
    path = save_video(video, tmp_path / "t.mp4", fps=6)
    assert frame_index(read_clip(path)) == list(range(6))


def test_odd_size_is_padded_by_one_edge_row_and_column(tmp_path, coded_frame):
    frames = np.stack([coded_frame(i, 33, 47) for i in range(4)])
    path = write_video(frames, tmp_path / "odd.mp4")
    info = probe(path)
    assert (info.width, info.height) == (48, 34)
    back = read_clip(path).astype(np.int16)
    assert np.abs(back[:, :33, :47] - frames).mean() < 3.0
    # The pad repeats the last row/column (edge mode), it is not black.
    assert np.abs(back[:, 33, :47] - frames[:, 32]).mean() < 8.0
    assert np.abs(back[:, :33, 47] - frames[:, :, 46]).mean() < 8.0


def test_lossless_round_trip_is_exact_at_odd_sizes(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 33, 31, 3), dtype=np.uint8)
    path = write_video(frames, tmp_path / "lossless.mp4", fps=8, lossless=True)
    assert (probe(path).width, probe(path).height) == (31, 33)  # no padding: RGB has no chroma subsampling
    assert np.array_equal(read_clip(path), frames)


def test_gif_round_trip(tmp_path, coded_frame, frame_index):
    frames = np.stack([coded_frame(i, 32, 48) for i in range(10)])
    path = write_gif(frames, tmp_path / "a.gif", fps=8)
    info = probe(path)
    assert (info.num_frames, info.width, info.height) == (10, 48, 32)
    back = read_clip(path)
    assert frame_index(back) == list(range(10))
    assert np.abs(back.astype(np.int16) - frames).mean() < 4.0  # grey levels survive the palette


def test_save_video_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="unsupported extension '.avi'"):
        save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.avi")


def test_read_by_start_frame_seconds_stride_and_fps(make_video, frame_index):
    path = make_video(num_frames=60, fps=10)
    assert frame_index(read_clip(path, 5, start_frame=7)) == [7, 8, 9, 10, 11]
    assert frame_index(read_clip(path, 4, start=2.0)) == [20, 21, 22, 23]
    assert frame_index(read_clip(path, 4, start_frame=3, frame_stride=3)) == [3, 6, 9, 12]
    assert frame_index(read_clip(path, 4, start=1.0, fps=5)) == [10, 12, 14, 16]  # 10 fps -> 5 fps
    up = frame_index(read_clip(path, 6, fps=20))  # 10 fps -> 20 fps repeats frames
    assert up == [0, 0, 1, 1, 2, 2]  # every frame shown for the same time
    assert frame_index(read_clip(path, None, start_frame=55)) == [55, 56, 57, 58, 59]  # None: to the end
    assert frame_index(read_frames(path, [40, 3, 40, 12])) == [40, 3, 40, 12]  # any order, repeats


def test_read_with_size_resizes_in_decoder(make_video, frame_index):
    path = make_video(num_frames=8, width=96, height=64)
    clip = read_clip(path, 3, start_frame=4, size=(72, 48))
    assert clip.shape == (3, 48, 72, 3)
    assert frame_index(clip) == [4, 5, 6]


def test_reading_late_frames_seeks_instead_of_decoding_everything(make_video, frame_index, monkeypatch):
    # libx264's default keyframe interval is 250, so a 400-frame video has a keyframe at or before 250.
    path = make_video(num_frames=400, width=64, height=48, fps=25)
    io.frame_pts(path)  # build the packet table outside the count (it demuxes, never decodes)
    decoded = {"frames": 0}
    real_open = av.open

    class CountingContainer:
        def __init__(self, container):
            self._c = container

        def __getattr__(self, name):
            return getattr(self._c, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._c.__exit__(*exc)

        def decode(self, *args, **kwargs):
            for frame in self._c.decode(*args, **kwargs):
                decoded["frames"] += 1
                yield frame

    monkeypatch.setattr(av, "open", lambda *a, **k: CountingContainer(real_open(*a, **k)))
    clip = read_clip(path, 16, start_frame=370)
    assert frame_index(clip) == list(range(370, 386))
    assert 16 <= decoded["frames"] <= 386 - 250 + 8, f"decoded {decoded['frames']} frames for a 16-frame late clip"


def test_images_read_as_one_frame_clips(make_image, frame_index):
    for name in ("still.png", "still.jpg", "still.webp"):
        path = make_image(name, width=96, height=64, index=5)
        info = probe(path)
        assert info.is_image and (info.num_frames, info.width, info.height) == (1, 96, 64)
        clip = read_clip(path, 4)
        assert clip.shape == (4, 64, 96, 3)
        assert frame_index(clip) == [5, 5, 5, 5]
        assert read_clip(path, 1, size=(48, 32)).shape == (1, 32, 48, 3)
    with pytest.raises(MediaError, match="only frame 0"):
        read_frames(path, [0, 1])


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "empty"),
        ("text", "not a readable video"),
        ("truncated", "not a readable video"),
        ("audio_only", r"no video stream \(found audio\)"),
        ("bad_image", "not a readable image"),
    ],
)
def test_bad_files_raise_media_error_naming_the_file(bad_media, kind, message):
    path = bad_media[kind]
    with pytest.raises(MediaError, match=message) as e:
        read_clip(path, 4)
    assert e.value.path == str(path) and str(path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_file_and_out_of_range_frames(tmp_path, make_video):
    with pytest.raises(MediaError, match="file not found"):
        probe(tmp_path / "nope.mp4")
    path = make_video(num_frames=10)
    with pytest.raises(MediaError, match="the video has 10"):
        read_clip(path, 4, start_frame=8)


def test_real_video_late_clip_matches_sequential_decode(shared_videos):
    rng = np.random.default_rng()  # a different late position each run; the equality must always hold
    for name in ("art-museum.mp4", "lagos.mp4"):
        path = shared_videos / name
        info = probe(path)
        assert (info.width, info.height) == (640, 360)
        start = int(rng.integers(info.num_frames // 2, info.num_frames - 16))
        clip = read_clip(path, 16, start_frame=start)
        with av.open(str(path)) as container:
            sequential = [
                f.to_ndarray(format="rgb24") for i, f in zip(range(start + 16), container.decode(video=0)) if i >= start
            ]
        assert np.array_equal(clip, np.stack(sequential)), (
            f"{name}: clip at frame {start} differs from sequential decode"
        )
