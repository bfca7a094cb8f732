"""VideoDataModule: clips from a manifest or folder, a deterministic train/val split, seeded resumable loaders.

Clips come in buckets (data/buckets.py): with a bucket set they keep their aspect ratio and duration, each
assigned to a bucket; without one (fixed size) every clip is in the one bucket of data's size (OneSize).
Each bucket is a ClipDataset at its exact size, batches come from one bucket at a time, and one loader
builder (data/loader.py) serves training, validation and the latent cache's encoding.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from minisora.data.bucket_sampler import BucketBatches
from minisora.data.buckets import Assignment, Bucket, BucketError, BucketSpec, Geometry, OneSize
from minisora.data.clips import CROPS, SHORT_POLICIES, ClipDataset
from minisora.data.loader import LoaderOptions, loader_failure_hint, make_loader
from minisora.data.sources import FORMATS, ClipRecord, load_records, short_list

NUM_CHECKED = 8  # clips decoded at setup to fail fast when none is usable (~0.1 s each at 640x360)


def collate_clips(items: list[dict]) -> dict:
    """Stack videos to (B, 3, T, H, W); captions and paths stay lists, labels a LongTensor, skips concatenated."""
    return {
        "video": torch.stack([it["video"] for it in items]),  # (B, 3, T, H, W)
        "caption": [it["caption"] for it in items],
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "path": [it["path"] for it in items],
        "skipped": [s for it in items for s in it["skipped"]],
        # Items that stand in for a bad record (a copy of another file's clip): the latent cache drops them.
        "substitute": torch.tensor([bool(it["skipped"]) for it in items], dtype=torch.bool),  # (B,)
    }


def fetch_clips(dataset: ClipDataset, rows: list[int]) -> dict:
    """One batch of a bucket's ClipDataset (BucketBatches' `fetch`)."""
    return collate_clips([dataset[i] for i in rows])


def _source_root(path: str) -> str:
    path = os.path.abspath(path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def split_records(
    records: list[ClipRecord], val_fraction: float, seed: int, root: str
) -> tuple[list[ClipRecord], list[ClipRecord]]:
    """(train, val) holding out about val_fraction of the records, whole files at a time.

    Files are ranked by a hash of (seed, path relative to root): the split depends on neither the
    record order nor the folder the data was moved to, clips cut from one video never straddle
    train and val, and files added later rarely move an existing val file into train.
    """
    if val_fraction <= 0 or len(records) < 2:
        return list(records), []
    by_file: dict[str, list[ClipRecord]] = defaultdict(list)
    for r in records:
        by_file[r.path].append(r)
    if len(by_file) < 2:
        warnings.warn(f"{root}: all records come from one file; no validation split (set val_path)", stacklevel=2)
        return list(records), []

    def rank(path: str) -> bytes:
        return hashlib.blake2b(f"{seed}\0{os.path.relpath(path, root)}".encode(), digest_size=8).digest()

    n_val = max(1, round(val_fraction * len(records)))
    val_files: set[str] = set()
    taken = 0
    for path in sorted(by_file, key=rank):
        if taken >= n_val or len(val_files) == len(by_file) - 1:  # keep at least one train file
            break
        val_files.add(path)
        taken += len(by_file[path])
    return [r for r in records if r.path not in val_files], [r for r in records if r.path in val_files]


class VideoDataModule(L.LightningDataModule):
    """Clips of `num_frames` at height x width with captions, from a manifest or folder (see sources.py).

    val_path, when given, is the validation source and val_fraction is ignored. Errors in the source
    surface in setup(), which also decodes a few clips and fails fast when none is usable.
    """

    def __init__(
        self,
        path: str = "data/shapes/manifest.csv",
        format: str = "auto",
        num_frames: int = 17,
        height: int = 32,
        width: int = 32,
        frame_stride: int = 1,
        fps: float | None = None,
        crop: str = "random",
        flip: bool = False,
        short_policy: str = "skip",
        max_upscale: float = 4.0,
        val_fraction: float = 0.05,
        val_path: str | None = None,
        vae_batch_size: int = 8,  # clips per batch of the autoencoder stage (the DiT's: latents.dit_batch_size)
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = True,
        timeout: float = 120.0,
        seed: int = 0,
        manifest: str | None = None,
        buckets: BucketSpec | None = None,
        geometry: Geometry | None = None,
    ):
        """`buckets` (with the model's `geometry`) replaces the one clip size num_frames x height x width."""
        super().__init__()
        path = manifest or path  # `data.manifest=clips.csv` reads as what it is; same as data.path
        for name, value, allowed in (
            ("format", format, FORMATS),
            ("crop", crop, CROPS),
            ("short_policy", short_policy, SHORT_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if vae_batch_size < 1 or num_workers < 0 or timeout < 0:
            raise ValueError(f"need vae_batch_size >= 1, num_workers >= 0, timeout >= 0; got {vae_batch_size}, "
                             f"{num_workers}, {timeout}")  # fmt: skip
        if buckets is not None and geometry is None:
            raise ValueError("VideoDataModule: buckets need the model's geometry (autoencoder compression, DiT patch)")
        self.save_hyperparameters(ignore=["buckets", "geometry"])
        self.spec, self.geometry = buckets, geometry  # spec: the `buckets` section, None for fixed size
        self.plan: BucketSpec | OneSize = buckets if buckets is not None else OneSize(num_frames, height, width, max_upscale)
        self.buckets: list[Bucket] = self.plan.build(geometry)
        self.assignment: Assignment | None = None  # where the training clips went
        self.path, self.format, self.val_path = path, format, val_path
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.timeout = vae_batch_size, timeout
        self.loader_options = LoaderOptions(num_workers, timeout, pin_memory, seed, persistent_workers)
        self.clip_args = {
            "num_frames": num_frames, "height": height, "width": width, "frame_stride": frame_stride, "fps": fps,
            "crop": crop, "flip": flip, "short_policy": short_policy, "max_upscale": max_upscale, "seed": seed,
        }  # fmt: skip
        self.train_buckets: list[Bucket] = []
        self.val_buckets: list[Bucket] = []
        self.train_set: BucketBatches | None = None
        self.val_set: BucketBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records, skipped = load_records(self.path, self.format)
        if self.val_path:
            train, (val, val_skipped) = records, load_records(self.val_path, self.format)
            skipped += val_skipped
        else:
            train, val = split_records(records, self.val_fraction, self.seed, _source_root(self.path))
        self.assignment = self.assign(train)
        self.train_buckets, datasets = self.bucket_datasets(train, self.assignment, train=True)
        self.train_set = BucketBatches(datasets, fetch_clips)
        try:
            val_assignment = self.assign(val) if val else None
        except BucketError as e:  # validation is optional: say why there is none, train on
            rank_zero_warn(f"VideoDataModule: no validation clips: {e}")
            val_assignment = None
        if val_assignment is not None:
            self.val_buckets, vsets = self.bucket_datasets(val, val_assignment, train=False,
                                                           source=self.val_path or self.path)  # fmt: skip
            self.val_set = BucketBatches(vsets, fetch_clips)
        usable, checked = self._check(datasets)
        a = self.clip_args
        sampling = f"{a['fps']:g} fps" if a["fps"] else f"stride {a['frame_stride']}"
        counts = ", ".join(f"{b.name}: {len(d)}" for b, d in zip(self.train_buckets, datasets))
        rank_zero_info(
            f"VideoDataModule: {len(self.train_set)} train / {len(self.val_set or [])} val clips from {self.path}"
            f"{f' and {self.val_path}' if self.val_path else ''} in {len(self.train_buckets)} bucket(s) ({counts}) "
            f"at {sampling}; {len(self.assignment.skipped)} files fit no bucket or were unreadable, {len(skipped)} "
            f"rows skipped; {usable}/{checked} checked clips readable"
        )

    def _check(self, datasets: list[ClipDataset]) -> tuple[int, int]:
        """Decode a few clips now (in the main process; forked workers inherit what was learned) so a source
        that is entirely unreadable, too short or too small fails here, not in a worker; (usable, checked)."""
        per_bucket = math.ceil(NUM_CHECKED / len(datasets))
        results = [d.check(per_bucket) for d in datasets]
        usable, failures = sum(u for u, _ in results), [f for _, fs in results for f in fs]
        if usable == 0:
            raise RuntimeError(
                f"{self.path}: none of the {len(failures)} clips checked is usable: "
                f"{short_list([f'{p}: {why}' for p, why in failures])}"
            )
        return usable, usable + len(failures)

    def assign(self, records: list[ClipRecord]) -> Assignment:
        """Put each record in its bucket (bucket sets probe every header; the one size takes every record as it is)."""
        return self.plan.place(records, self.buckets, fps=self.clip_args["fps"], frame_stride=self.clip_args["frame_stride"])

    def bucket_datasets(self, records: list[ClipRecord], assignment: Assignment, train: bool, repeat: int = 1,
                        source: str | None = None) -> tuple[list[Bucket], list[ClipDataset]]:  # fmt: skip
        """One ClipDataset per non-empty bucket (its clips at its size, the plan's options), each record `repeat` times."""
        used, datasets = [], []
        for bucket, members, frames in zip(assignment.buckets, assignment.members, assignment.frames):
            chosen = [records[i] for i in members + frames] * repeat
            if chosen:
                used.append(bucket)
                datasets.append(ClipDataset(chosen, train=train, source=f"{source or self.path} [{bucket.name}]",
                                            **self.plan.clip_options(bucket, self.clip_args)))  # fmt: skip
        return used, datasets

    def _loader(self, data: BucketBatches, buckets: list[Bucket], train: bool) -> DataLoader:
        # Every clip every epoch, the short last batch included: each bad file is met, and named, every epoch.
        return make_loader(data, buckets, self.plan, self.batch_size, train=train, options=self.loader_options,
                           trainer=self.trainer)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, self.train_buckets, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            self.setup("validate")
        return self._loader(self.val_set, self.val_buckets, train=False) if self.val_set is not None else []

    def on_exception(self, exception: BaseException) -> None:
        """Attach a hint to a DataLoader timeout or a dead worker (Lightning calls this when a fit fails)."""
        hint = loader_failure_hint(exception, self.timeout)
        if hint is None:
            return
        if hasattr(exception, "add_note"):  # Python >= 3.11: printed right below the error
            exception.add_note(f"VideoDataModule({self.path}): {hint}")
        else:
            rank_zero_warn(f"VideoDataModule({self.path}): {hint}")
