"""Latent cache: clips encoded once through the autoencoder and text encoder, read back to train the DiT.

The writer (build_cache), the reader (LatentDataset) and the seeded, rank-aware sampler; LatentDataModule
(latent_datamodule.py) decides what is encoded and builds the cache.

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

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from minisora.data.datamodule import rearm_worker_failure_handler
from minisora.files import partial_path, remove_stale_partials

log = logging.getLogger(__name__)
CACHE_VERSION = 1


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
