"""Buckets: clips at their native aspect ratio and duration, grouped into a few exact (T, H, W) sizes.

Sora trains on videos at native resolution, aspect ratio and duration; Open-Sora and Open-Sora-Plan do
it with buckets, and Latte showed that mixing images into video training improves FVD. A bucket set is
resolutions x frame counts x aspect ratios:

    buckets:
      resolutions: {"256px": [1, 17, 33], "360p": [1, 17]}   # frames per resolution; 1 = images
      aspect_ratios: ["1:1", "4:3", "3:4", "16:9", "9:16"]    # width:height

"256px" means an area of 256x256 pixels, "360p" that of 640x360 (16:9 with a 360-pixel short side); each
aspect ratio gets the height and width of that area, rounded to what the autoencoder and the DiT's patch
need. A clip goes to the bucket of its nearest aspect ratio with the most tokens that it fits (enough
frames, and no upscaling beyond `max_upscale`), is resized with its aspect kept and centre-cropped to the
bucket's size (ClipDataset). Each batch holds one bucket; a bucket's batch size scales with its token
count so tokens per batch (and memory per step) stay near what `batch_size` clips of the largest bucket
take.

Fixed-size data (no `buckets` section) is the one-bucket case, OneSize: the same datasets, sampler and
loader, with data's own crop, flip, short_policy and max_upscale, and no header probe of every file.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from minisora.data.clips import source_stride, source_window
from minisora.data.sources import ClipRecord, short_list
from minisora.io import MediaError, MediaInfo, probe

DEFAULT_ASPECTS = ["1:1", "4:3", "3:4", "16:9", "9:16"]
RESOLUTION = re.compile(r"(\d+)(px|p)?")


class BucketError(ValueError):
    """A bucket config that is malformed or that no clip of the dataset fits."""


@dataclass(frozen=True)
class Bucket:
    """One exact clip size; `tokens` is the DiT's token count for a clip of this size."""

    frames: int
    height: int
    width: int
    aspect: str  # the aspect ratio it stands for, width:height
    resolution: str  # the resolution key it came from ("256px"; "data" for OneSize)
    tokens: int | None  # None: OneSize without the model's geometry (one size needs no token-scaled batches)

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def is_image(self) -> bool:
        return self.frames == 1


@dataclass(frozen=True)
class Geometry:
    """What sizes the model can take: frames 1 + temporal*k, height/width multiples of spatial*patch."""

    temporal: int  # the autoencoder's temporal compression
    spatial: int  # its spatial compression
    patch: tuple[int, int, int]  # the DiT's (pt, ph, pw)

    @classmethod
    def of(cls, autoencoder, patch_size: Sequence[int] | None = None) -> Geometry:
        """From anything with temporal_/spatial_compression (an Autoencoder, or the `vae` config section) and the
        DiT's patch_size (None: VideoDiT's default, 1x2x2)."""
        patch = tuple(int(p) for p in (patch_size or (1, 2, 2)))
        return cls(int(autoencoder.temporal_compression), int(autoencoder.spatial_compression), patch)

    def frame_size(self, area: int, aspect: float) -> tuple[int, int]:
        """(H, W) of about `area` pixels at width/height `aspect`, each rounded to a size the model takes."""
        mh, mw = self.spatial * self.patch[1], self.spatial * self.patch[2]
        return max(mh, round(math.sqrt(area / aspect) / mh) * mh), max(mw, round(math.sqrt(area * aspect) / mw) * mw)

    def tokens(self, T: int, H: int, W: int) -> int:
        pt, ph, pw = self.patch
        t = 1 + (T - 1) // self.temporal  # causal: the first frame is encoded alone
        return -(-t // pt) * (H // (self.spatial * ph)) * (W // (self.spatial * pw))


def parse_aspect(text: str) -> float:
    """ "16:9" -> 16/9 (width over height)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", str(text))
    if not m or float(m[1]) <= 0 or float(m[2]) <= 0:
        raise BucketError(f"buckets.aspect_ratios: {text!r} is not width:height (e.g. '16:9')")
    return float(m[1]) / float(m[2])


def _misfit(b: Bucket) -> float:
    """How far a bucket's real width/height is from the aspect ratio it stands for (log scale)."""
    return abs(math.log(b.width / b.height / parse_aspect(b.aspect)))


def parse_resolution(text: str) -> int:
    """Pixel area of a resolution key: "256px" = 256x256, "360p" = 640x360 (16:9), "256" = 256x256."""
    m = RESOLUTION.fullmatch(str(text).strip())
    if not m or int(m[1]) < 1:
        raise BucketError(f"buckets.resolutions: key {text!r} is not a resolution like '256px' (256x256) or '360p' (640x360)")
    side = int(m[1])
    return side * side * 16 // 9 if m[2] == "p" else side * side


class BucketSpec:
    """The `buckets` config section: which (resolution, frames, aspect) sizes exist and how they are filled."""

    drop_last = False  # the DiT trains on each bucket's short last batch too: a small bucket would never train

    def __init__(
        self,
        resolutions: dict[str, list[int]],
        aspect_ratios: list[str] | None = None,
        max_upscale: float = 1.0,
        image_fraction: float | None = None,
        max_batch_size: int | None = None,
    ):
        """resolutions: frame counts per resolution ("256px": [1, 17, 33]); aspect_ratios: width:height.

        max_upscale: a clip may be enlarged at most this much to fill a bucket (1.0: never); smaller clips
        go to a smaller bucket or are skipped and counted. image_fraction: None keeps the data's own mix
        (still images and too-short videos fill the 1-frame buckets); a number makes that fraction of the
        steps image batches, filled with still images and one random frame of every video (Latte's and
        Open-Sora's image-video joint training). max_batch_size caps the batch of small buckets.
        """
        if not resolutions:
            raise BucketError("buckets.resolutions: give at least one resolution, e.g. {'256px': [1, 17]}")
        self.resolutions = {str(k): [int(f) for f in v] for k, v in dict(resolutions).items()}
        for key, frames in self.resolutions.items():
            parse_resolution(key)
            if not frames or any(f < 1 for f in frames):
                raise BucketError(f"buckets.resolutions.{key}: expected a list of frame counts >= 1, got {frames}")
        self.aspect_ratios = [str(a) for a in (aspect_ratios or DEFAULT_ASPECTS)]
        for a in self.aspect_ratios:
            parse_aspect(a)
        if not max_upscale >= 1:
            raise BucketError(f"buckets.max_upscale must be >= 1 (1 = never upscale), got {max_upscale!r}")
        if image_fraction is not None and not 0 <= image_fraction < 1:
            raise BucketError(f"buckets.image_fraction must be in [0, 1) or null, got {image_fraction!r}")
        if image_fraction and not any(1 in frames for frames in self.resolutions.values()):
            raise BucketError(f"buckets.image_fraction {image_fraction:g} needs 1-frame buckets to fill: add 1 to a "
                              f"resolution's frames, e.g. {next(iter(self.resolutions))}: [1, ...]")
        if max_batch_size is not None and max_batch_size < 1:
            raise BucketError(f"buckets.max_batch_size must be >= 1 or null, got {max_batch_size!r}")
        self.max_upscale, self.image_fraction, self.max_batch_size = float(max_upscale), image_fraction, max_batch_size

    def build(self, geometry: Geometry) -> list[Bucket]:
        """The distinct bucket sizes for a model of this geometry, largest token count first."""
        kt = geometry.temporal
        out: dict[tuple[int, int, int], Bucket] = {}
        for key, frames in self.resolutions.items():
            area = parse_resolution(key)
            for T in frames:
                if (T - 1) % kt:
                    valid = ", ".join(str(1 + kt * k) for k in range(5))
                    raise BucketError(
                        f"buckets.resolutions.{key}: {T} frames does not fit the autoencoder's {kt}x temporal "
                        f"compression; frame counts must be 1 + {kt}k ({valid}, ...)"
                    )
                for aspect in self.aspect_ratios:
                    H, W = geometry.frame_size(area, parse_aspect(aspect))
                    size = (T, H, W)
                    bucket = Bucket(T, H, W, aspect, key, geometry.tokens(T, H, W))
                    # Two aspect ratios may round to one size at small resolutions: it stands for the closer one.
                    if size not in out or _misfit(bucket) < _misfit(out[size]):
                        out[size] = bucket
        return sorted(out.values(), key=lambda b: (-b.tokens, -b.frames, -b.height * b.width, b.name))

    def batch_sizes(self, buckets: Sequence[Bucket], batch_size: int) -> list[int]:
        """Clips per batch per bucket: `batch_size` for the largest bucket, more for smaller ones (tokens ~ constant).

        A bucket of n tokens gets floor(budget / n) clips with budget = batch_size x the largest bucket's tokens, so
        a batch holds between budget - n and budget tokens (at least 1 clip; at most max_batch_size).
        """
        budget = batch_size * max(b.tokens for b in buckets)
        cap = self.max_batch_size or budget
        return [max(1, min(cap, budget // b.tokens)) for b in buckets]


    def place(self, records: Sequence[ClipRecord], buckets: Sequence[Bucket], *, fps: float | None,
              frame_stride: int) -> Assignment:  # fmt: skip
        """Probe every record (header only) and put each in its bucket (`assign` with this spec's options)."""
        return assign(records, probe_all(records), buckets, max_upscale=self.max_upscale, fps=fps,
                      frame_stride=frame_stride, image_frames=bool(self.image_fraction))  # fmt: skip

    def clip_options(self, bucket: Bucket, clip_args: dict) -> dict:
        """ClipDataset options of a bucket's clips: its exact size, centre crop, short clips skipped (never looped)."""
        return {**clip_args, "num_frames": bucket.frames, "height": bucket.height, "width": bucket.width,
                "crop": "center", "short_policy": "skip", "max_upscale": self.max_upscale}  # fmt: skip


class OneSize:
    """Fixed-size data as one bucket: every clip, whatever its aspect ratio, resized and cropped to data's size.

    Nothing is probed up front (a header read per file is minutes on a large dataset): ClipDataset skips
    unreadable, too short or too small files when it meets them, naming each, and data's crop, flip,
    short_policy and max_upscale apply as configured. The interface of BucketSpec, for the one size.
    """

    image_fraction = None
    # The DiT drops the short last batch (every clip is in the one bucket and reshuffled each epoch), so W
    # processes train exactly like one with W times the batch for any clip count (tests/test_distributed.py).
    drop_last = True

    def __init__(self, num_frames: int, height: int, width: int, max_upscale: float = 4.0):
        self.size, self.max_upscale = (int(num_frames), int(height), int(width)), float(max_upscale)

    def build(self, geometry: Geometry | None = None) -> list[Bucket]:
        T, H, W = self.size
        tokens = geometry.tokens(T, H, W) if geometry is not None else None
        return [Bucket(T, H, W, f"{W}:{H}", "data", tokens)]

    def batch_sizes(self, buckets: Sequence[Bucket], batch_size: int) -> list[int]:
        return [batch_size] * len(buckets)

    def place(self, records: Sequence[ClipRecord], buckets: Sequence[Bucket], *, fps: float | None,
              frame_stride: int) -> Assignment:  # fmt: skip
        """Every record in the one bucket, unprobed (fps and frame_stride matter only when a clip is read)."""
        return Assignment(list(buckets), [list(range(len(records)))], [], [], [[]])

    def clip_options(self, bucket: Bucket, clip_args: dict) -> dict:
        return dict(clip_args)


# ---- assignment --------------------------------------------------------------------------------------
@dataclass
class Assignment:
    """Which bucket each record went to: members[b] lists record indices; skipped lists (path, why)."""

    buckets: list[Bucket]
    members: list[list[int]]
    skipped: list[tuple[str, str]]
    sizes: list[tuple[int, int, int]]  # (width, height, frames) of every probed clip, for error messages
    frames: list[list[int]]  # per 1-frame bucket: videos that also give it one random frame (image_frames)

    def bucket_of(self) -> dict[int, int]:
        """record index -> bucket index (the main bucket; frame items of image_fraction are not listed)."""
        return {r: b for b, rs in enumerate(self.members) for r in rs}

    def reasons(self) -> Counter:
        return Counter(why.split(":")[0] for _, why in self.skipped)


def max_frames(available: int, stride: float) -> int:
    """The longest clip (in frames) that `available` source frames give at this stride."""
    return int((available - 1) / stride + 1e-6) + 1 if available > 0 else 0


def probe_all(records: Sequence[ClipRecord], threads: int = 8) -> list[MediaInfo | str]:
    """Header probe of every record (no decoding), in threads (PyAV releases the GIL); a string says why one failed."""

    def one(r: ClipRecord) -> MediaInfo | str:
        try:
            return probe(r.path)
        except MediaError as e:
            return e.reason
        except Exception as e:  # noqa: BLE001  (any decoder error means this file cannot give a clip)
            return f"{type(e).__name__}: {e}"

    paths = {r.path for r in records}
    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        infos = dict(zip(sorted(paths), pool.map(one, [ClipRecord(p, "") for p in sorted(paths)])))
    return [infos[r.path] for r in records]


def assign(
    records: Sequence[ClipRecord],
    infos: Sequence[MediaInfo | str],
    buckets: Sequence[Bucket],
    *,
    max_upscale: float = 1.0,
    fps: float | None = None,
    frame_stride: int = 1,
    image_frames: bool = False,
    any_length: bool = False,
) -> Assignment:
    """Put each record in the bucket of its nearest aspect ratio with the most tokens that it fits.

    A clip fits a bucket when it has the frames (at `fps` or `frame_stride`) and reaching the bucket's size
    needs at most `max_upscale`; still images fit 1-frame buckets only. Records that fit no bucket, or whose
    probe failed, are skipped with the reason. With `image_frames`, every video placed in a video bucket
    also gives one frame to the largest 1-frame bucket of its aspect that it fits (joint image training).
    `any_length` lets short videos fit any length (fixed-size mode with short_policy="loop").
    """
    aspects = sorted({b.aspect for b in buckets}, key=parse_aspect)
    members: list[list[int]] = [[] for _ in buckets]
    frame_members: list[list[int]] = [[] for _ in buckets]
    skipped: list[tuple[str, str]] = []
    sizes: list[tuple[int, int, int]] = []
    for i, (record, info) in enumerate(zip(records, infos)):
        if isinstance(info, str):
            skipped.append((record.path, f"unreadable: {info}"))
            continue
        if info.is_image:
            frames = 1
        else:
            lo, hi = source_window(record, info, info.num_frames)  # the same window ClipDataset reads from
            frames = max_frames(max(0, hi - lo), source_stride(info, fps, frame_stride))
        sizes.append((info.width, info.height, frames))
        ratio = info.width / info.height
        aspect = min(aspects, key=lambda a: abs(math.log(parse_aspect(a) / ratio)))
        fits = [
            k for k, b in enumerate(buckets)
            if b.aspect == aspect and (b.frames <= frames or any_length) and max(b.height / info.height, b.width / info.width) <= max_upscale
        ]  # fmt: skip
        if fits:
            best = min(fits, key=lambda k: (-buckets[k].tokens, k))
            members[best].append(i)
            images = [k for k in fits if buckets[k].is_image]
            if image_frames and images and not buckets[best].is_image:
                frame_members[min(images, key=lambda k: (-buckets[k].tokens, k))].append(i)
            continue
        same = [b for b in buckets if b.aspect == aspect]
        smallest = min(same, key=lambda b: (b.height * b.width, b.frames))
        shortest = min(b.frames for b in same)
        if frames < shortest:
            why = f"too short: {frames} frames (the shortest {aspect} bucket needs {shortest})"
        else:
            why = (f"too small: {info.width}x{info.height} for the smallest {aspect} bucket "
                   f"{smallest.width}x{smallest.height} (max_upscale {max_upscale:g})")  # fmt: skip
        skipped.append((record.path, why))
    result = Assignment(list(buckets), members, skipped, sizes, frame_members)
    if not any(members):
        raise BucketError(no_fit_message(result, len(records)))
    return result


def no_fit_message(a: Assignment, n: int) -> str:
    """Why no clip fits: the range of clip sizes seen next to the bucket sizes."""
    sizes = a.sizes
    seen = "none could be read"
    if sizes:
        w = [s[0] for s in sizes]
        h = [s[1] for s in sizes]
        f = [s[2] for s in sizes]
        seen = f"widths {min(w)}-{max(w)}, heights {min(h)}-{max(h)} pixels, {min(f)}-{max(f)} frames (at the clip stride)"
    bucket_list = ", ".join(b.name for b in sorted(a.buckets, key=lambda b: b.tokens))
    reasons = ", ".join(f"{why}: {n}" for why, n in a.reasons().most_common())
    return (
        f"no clip fits any bucket: the {n} clips have {seen}; the buckets (frames x height x width) are {bucket_list}. "
        f"Add smaller resolutions or fewer frames to buckets.resolutions, or raise buckets.max_upscale. "
        f"Skipped ({reasons}), e.g. {short_list([f'{p}: {why}' for p, why in a.skipped[:2]])}"
    )
