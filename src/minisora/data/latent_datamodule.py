"""LatentDataModule: trains the DiT from the latent cache, encoding it first (once, rank 0) when missing or stale.

The cache format and its writer live in latents.py; this module decides what is encoded (the cache key),
builds the cache from a VideoDataModule (one folder, or one per bucket) and serves seeded, rank-aware loaders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from minisora.data.bucket_sampler import BucketBatches
from minisora.data.buckets import Bucket
from minisora.data.clips import ClipDataset
from minisora.data.datamodule import (
    VideoDataModule,
    collate_clips,
    one_bucket_loader,
    rearm_worker_failure_handler,
    resume_position,
)
from minisora.data.latents import (
    CACHE_VERSION,
    LatentDataset,
    bucket_cache_complete,
    build_cache,
    cache_key,
    collate_latents,
    fingerprint,
    is_complete,
    make_loader,
    split_indices,
)
from minisora.data.sources import load_records
from minisora.files import partial_path

# Loader settings that do not change what is encoded, so they stay out of the cache key.
NOT_IN_KEY = {"batch_size", "num_workers", "persistent_workers", "pin_memory", "timeout", "val_fraction", "val_path"}


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

    `video` says which clips to encode (its path, clip size and sampling options are part of the cache
    key); every record is encoded `clips_per_video` times (random positions when > 1), and the train/val
    split is made here, on the cached clips.
    """

    def __init__(
        self,
        video: VideoDataModule,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        cache_root: str = "runs/cache",
        clips_per_video: int = 1,
        batch_size: int = 32,
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
        if clips_per_video < 1 or batch_size < 1 or encode_batch_size < 1:
            raise ValueError("clips_per_video, batch_size and encode_batch_size must be >= 1")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.video, self.vae, self.text_encoder = video, vae, text_encoder
        self.cache_root, self.clips_per_video = Path(cache_root), clips_per_video
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        self.encode_batch_size, self.seed = encode_batch_size, seed
        self.train_set: LatentDataset | None = None
        self.val_set: LatentDataset | None = None
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            options = {k: v for k, v in self.video.hparams.items() if k not in NOT_IN_KEY}
            options["clips_per_video"] = self.clips_per_video
            options["source"] = source_fingerprint(self.video.path)
            if self.bucketed:  # the sizes clips are encoded at, and which clips go where
                spec = self.video.spec
                options["buckets"] = {"sizes": [b.name for b in self.video.buckets], "max_upscale": spec.max_upscale,
                                      "image_frames": bool(spec.image_fraction)}  # fmt: skip
            # context_length changes the embeddings' shape without changing a pretrained tower's weights.
            text_id = f"{fingerprint(self.text_encoder)}:{getattr(self.text_encoder, 'context_length', None)}"
            self._key = cache_key(options, fingerprint(self.vae), text_id)
        return self._key

    @property
    def folder(self) -> Path:
        return self.cache_root / self.key

    @property
    def bucketed(self) -> bool:
        return getattr(self.video, "spec", None) is not None

    def prepare_data(self) -> None:
        """Encode every clip once (Lightning calls this on one process per node)."""
        if self.bucketed:
            return self._prepare_buckets()
        if is_complete(self.folder, self.key):
            return
        records, skipped = load_records(self.video.path, self.video.format)
        dataset = ClipDataset(
            records * self.clips_per_video, train=self.clips_per_video > 1, source=self.video.path, **self.video.clip_args
        )
        if self.video.num_workers > 0:
            rearm_worker_failure_handler()
        loader = DataLoader(
            dataset, batch_size=self.encode_batch_size, num_workers=self.video.num_workers,
            collate_fn=collate_clips, timeout=self.video.timeout if self.video.num_workers else 0,
        )  # fmt: skip
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.time()
        build_cache(loader, self.vae, self.text_encoder, self.folder, key=self.key, device=device,
                    meta={"source": self.video.path, "rows_skipped": len(skipped)})  # fmt: skip
        self.vae.cpu()
        rank_zero_info(f"latent cache: {len(dataset)} clips encoded into {self.folder} in {time.time() - t0:.0f} s")

    # ---- bucket mode ----------------------------------------------------------------------------
    def _encode_loader(self, dataset: ClipDataset, batch_size: int) -> DataLoader:
        workers = self.video.num_workers
        if workers > 0:
            rearm_worker_failure_handler()
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_clips,
                          timeout=self.video.timeout if workers else 0)  # fmt: skip

    def _prepare_buckets(self) -> None:
        """Assign every record to its bucket and encode each bucket into its own cache folder."""
        index_file = self.folder / "buckets.json"
        if bucket_cache_complete(self.folder, self.key):
            return
        video = self.video
        records, rows_skipped = load_records(video.path, video.format)
        assignment = video.assign(records)
        buckets, datasets = video.bucket_datasets(records, assignment, train=self.clips_per_video > 1,
                                                  repeat=self.clips_per_video)  # fmt: skip
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0, built = time.time(), []
        for bucket, dataset, bs in zip(buckets, datasets, video.spec.batch_sizes(buckets, self.encode_batch_size)):
            sub, key = self.folder / bucket.name, f"{self.key}-{bucket.name}"
            if not is_complete(sub, key):  # a bucket finished before an interruption is kept
                try:
                    build_cache(self._encode_loader(dataset, bs), self.vae, self.text_encoder, sub, key=key,
                                device=device, meta={"bucket": dataclasses.asdict(bucket)})  # fmt: skip
                except ValueError as e:  # every file of this bucket was unreadable: the others still train
                    rank_zero_warn(f"latent cache: bucket {bucket.name} left out: {e}")
                    continue
            built.append({**dataclasses.asdict(bucket), "name": bucket.name, "count": len(dataset)})
        self.vae.cpu()
        if not built:
            raise ValueError(f"latent cache {self.folder}: no bucket could be encoded (every file was unreadable)")
        index = {"key": self.key, "version": CACHE_VERSION, "buckets": built, "source": video.path,
                 "skipped": dict(assignment.skipped), "rows_skipped": len(rows_skipped),
                 "assignment": {records[r].path: assignment.buckets[b].name for r, b in assignment.bucket_of().items()}}  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(index_file)
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_file)  # written last: its presence marks a complete cache
        rank_zero_info(f"latent cache: {sum(b['count'] for b in built)} clips in {len(built)} buckets encoded into "
                       f"{self.folder} in {time.time() - t0:.0f} s")  # fmt: skip

    def _setup_buckets(self) -> None:
        index = json.loads((self.folder / "buckets.json").read_text())
        fields = [f.name for f in dataclasses.fields(Bucket)]
        self.train_buckets, self.val_buckets, train_sets, val_sets = [], [], [], []
        for k, entry in enumerate(index["buckets"]):
            bucket = Bucket(**{f: entry[f] for f in fields})
            full = LatentDataset(self.folder / bucket.name)
            train, val = split_indices(len(full), self.val_fraction, self.seed + k)
            self.train_buckets.append(bucket)
            train_sets.append(LatentDataset(self.folder / bucket.name, train))
            if val:
                self.val_buckets.append(bucket)
                val_sets.append(LatentDataset(self.folder / bucket.name, val))
        self.train_set = BucketBatches(train_sets, collate_latents)
        self.val_set = BucketBatches(val_sets, collate_latents) if val_sets else None
        shapes = ", ".join(f"{b.name} -> {'x'.join(map(str, d.meta['latent_shape']))}: {len(d)}"
                           for b, d in zip(self.train_buckets, train_sets))  # fmt: skip
        rank_zero_info(
            f"LatentDataModule: {len(self.train_set)} train / {len(self.val_set or [])} val clips in "
            f"{len(self.train_buckets)} buckets ({shapes}); {len(index['skipped'])} files fit no bucket or were unreadable"
        )

    def _bucket_loader(self, data: BucketBatches, buckets: list[Bucket], train: bool) -> DataLoader:
        return one_bucket_loader(data, buckets, self.video.spec, self.batch_size, self.seed, train, self.trainer,
                                 self.num_workers, self._timeout)  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.bucketed:
            return self._setup_buckets()
        full = LatentDataset(self.folder)
        train, val = split_indices(len(full), self.val_fraction, self.seed)
        self.train_set = LatentDataset(self.folder, train)
        self.val_set = LatentDataset(self.folder, val) if val else None
        meta = full.meta
        C, t, h, w = meta["latent_shape"]
        rank_zero_info(
            f"LatentDataModule: {len(train)} train / {len(val)} val clips of latent {C}x{t}x{h}x{w}, "
            f"{len(meta['captions'])} distinct captions, {len(meta['skipped'])} files skipped while caching"
        )

    def train_dataloader(self) -> DataLoader:
        if self.bucketed:
            return self._bucket_loader(self.train_set, self.train_buckets, train=True)
        trainer = self.trainer  # set by Lightning when this module is attached to a fit
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        loader = make_loader(self.train_set, self.batch_size, True, self.num_workers, self.seed, rank, world,
                             self._timeout)  # fmt: skip
        resume_position(loader.sampler, trainer, len(loader), unit=loader.batch_size)  # continue a resumed run
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        if self.bucketed:
            return self._bucket_loader(self.val_set, self.val_buckets, train=False)
        return make_loader(self.val_set, self.batch_size, False, self.num_workers, self.seed, timeout=self._timeout)

    @property
    def _timeout(self) -> float:
        """Seconds a loader worker may take per batch: the video module's `timeout` (none without one)."""
        return getattr(self.video, "timeout", 0.0)

    def on_exception(self, exception: BaseException) -> None:
        """Lightning calls this when a fit fails: a data-loader timeout or dead worker gets what to do about it."""
        if self.video is not None:
            self.video.on_exception(exception)
