"""Latent cache: encode clips once through the autoencoder and text encoder, then train the DiT from disk.

Layout of one cache folder (`<cache_root>/<key>/`), written to a temporary folder and renamed when
complete, so a killed run never leaves a half cache behind:
  index.json               key, fingerprints, shapes, captions, shard list, skipped files
  captions.safetensors     context (K, L, D) float16 and context_mask (K, L) per distinct caption
  shard-00000.safetensors  latents (N, C, t, h, w) float16, caption (N,) index into captions, label (N,)
The key hashes the data options, the autoencoder (config and weights) and the text encoder, so a
change to any of them makes a new cache instead of silently reusing a stale one.

With buckets (data/buckets.py) the cache is one such folder per bucket, `<cache_root>/<key>/<T>x<H>x<W>/`,
plus `buckets.json` (the buckets, their clip counts and the skipped files), written last. A bucket
encoded before an interruption is kept; the next run encodes the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from minisora.data.bucket_sampler import BucketBatches, BucketBatchSampler, bucket_loader
from minisora.data.buckets import Bucket
from minisora.data.clips import ClipDataset
from minisora.data.datamodule import VideoDataModule, collate_clips, rearm_worker_failure_handler, resume_position
from minisora.data.sources import load_records
from minisora.files import partial_path, remove_stale_partials

log = logging.getLogger(__name__)
CACHE_VERSION = 1
# Loader settings that do not change what is encoded, so they stay out of the cache key.
NOT_IN_KEY = {"batch_size", "num_workers", "persistent_workers", "pin_memory", "timeout", "val_fraction", "val_path"}


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights and buffers: two modules with equal tensors share it."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(data_options: dict[str, Any], vae_id: str, text_id: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "data": data_options, "vae": vae_id, "text": text_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_cache(
    batches: Iterable[dict[str, Any]],
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    out: str | Path,
    *,
    key: str,
    meta: dict[str, Any] | None = None,
    shard_size: int = 4096,
    device: str | torch.device = "cpu",
) -> Path:
    """Encode video batches (dicts with video, caption, label) into the cache folder `out`; returns it."""
    out = Path(out)
    remove_stale_partials(out.parent, out.name)  # left by a killed run
    tmp = partial_path(out)  # unique per writer: two nodes encoding into one shared folder never mix shards
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if not _write_cache(batches, vae, text_encoder, tmp, key=key, meta=meta, shard_size=shard_size, device=device):
            raise ValueError(f"latent cache {out}: the dataset produced no clips to encode")
        if is_complete(out, key):  # another process (a second node, a parallel run) finished the same cache first
            return out
        shutil.rmtree(out, ignore_errors=True)  # a stale or incomplete folder under the key
        tmp.rename(out)  # the cache appears complete or not at all
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # an error, or a cache another process finished first


@torch.no_grad()
def _write_cache(
    batches: Iterable[dict[str, Any]],
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tmp: Path,
    *,
    key: str,
    meta: dict[str, Any] | None,
    shard_size: int,
    device: str | torch.device,
) -> int:
    """Shards, caption embeddings and index.json into `tmp` (layout: module docstring); returns the clip count."""
    captions: dict[str, int] = {}
    shard: dict[str, list[torch.Tensor]] = {"latents": [], "caption": [], "label": []}
    shards: list[str] = []
    skipped: dict[str, str] = {}
    count, latent_shape, start = 0, None, time.time()

    def flush() -> None:
        if not shard["latents"]:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({k: torch.cat(v) for k, v in shard.items()}, str(tmp / name))
        shards.append(name)
        for v in shard.values():
            v.clear()

    vae = vae.to(device).eval()
    for batch in batches:
        for path, reason in batch.get("skipped", []):
            skipped[path] = reason
        keep = ~torch.as_tensor(batch.get("substitute", False)).expand(len(batch["caption"]))  # (B,)
        if not keep.any():
            continue
        video = batch["video"][keep].to(device)  # (B, 3, T, H, W)
        z = vae.encode(video).float().cpu()  # (B, C, t, h, w), normalised
        latent_shape = list(z.shape[1:])
        idx = [captions.setdefault(c, len(captions)) for c, k in zip(batch["caption"], keep) if k]
        shard["latents"].append(z.to(torch.float16))
        shard["caption"].append(torch.tensor(idx, dtype=torch.long))
        shard["label"].append(torch.as_tensor(batch["label"], dtype=torch.long).reshape(-1)[keep])
        count += z.shape[0]
        if sum(x.shape[0] for x in shard["latents"]) >= shard_size:
            flush()
    flush()
    if count == 0:
        return 0

    texts = list(captions)
    embs, masks = [], []
    for i in range(0, len(texts), 256):
        e, m = text_encoder(texts[i : i + 256])  # (k, L, D), (k, L)
        embs.append(e.float().cpu().to(torch.float16))
        masks.append(m.cpu())
    save_file({"context": torch.cat(embs), "context_mask": torch.cat(masks)}, str(tmp / "captions.safetensors"))
    index = {
        "key": key,
        "version": CACHE_VERSION,
        "count": count,
        "latent_shape": latent_shape,
        "captions": texts,
        "shards": shards,
        "skipped": skipped,
        "seconds": round(time.time() - start, 1),
        **(meta or {}),
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    return count


def is_complete(folder: str | Path, key: str | None = None) -> bool:
    index = Path(folder) / "index.json"
    if not index.is_file():
        return False
    try:
        meta = json.loads(index.read_text())
    except json.JSONDecodeError:
        return False
    if key is not None and meta.get("key") != key:
        return False
    return all((Path(folder) / s).is_file() for s in meta.get("shards", []))


def bucket_cache_complete(folder: str | Path, key: str) -> bool:
    """A bucketed cache whose buckets.json has this key and whose every bucket folder is complete."""
    index = Path(folder) / "buckets.json"
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("key") == key and all(is_complete(Path(folder) / b["name"]) for b in meta.get("buckets", []))


class LatentDataset(Dataset):
    """Cached latents with their caption embeddings; items are dicts ready for LitVideoDiT."""

    def __init__(self, folder: str | Path, indices: list[int] | None = None):
        folder = Path(folder)
        if not is_complete(folder):
            raise FileNotFoundError(f"no complete latent cache in {folder} (run `minisora cache` or `minisora train`)")
        self.meta = json.loads((folder / "index.json").read_text())
        parts = [load_file(str(folder / s)) for s in self.meta["shards"]]
        self.latents = torch.cat([p["latents"] for p in parts])  # (N, C, t, h, w) float16
        self.caption = torch.cat([p["caption"] for p in parts])  # (N,)
        self.label = torch.cat([p["label"] for p in parts])  # (N,)
        text = load_file(str(folder / "captions.safetensors"))
        self.context, self.context_mask = text["context"], text["context_mask"]  # (K, L, D), (K, L)
        self.captions: list[str] = self.meta["captions"]
        self.indices = list(range(len(self.latents))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        k = int(self.caption[j])
        return {
            "latents": self.latents[j].float(),
            "context": self.context[k].float(),
            "context_mask": self.context_mask[k],
            "label": int(self.label[j]),
            "caption": self.captions[k],
            "index": j,  # the clip's row in the cache: which clips a rank or a bad step saw
        }


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latents": torch.stack([it["latents"] for it in items]),  # (B, C, t, h, w)
        "context": torch.stack([it["context"] for it in items]),  # (B, L, D)
        "context_mask": torch.stack([it["context_mask"] for it in items]),  # (B, L)
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),  # (B,)
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),  # (B,)
    }


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic train/val split of n items."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, int(round(n * val_fraction)))) if val_fraction > 0 and n > 1 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class EpochSampler(DistributedSampler):
    """Shuffles by (seed, epoch), keeping its own epoch count; deals each rank its share; `start` resumes mid-epoch.

    Rank r of W takes positions r, r+W, r+2W, ... of the epoch's permutation (cut to a multiple of W), so
    batch i of every rank together is positions [i*W*B, (i+1)*W*B): the very clips one process with batch
    W*B would draw, which is what makes a W-GPU run train like a single-process run of the same global
    batch. No clip is seen twice per epoch across ranks.

    The epoch count is the sampler's own (incremented per pass) because Lightning's set_epoch can be
    off by one after a restore. A run resumed mid-epoch sets `epoch` and `start` (in this rank's items)
    from the global step, and the first pass is rotated to begin at `start`: Lightning stops the
    restarted epoch after its remaining batches, so training continues with the very batch the
    interrupted run would have drawn. (A DistributedSampler subclass, so Lightning does not wrap it.)
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size or n < world_size:
            raise ValueError(f"EpochSampler: need 0 <= rank < world_size <= n, got rank {rank}, {world_size}, n {n}")
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n, self.epoch, self.start = n, 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        W = self.num_replicas
        mine = order[self.rank : len(self) * W : W]
        start, self.start = self.start, 0
        self.epoch += 1
        return iter(mine[start:] + mine[:start])

    def __len__(self) -> int:
        return self.n // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the sampler counts its own passes (see the class docstring)."""


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int, rank: int = 0, world_size: int = 1,
    timeout: float = 0,
) -> DataLoader:
    if num_workers > 0:
        rearm_worker_failure_handler()
    sampler = EpochSampler(len(dataset), seed, rank, world_size) if shuffle else None
    n = len(sampler) if sampler is not None else len(dataset)  # this rank's clips per epoch
    return DataLoader(
        dataset,
        batch_size=min(batch_size, n),
        sampler=sampler,
        drop_last=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_latents,
        timeout=timeout if num_workers > 0 else 0,  # a hung worker surfaces as an error, not a silent stall
    )


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
        trainer = self.trainer if train else None
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        spec = self.video.spec
        sampler = BucketBatchSampler(
            [len(d) for d in data.datasets], spec.batch_sizes(buckets, self.batch_size), shuffle=train, seed=self.seed,
            rank=rank, world_size=world, is_image=[b.is_image for b in buckets], image_fraction=spec.image_fraction,
        )  # fmt: skip
        if train:
            resume_position(sampler, trainer, len(sampler))
        if self.num_workers > 0:
            rearm_worker_failure_handler()
        return bucket_loader(data, sampler, self.num_workers, self._timeout)

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
