"""LatentDataModule: trains the DiT from the latent cache, encoding it first (once, rank 0) when missing or stale.

The cache format and its writer live in latents.py, the reader in latent_store.py; this module decides what is
encoded (the cache key), builds the cache from a VideoDataModule (one folder per bucket; fixed size is one
bucket) and serves seeded, rank-aware, resumable loaders over one store shared by the train and val splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from minisora.data.bucket_sampler import BucketBatches
from minisora.device import default_device
from minisora.data.buckets import Bucket
from minisora.data.datamodule import VideoDataModule, fetch_clips
from minisora.data.latent_store import LatentRows, LatentStore, read_rows
from minisora.data.latents import (
    build_cache,
    cache_complete,
    cache_key,
    fingerprint,
    is_complete,
    split_indices,
    write_cache_index,
)
from minisora.data.loader import LoaderOptions, make_loader
from minisora.data.sources import load_records

# Loader settings that do not change what is encoded, so they stay out of the cache key.
NOT_IN_KEY = {"vae_batch_size", "num_workers", "persistent_workers", "pin_memory", "timeout", "val_fraction", "val_path"}


def source_fingerprint(path: str | Path) -> str:
    """Changes when the manifest's bytes or a folder's file list (names, sizes, times) change."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class LatentDataModule(L.LightningDataModule):
    """Trains from the latent cache; prepare_data() builds the cache once (rank 0) when it is missing or stale.

    `video` says which clips to encode (its path, clip size or buckets and sampling options are part of the
    cache key); every record is encoded `clips_per_video` times (random positions when > 1), and the
    train/val split is made here, on the cached clips of each bucket.
    """

    def __init__(
        self,
        video: VideoDataModule,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        cache_root: str = "runs/cache",
        clips_per_video: int = 1,
        dit_batch_size: int = 32,  # clips per batch of the DiT stage
        num_workers: int = 0,
        val_fraction: float = 0.05,
        encode_batch_size: int = 16,
        seed: int = 0,
        shared_filesystem: bool = True,
    ):
        super().__init__()
        # On a cluster whose nodes share the cache folder, only global rank 0 encodes (the other ranks wait at
        # Lightning's barrier); with node-local disks, the first process of every node builds its own copy.
        self.prepare_data_per_node = not shared_filesystem
        if clips_per_video < 1 or dit_batch_size < 1 or encode_batch_size < 1:
            raise ValueError("clips_per_video, dit_batch_size and encode_batch_size must be >= 1")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.video, self.vae, self.text_encoder = video, vae, text_encoder
        self.cache_root, self.clips_per_video = Path(cache_root), clips_per_video
        self.batch_size, self.val_fraction = dit_batch_size, val_fraction
        self.encode_batch_size, self.seed = encode_batch_size, seed
        # The video module's timeout and pin_memory; this section's workers, which stay up between epochs.
        self.loader_options = LoaderOptions(num_workers, video.timeout, video.loader_options.pin_memory, seed)
        self.store: LatentStore | None = None  # the one open cache; the train and val sets are views of it
        self.train_buckets: list[Bucket] = []
        self.val_buckets: list[Bucket] = []
        self.train_set: BucketBatches | None = None
        self.val_set: BucketBatches | None = None
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            options = {k: v for k, v in self.video.hparams.items() if k not in NOT_IN_KEY}
            options["clips_per_video"] = self.clips_per_video
            options["source"] = source_fingerprint(self.video.path)
            plan = self.video.plan  # the sizes clips are encoded at, and which clips go where
            options["buckets"] = {"sizes": [b.name for b in self.video.buckets], "max_upscale": plan.max_upscale,
                                  "image_frames": bool(plan.image_fraction)}  # fmt: skip
            # context_length changes the embeddings' shape without changing a pretrained tower's weights.
            text_id = f"{fingerprint(self.text_encoder)}:{getattr(self.text_encoder, 'context_length', None)}"
            self._key = cache_key(options, fingerprint(self.vae), text_id)
        return self._key

    @property
    def folder(self) -> Path:
        return self.cache_root / self.key

    def prepare_data(self) -> None:
        """Encode every clip once, one folder per bucket (Lightning calls this on one process per node)."""
        if cache_complete(self.folder, self.key):
            return
        video = self.video
        records, rows_skipped = load_records(video.path, video.format)
        assignment = video.assign(records)
        buckets, datasets = video.bucket_datasets(records, assignment, train=self.clips_per_video > 1,
                                                  repeat=self.clips_per_video)  # fmt: skip
        device = default_device()
        options = dataclasses.replace(video.loader_options, persistent_workers=False)  # one pass per bucket
        t0, built, skipped = time.time(), [], dict(assignment.skipped)
        # Token-scaled over all buckets (small clips encode in larger batches), then one loader per bucket.
        for bucket, dataset, bs in zip(buckets, datasets, video.plan.batch_sizes(buckets, self.encode_batch_size)):
            sub, key = self.folder / bucket.name, f"{self.key}-{bucket.name}"
            if not is_complete(sub, key):  # a bucket finished before an interruption is kept
                loader = make_loader(BucketBatches([dataset], fetch_clips), [bucket], video.plan, bs, train=False,
                                     options=options)  # fmt: skip
                try:
                    build_cache(loader, self.vae, self.text_encoder, sub, key=key, device=device, total=len(dataset),
                                desc=f"encoding {bucket.name}", meta={"bucket": dataclasses.asdict(bucket)})  # fmt: skip
                except ValueError as e:  # every file of this bucket was unreadable: the others still train
                    rank_zero_warn(f"latent cache: bucket {bucket.name} left out: {e}")
                    continue
            skipped.update(json.loads((sub / "index.json").read_text())["skipped"])  # files met while encoding
            built.append((bucket, len(dataset)))
        self.vae.cpu()
        if not built:
            raise ValueError(f"latent cache {self.folder}: no bucket could be encoded (every file was unreadable)")
        assigned = {records[r].path: assignment.buckets[b].name for r, b in assignment.bucket_of().items()}
        write_cache_index(self.folder, self.key, built, source=video.path, skipped=skipped,
                          rows_skipped=len(rows_skipped), assignment=assigned)  # fmt: skip
        rank_zero_info(f"latent cache: {sum(n for _, n in built)} clips in {len(built)} bucket(s) encoded into "
                       f"{self.folder} in {time.time() - t0:.0f} s")  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.store = LatentStore(self.folder)
        train_sets, val_sets = [], []
        for k, bucket in enumerate(self.store.buckets):
            train, val = split_indices(self.store.count(k), self.val_fraction, self.seed + k)
            self.train_buckets.append(bucket)
            train_sets.append(LatentRows(self.store, k, train))
            if val:
                self.val_buckets.append(bucket)
                val_sets.append(LatentRows(self.store, k, val))
        self.train_set = BucketBatches(train_sets, read_rows)
        self.val_set = BucketBatches(val_sets, read_rows) if val_sets else None
        shapes = ", ".join(f"{b.name} -> {'x'.join(map(str, d.meta['latent_shape']))}: {len(d)}"
                           for b, d in zip(self.train_buckets, train_sets))  # fmt: skip
        captions = sum(m["captions"]["count"] for m in self.store.meta)
        rank_zero_info(
            f"LatentDataModule: {len(self.train_set)} train / {len(self.val_set or [])} val clips in "
            f"{len(self.train_buckets)} bucket(s) ({shapes}), {captions} distinct captions; "
            f"{len(self.store.index['skipped'])} files fit no bucket or were unreadable"
        )

    def _loader(self, data: BucketBatches, buckets: list[Bucket], train: bool) -> DataLoader:
        return make_loader(data, buckets, self.video.plan, self.batch_size, train=train, options=self.loader_options,
                           trainer=self.trainer, drop_last=self.video.plan.drop_last)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_buckets, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, self.val_buckets, train=False) if self.val_set is not None else []

    def on_exception(self, exception: BaseException) -> None:
        """Lightning calls this when a fit fails: a data-loader timeout or dead worker gets what to do about it."""
        self.video.on_exception(exception)
