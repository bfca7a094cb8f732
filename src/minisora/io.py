"""Video and image I/O on PyAV: probe, read clips by seeking, write mp4 (H.264) and GIF."""

from __future__ import annotations

import bisect
import io
import math
import os
from functools import lru_cache
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".ts"}


class MediaError(ValueError):
    """A file that cannot be read as the clip that was asked for; names the file and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class MediaInfo:
    path: str
    num_frames: int  # exact when the container says so, else estimated from duration * fps
    fps: float  # 0.0 for still images
    width: int
    height: int

    @property
    def is_image(self) -> bool:
        return self.fps == 0.0

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTS


def _open(path: str | Path) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError(path, f"not a readable video ({e.__class__.__name__}: {e})") from None
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        container.close()
        raise MediaError(path, f"no video stream (found {kinds})")
    return container


def _open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "file not found")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(path, f"not a readable image ({e})") from None
    return img.convert("RGB")


def probe(path: str | Path) -> MediaInfo:
    """Frame count, fps and size of a video or image, without decoding the video."""
    if is_image(path):
        img = _open_image(path)
        return MediaInfo(str(path), 1, 0.0, img.width, img.height)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if fps <= 0:
            raise MediaError(path, "video stream has no frame rate")
        n = stream.frames
        if not n:  # some containers (webm, mkv) do not store a frame count
            if stream.duration is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / av.time_base
            n = int(math.floor(seconds * fps + 1e-3))
        if n <= 0:
            raise MediaError(path, "video stream has no frames")
        return MediaInfo(str(path), n, fps, stream.codec_context.width, stream.codec_context.height)


@lru_cache(maxsize=512)
def _frame_pts(path: str, mtime_ns: int, size: int) -> tuple[int, ...]:
    """Presentation timestamps of every frame, in order, from the packets alone (no decoding).

    Frame durations in real files are irregular (e.g. 511/512 ticks), so an index computed from
    pts * average_rate drifts by one; this table makes frame indices exact. Cached per file.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0)
    return tuple(pts)


def frame_pts(path: str | Path) -> tuple[int, ...]:
    st = os.stat(path)
    return _frame_pts(str(path), st.st_mtime_ns, st.st_size)


def clip_indices(num_frames: int, start_frame: int = 0, stride: float = 1.0) -> list[int]:
    """Frame indices of a clip; a fractional stride resamples to a target fps."""
    # The frame on screen at each output time (floor), so 10 -> 20 fps shows every frame twice (0, 0, 1, 1, ...);
    # round() would round halves to even and repeat frames unevenly (0, 0, 1, 2, 2, ...).
    return [start_frame + math.floor(i * stride + 1e-6) for i in range(num_frames)]


def read_frames(
    path: str | Path,
    indices: Sequence[int],
    *,
    size: tuple[int, int] | None = None,
    info: MediaInfo | None = None,
) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed) as uint8 (N, H, W, 3).

    Seeks to the keyframe before the first wanted frame instead of decoding from the start and
    converts to RGB only the frames it returns. (Skipping non-reference frames on the way was
    measured: no gain on the 640x360 test videos, so it is not done.) `size=(width, height)` resizes in libswscale while converting.
    """
    if len(indices) == 0:
        raise ValueError("read_frames needs at least one frame index")
    if is_image(path):
        if any(i != 0 for i in indices):
            raise MediaError(path, f"an image has only frame 0, asked for {sorted(set(indices))[-1]}")
        img = _open_image(path)
        if size is not None:
            img = img.resize(size, Image.BICUBIC)
        return np.repeat(np.asarray(img)[None], len(indices), axis=0)

    info = info or probe(path)
    wanted = sorted(set(int(i) for i in indices))
    if wanted[0] < 0 or wanted[-1] >= info.num_frames:
        raise MediaError(path, f"frames {wanted[0]}..{wanted[-1]} asked, the video has {info.num_frames}")
    got: dict[int, np.ndarray] = {}
    table = frame_pts(path)
    if wanted[-1] >= len(table):
        raise MediaError(path, f"frame {wanted[-1]} asked, the file holds {len(table)} frames; it may be truncated")
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        first = wanted[0]
        if first > 0:
            container.seek(table[first], stream=stream, backward=True, any_frame=False)
        wanted_set = set(wanted)
        # One swscale context per read instead of one per frame: RGB+resize 24 -> 15 CPU ms per 16-frame
        # 256px clip from 640x360, and 12-16 -> 2-3 ms per 32x32 shapes clip (bench/data.py).
        reformatter = VideoReformatter()
        kw = {"width": size[0], "height": size[1]} if size is not None else {}
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                idx = bisect.bisect_left(table, frame.pts)
                if idx in wanted_set and idx not in got:
                    got[idx] = reformatter.reformat(frame, format="rgb24", **kw).to_ndarray()
                    if len(got) == len(wanted_set):
                        break
                elif idx > wanted[-1]:
                    break
        except av.error.FFmpegError as e:
            raise MediaError(path, f"decoding failed near frame {first} ({e})") from None
    if len(got) < len(wanted):
        missing = [i for i in wanted if i not in got]
        raise MediaError(
            path, f"decoded {len(got)} of {len(wanted)} frames (missing {missing[:4]}...); the file may be truncated"
        )
    return np.stack([got[int(i)] for i in indices])


def read_clip(
    path: str | Path,
    num_frames: int | None = None,
    *,
    start: float | None = None,
    start_frame: int | None = None,
    frame_stride: int = 1,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read `num_frames` frames (None: to the end) as uint8 (T, H, W, 3).

    The clip starts at `start` seconds or at `start_frame`; frames are `frame_stride` apart, or
    resampled to `fps` when given. Still images read as one frame.
    """
    if start is not None and start_frame is not None:
        raise ValueError("give start (seconds) or start_frame, not both")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    info = probe(path)
    if info.is_image:
        return read_frames(path, [0] * (num_frames or 1), size=size, info=info)
    first = int(round(start * info.fps)) if start is not None else (start_frame or 0)
    stride = info.fps / fps if fps else float(frame_stride)
    if num_frames is None:
        num_frames = int((info.num_frames - 1 - first) // stride) + 1
    indices = clip_indices(num_frames, first, stride)
    return read_frames(path, indices, size=size, info=info)


def to_uint8_frames(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """Accept uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1]; return uint8 (T, H, W, 3)."""
    if isinstance(video, torch.Tensor):
        if video.is_floating_point():
            if video.ndim != 4 or video.shape[0] != 3:
                raise ValueError(f"a float video tensor must be (3, T, H, W) in [-1, 1], got {tuple(video.shape)}")
            video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            video = video.permute(1, 2, 3, 0)  # (T, H, W, 3)
        video = video.cpu().numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
    return video


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def write_video(
    frames: np.ndarray | torch.Tensor, path: str | Path, fps: float = 8, crf: int = 17, lossless: bool = False
) -> Path:
    """Write frames as H.264 mp4: yuv420p at `crf` for viewing, or lossless RGB (libx264rgb, qp 0) for training data.

    yuv420p halves colour resolution, which costs a 32x32 shapes clip 29-31 dB of PSNR before any model sees
    it; lossless RGB decodes to exactly the frames written, at ~3.7 KB per 17x32x32 clip. Players outside
    ffmpeg often lack High 4:4:4, so only data meant for training should be lossless. yuv420p needs even
    sizes: odd ones are padded by one edge row/column.
    """
    frames = to_uint8_frames(frames)
    T, H, W, _ = frames.shape
    if not lossless and (H % 2 or W % 2):
        frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    path = Path(path)
    tmp = _atomic_target(path)
    with av.open(str(tmp), "w", format="mp4") as container:
        codec = "libx264rgb" if lossless else "libx264"
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        # mbtree=0: MB-tree rate control made 32x32 encodes differ between runs (up to 31 levels per channel);
        # without it the same frames always give the same bytes, at ~3% larger files (measured on shapes).
        quality = {"qp": "0"} if lossless else {"crf": str(crf)}
        stream.options = {**quality, "preset": "medium", "x264-params": "mbtree=0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)  # a killed run never leaves a half-written video under the real name
    return path


def gif_bytes(frames: np.ndarray | torch.Tensor, fps: float = 8) -> bytes:
    """An animated GIF that loops, as bytes (a file's content, or TensorBoard's video summary)."""
    images = [Image.fromarray(f) for f in to_uint8_frames(frames)]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
    return out.getvalue()


def write_gif(frames: np.ndarray | torch.Tensor, path: str | Path, fps: float = 8) -> Path:
    """Write an animated GIF that loops, for quick previews."""
    path = Path(path)
    tmp = _atomic_target(path)
    tmp.write_bytes(gif_bytes(frames, fps))
    os.replace(tmp, path)
    return path


def film_strip(frames: np.ndarray, max_frames: int = 9, gap: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (H, n*W + (n-1)*gap, 3): up to max_frames evenly spaced frames, grey gaps between."""
    idx = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
    sep = np.full((frames.shape[1], gap, 3), 96, np.uint8)  # (H, gap, 3): frame edges stay visible on black
    parts = [p for i in idx for p in (sep, frames[i])][1:] if gap else list(frames[idx])
    return np.concatenate(parts, axis=1)


def write_strips(videos: Sequence[np.ndarray], path: str | Path, max_frames: int = 9, min_height: int = 96) -> Path:
    """One PNG with a film strip per video (a row each), scaled up (nearest) to at least min_height px rows.

    What a README or an issue can show of a sample: a still image, where a video would be a generated file.
    """
    rows = [film_strip(to_uint8_frames(v), max_frames, gap=1) for v in videos]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]  # 2 px black between rows
    image = Image.fromarray(np.concatenate(rows, axis=0))
    k = max(1, -(-min_height // videos[0].shape[1]))
    image = image.resize((image.width * k, image.height * k), Image.NEAREST)
    path = Path(path)
    tmp = _atomic_target(path)
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_video(video: np.ndarray | torch.Tensor, path: str | Path, fps: float = 8) -> Path:
    """Save frames as .mp4 or .gif, chosen by the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return write_gif(video, path, fps)
    if suffix == ".mp4":
        return write_video(video, path, fps)
    raise ValueError(f"{path}: unsupported extension {suffix!r}; use .mp4 or .gif")
