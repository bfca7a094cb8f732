"""ClipDataset: a ClipRecord -> a (3, T, H, W) clip in [-1, 1] with its caption; bad files skipped and counted.

Sampling: `num_frames` frames `frame_stride` apart, or resampled to `fps`, starting at a random frame
within the record's [start, end] (train) or the centred window (val). Frames are resized in
libswscale while decoding so the short side fits (height, width), then cropped (random or centre).

Bad input never stops a run and never goes unreported. A file that cannot give the clip (empty,
truncated, not a video, audio only, unreadable image, too short under short_policy="skip", too
small to upscale) is remembered as bad in this process, warned about once (SkippedClipWarning naming
the file and why), and another record is returned instead; the item's `skipped` lists what was
passed over. Only when every record fails does the dataset raise, naming its source. The stand-in is
`substitute_stride(N)` records further on (then twice that, ...), not the next one: a run of
consecutive bad files (a corrupt folder) would otherwise make the one file after it appear once per
bad file every epoch.

Randomness: one numpy Generator per process, seeded from (seed, torch.initial_seed()). In a
DataLoader worker torch.initial_seed() is the worker's seed, drawn from the loader's generator, so a
seeded loader repeats runs exactly and each epoch (or persistent worker) gets fresh clips; an
epoch counter set in the main process would never reach persistent workers. In the main process
(num_workers=0) it follows torch.manual_seed / seed_everything. Validation (train=False) uses no
randomness at all: centred window, centre crop, no flip.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import av
import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from minisora.data.sources import ClipRecord, Skipped, load_records, short_list
from minisora.io import MediaError, MediaInfo, clip_indices, frame_pts, probe, read_frames

CROPS = ("random", "center")
SHORT_POLICIES = ("skip", "loop")
# Errors that mean "this file cannot give a clip"; anything else is a bug and propagates.
FILE_ERRORS = (MediaError, av.error.FFmpegError, OSError, EOFError)
# A file whose packets hold fewer frames than its header claims (beyond rounding in estimated
# counts) was cut off, e.g. an interrupted download of a "faststart" mp4.
TRUNCATION_TOLERANCE = 0.02


class SkippedClipWarning(UserWarning):
    """A file ClipDataset passed over; the message names the file and why."""


def substitute_stride(n: int) -> int:
    """A step coprime with n near n / golden ratio, so index + k * step (mod n), k = 0 .. n-1, visits every record once.

    Consecutive bad indices i, i+1, ... get the stand-ins i+step, i+1+step, ...: different files spread over
    the dataset. With step 1, 6 consecutive corrupt files among 16 made the next file 7 of an epoch's 16
    items; with this step no file gets more than 3 (tests/test_data_faults.py).
    """
    step = max(1, round(n * 0.6180339887))
    while math.gcd(step, n) != 1:
        step += 1
    return step % n or 1


def source_stride(info: MediaInfo, fps: float | None, frame_stride: int) -> float:
    """Source frames per clip frame: resampled to `fps`, or every `frame_stride`-th frame."""
    return info.fps / fps if fps else float(frame_stride)


def source_window(record: ClipRecord, info: MediaInfo, count: int) -> tuple[int, int]:
    """[lo, hi): the source frames of a video of `count` frames that lie within the record's [start, end] seconds."""
    lo = math.ceil(record.start * info.fps - 1e-6) if record.start is not None else 0
    hi = min(count, math.ceil(record.end * info.fps - 1e-6)) if record.end is not None else count
    return lo, hi


class ClipDataset(Dataset):
    """Map-style dataset of clips; item = dict(video, caption, label, path, skipped)."""

    def __init__(
        self,
        records: Sequence[ClipRecord],
        num_frames: int = 17,
        height: int = 32,
        width: int = 32,
        frame_stride: int = 1,
        fps: float | None = None,
        crop: str = "random",
        flip: bool = False,
        short_policy: str = "skip",
        max_upscale: float = 4.0,
        seed: int = 0,
        train: bool = True,
        source: str | None = None,
    ):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if short_policy not in SHORT_POLICIES:
            raise ValueError(f"short_policy must be one of {', '.join(SHORT_POLICIES)}, got {short_policy!r}")
        for name, value in (
            ("num_frames", num_frames),
            ("height", height),
            ("width", width),
            ("frame_stride", frame_stride),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0 or None (use frame_stride), got {fps!r}")
        if fps is not None and frame_stride != 1:
            raise ValueError(f"give fps ({fps}) or frame_stride ({frame_stride}), not both")
        if not max_upscale >= 1:
            raise ValueError(f"max_upscale must be >= 1, got {max_upscale!r}")
        if len(records) == 0:
            raise ValueError(f"{source or 'ClipDataset'}: no records")
        self.records = list(records)
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.frame_stride, self.fps = int(frame_stride), fps
        self.crop, self.flip, self.short_policy = crop, flip, short_policy
        self.max_upscale, self.seed, self.train = float(max_upscale), seed, train
        self.source = source or f"{len(self.records)} records starting with {self.records[0].path}"
        # Per-process state (each DataLoader worker has its own copy): nothing is probed up front.
        self._bad: dict[int, str] = {}  # record index -> why it cannot give a clip
        self._warned: set[str] = set()  # paths already warned about in this process
        self._media: dict[int, tuple[MediaInfo, int]] = {}  # record index -> (probe, usable frame count)
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None
        self._stride = substitute_stride(len(self.records))  # where a bad record's stand-in is looked for

    @classmethod
    def from_path(cls, path: str, format: str = "auto", **kwargs) -> ClipDataset:
        """Load records from a manifest or folder (see sources.load_records) and build the dataset."""
        records, _ = load_records(path, format)
        return cls(records, source=str(path), **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        N = len(self.records)
        skipped: Skipped = []
        for k in range(N):
            i = (index + k * self._stride) % N
            video = self._try(i, self._generator() if self.train else None)
            if video is not None:
                r = self.records[i]
                return {"video": video, "caption": r.caption, "label": r.label, "path": r.path, "skipped": skipped}
            skipped.append((self.records[i].path, self._bad[i]))
        examples = short_list([f"{p}: {reason}" for p, reason in skipped])
        raise RuntimeError(f"{self.source}: none of the {N} clips could be read; {examples}")

    def check(self, num: int = 8) -> tuple[int, Skipped]:
        """Load up to `num` records spread over the dataset (deterministically); return (usable count, failures)."""
        picks = sorted(set(np.linspace(0, len(self) - 1, min(num, len(self))).round().astype(int).tolist()))
        failures = [(self.records[i].path, self._bad[i]) for i in picks if self._try(i, None) is None]
        return len(picks) - len(failures), failures

    # -----------------------------------------------------------------------------------------

    def _generator(self) -> np.random.Generator:
        key = (os.getpid(), torch.initial_seed())
        if self._rng_key != key:  # first use in this process, or torch was reseeded
            self._rng, self._rng_key = np.random.default_rng([self.seed, key[1]]), key
        return self._rng

    def _try(self, i: int, rng: np.random.Generator | None) -> torch.Tensor | None:
        """The clip of record i, or None after remembering (and warning once) why it failed."""
        if i in self._bad:
            return None
        record = self.records[i]
        try:
            return self._load(record, self._probe(i), rng)
        except FILE_ERRORS as e:
            reason = e.reason if isinstance(e, MediaError) else f"{type(e).__name__}: {e}"
        self._bad[i] = reason
        if record.path not in self._warned:
            self._warned.add(record.path)
            line = f" (manifest line {record.source_line})" if record.source_line else ""
            warnings.warn(f"skipping {record.path}{line}: {reason}", SkippedClipWarning, stacklevel=2)
        return None

    def _probe(self, i: int) -> tuple[MediaInfo, int]:
        """Probe and usable frame count of record i, cached per process."""
        if i not in self._media:
            path = self.records[i].path
            info = probe(path)
            count = info.num_frames
            if not info.is_image:
                count = min(count, len(frame_pts(path)))  # read_frames needs this table anyway (cached)
                if count < info.num_frames * (1 - TRUNCATION_TOLERANCE) - 1:
                    raise MediaError(
                        path, f"truncated: the header lists {info.num_frames} frames, the file holds {count}"
                    )
            self._media[i] = (info, count)
        return self._media[i]

    def _indices(self, record: ClipRecord, info: MediaInfo, count: int, rng: np.random.Generator | None) -> list[int]:
        """Source frame indices of the clip, within the record's [start, end]."""
        T = self.num_frames
        if info.is_image:
            if T > 1 and self.short_policy == "skip":
                raise MediaError(
                    record.path,
                    f"a still image is 1 frame, clips need {T} (short_policy='loop' makes it a static clip)",
                )
            return [0] * T
        stride = source_stride(info, self.fps, self.frame_stride)
        lo, hi = source_window(record, info, count)
        if lo >= count:
            raise MediaError(
                record.path, f"start {record.start:g} s is past the end of the video ({count / info.fps:.2f} s)"
            )
        span = round((T - 1) * stride) + 1  # source frames one clip covers
        available = hi - lo
        if available < 1:
            raise MediaError(
                record.path, f"no frame shown within [{record.start:g}, {record.end:g}] s at {info.fps:.3g} fps"
            )
        if available < span:
            if self.short_policy == "skip":
                window = f"in [{record.start or 0:g}, {record.end:g}] s " if record.end is not None else ""
                raise MediaError(
                    record.path,
                    f"too short: {available} frames {window}but a clip of {T} frames at stride {stride:.3g} needs {span} "
                    "(short_policy='loop' repeats short videos)",
                )
            return [lo + i % available for i in clip_indices(T, 0, stride)]  # loop from the start
        last_start = hi - span
        first = int(rng.integers(lo, last_start + 1)) if rng is not None else (lo + last_start) // 2
        return clip_indices(T, first, stride)

    def _load(self, record: ClipRecord, media: tuple[MediaInfo, int], rng: np.random.Generator | None) -> torch.Tensor:
        info, count = media
        H, W = self.height, self.width
        indices = self._indices(record, info, count, rng)
        scale = max(H / info.height, W / info.width)  # resize so the short side fits, then crop the long side
        if scale > self.max_upscale:
            raise MediaError(
                record.path,
                f"{info.width}x{info.height} is too small for {W}x{H} clips ({scale:.1f}x upscaling > max_upscale={self.max_upscale:g})",
            )
        size = (max(W, round(info.width * scale)), max(H, round(info.height * scale)))
        frames = read_frames(record.path, indices, size=None if size == (info.width, info.height) else size, info=info)
        _, h, w, _ = frames.shape  # (T, h, w, 3) uint8
        if rng is not None and self.crop == "random":
            y0, x0 = int(rng.integers(0, h - H + 1)), int(rng.integers(0, w - W + 1))
        else:
            y0, x0 = (h - H) // 2, (w - W) // 2
        frames = frames[:, y0 : y0 + H, x0 : x0 + W]  # (T, H, W, 3)
        if rng is not None and self.flip and rng.random() < 0.5:
            frames = frames[:, :, ::-1]
        # In numpy: single-threaded, 6 ms for 16x256x256 where torch's 2-thread ops took 45-65 ms on
        # this loaded 2-core machine (num_workers=0 runs them in the main process).
        video = np.ascontiguousarray(rearrange(frames, "t h w c -> c t h w"), dtype=np.float32)  # (3, T, H, W)
        video /= 127.5
        video -= 1.0
        return torch.from_numpy(video)
