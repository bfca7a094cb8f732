"""Shared fixtures: small videos written with PyAV whose frames say which frame they are, and bad files.

A coded frame shows its index in binary as vertical bars across the top half (bit 0 on the left,
white = 1), which survives H.264, GIF palettes and resizing, so a test can check exactly which
frames a reader returned. The bottom half is a left-to-right grey ramp, so a crop's offset can be read
back from the first column.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from minisora.io import write_video

INDEX_BITS = 9  # frames 0..511
SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"


def make_coded_frame(index: int, height: int = 64, width: int = 96) -> np.ndarray:
    """A uint8 (H, W, 3) frame whose top half encodes `index` as INDEX_BITS bars."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"coded frames hold indices 0..{2**INDEX_BITS - 1}, got {index}")
    frame = np.zeros((height, width, 3), np.uint8)
    edges = np.linspace(0, width, INDEX_BITS + 1).round().astype(int)
    for bit in range(INDEX_BITS):
        if index >> bit & 1:
            frame[: height // 2, edges[bit] : edges[bit + 1]] = 255
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    frame[height // 2 :] = ramp[None, :, None]
    return frame


def decode_index(frame: np.ndarray) -> int:
    """Inverse of make_coded_frame for one uint8 (H, W, 3) frame, also after resizing."""
    H, W, _ = frame.shape
    top = frame[H // 8 : 3 * H // 8].astype(np.float32).mean(axis=(0, 2))  # (W,)
    edges = np.linspace(0, W, INDEX_BITS + 1)
    index = 0
    for bit in range(INDEX_BITS):
        lo, hi = edges[bit], edges[bit + 1]
        middle = top[int(np.ceil(lo + (hi - lo) / 3)) : int(np.floor(hi - (hi - lo) / 3)) + 1]
        if middle.mean() > 127:
            index |= 1 << bit
    return index


def to_frames(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (T, H, W, 3) from either uint8 (T, H, W, 3) or a float (3, T, H, W) tensor in [-1, 1]."""
    if isinstance(video, torch.Tensor):
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return np.asarray(video)


@pytest.fixture
def make_video(tmp_path):
    """Factory: make_video(name, num_frames, width, height, fps, first=0) -> path of a coded H.264 mp4."""

    def make(
        name: str = "clip.mp4",
        num_frames: int = 24,
        width: int = 96,
        height: int = 64,
        fps: float = 10.0,
        first: int = 0,
    ) -> Path:
        frames = np.stack([make_coded_frame(first + i, height, width) for i in range(num_frames)])
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_video(frames, path, fps=fps)

    return make


@pytest.fixture
def make_image(tmp_path):
    """Factory: make_image(name, width, height, index=0) -> path of a coded still image (png/jpg/webp by suffix)."""

    def make(name: str = "image.png", width: int = 96, height: int = 64, index: int = 0) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_coded_frame(index, height, width)).save(path)
        return path

    return make


@pytest.fixture
def coded_frame():
    """Function: coded_frame(index, height=64, width=96) -> uint8 (H, W, 3) showing `index`."""
    return make_coded_frame


@pytest.fixture
def frame_index():
    """Function: frame indices encoded in a clip, uint8 (T, H, W, 3) or float (3, T, H, W)."""
    return lambda video: [decode_index(f) for f in to_frames(video)]


def write_audio_only(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    """An .mp4 (or other container) holding one AAC audio stream and no video."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for i in range(0, len(tone), 1024):
            chunk = tone[None, i : i + 1024]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def bad_media(tmp_path, make_video) -> dict[str, Path]:
    """One file of each broken kind: empty, text named .mp4, truncated mp4, audio-only mp4, broken png."""
    bad = tmp_path / "bad"
    bad.mkdir()
    files = {"empty": bad / "empty.mp4", "text": bad / "notes.mp4", "truncated": bad / "truncated.mp4"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is a text file, not a video\n" * 20)
    whole = make_video("whole.mp4", num_frames=40).read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["audio_only"] = write_audio_only(bad / "audio.mp4")
    files["bad_image"] = bad / "broken.png"
    files["bad_image"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 30)
    return files


@pytest.fixture
def shared_videos() -> Path:
    """The real 640x360 H.264 test videos in ../shared/videos, or skip."""
    if not (SHARED_VIDEOS / "manifest.csv").is_file():
        pytest.skip(f"../shared/videos not found at {SHARED_VIDEOS} (real test videos live outside the repository)")
    return SHARED_VIDEOS


def pytest_configure(config):
    """One torch thread for the suite: tiny models gain nothing from two, and on a shared 2-core
    machine two spinning OpenMP threads per process made steps 10-100x slower (measured).
    MINISORA_TEST_THREADS overrides."""
    import os

    threads = os.environ.get("MINISORA_TEST_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", threads)  # for subprocesses (CLI runs, notebook kernels)
    torch.set_num_threads(int(threads))
