"""Latent cache: clips encoded once through the autoencoder and text encoder, read back to train the DiT.

This module holds the format, the cache key and the writer (build_cache); latent_store.py reads it back
row by row, and LatentDataModule (latent_datamodule.py) decides what is encoded and builds the cache.

A cache is one folder per key, `<cache_root>/<key>/`, holding one folder per bucket (fixed-size data is
one bucket), `<key>/<T>x<H>x<W>/`, and `buckets.json` (the buckets, their clip counts, the skipped files),
written last: its presence marks a complete cache. A bucket folder is written to a temporary folder and
renamed when complete, so a killed run never leaves a half bucket behind, and a bucket encoded before
an interruption is kept: the next run encodes the rest. One bucket folder:
  index.json                 key, shapes, shard lists, skipped files
  shard-00000.safetensors    latents (n, C, t, h, w) float16, caption (n,) row in the caption table, label (n,)
  captions-00000.safetensors context (k, L, D) float16 and context_mask (k, L) of each distinct caption, in
                             order of first use, and its text: text (bytes,) uint8 UTF-8, text_offsets (k + 1,)
Shards hold at most `shard_size` rows and SHARD_BYTES bytes, so neither the writer nor the reader ever
holds more than one shard, however large the cache grows.
The key hashes the data options, the autoencoder (config and weights) and the text encoder, so a
change to any of them makes a new cache instead of silently reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from minisora.data.buckets import Bucket
from minisora.files import partial_path, remove_stale_partials

CACHE_VERSION = 2  # 2: shards streamed row by row, caption embeddings in shards of their own
SHARD_BYTES = 512 * 2**20  # a shard's size bound: the writer holds one shard of clips and one of captions
EMBED_BATCH = 256  # captions per text-encoder call


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


class ShardWriter:
    """Rows of named tensors written to numbered safetensors files `<prefix>-NNNNN.safetensors`.

    One shard's rows are held at a time, in buffers allocated once and saved as they are (safetensors 0.8
    writes from the tensors' memory, no copy). With `text`, each row also carries a string, stored as
    UTF-8 bytes with offsets.
    """

    def __init__(self, folder: Path, prefix: str, max_rows: int, max_bytes: int, text: bool = False):
        self.folder, self.prefix, self.max_rows, self.max_bytes, self.text = folder, prefix, max_rows, max_bytes, text
        self.files: list[dict[str, Any]] = []  # {"file": name, "rows": n} per shard written
        self.buffers: dict[str, torch.Tensor] = {}
        self.texts: list[str] = []
        self.n = 0  # rows in the buffers

    @property
    def rows(self) -> int:
        return sum(f["rows"] for f in self.files) + self.n

    def add(self, tensors: dict[str, torch.Tensor], texts: list[str] | None = None) -> None:
        """Append rows (every tensor's first dimension; one string per row with `text`), flushing full shards."""
        B = next(iter(tensors.values())).shape[0]
        if not self.buffers:
            row_bytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
            capacity = max(1, min(self.max_rows, self.max_bytes // max(1, row_bytes)))
            self.buffers = {k: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype) for k, t in tensors.items()}
        capacity = next(iter(self.buffers.values())).shape[0]
        done = 0
        while done < B:
            take = min(B - done, capacity - self.n)
            for k, t in tensors.items():
                self.buffers[k][self.n : self.n + take] = t[done : done + take]
            if self.text:
                self.texts += texts[done : done + take]
            self.n, done = self.n + take, done + take
            if self.n == capacity:
                self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        out = {k: b[: self.n] for k, b in self.buffers.items()}  # leading rows: contiguous views
        if self.text:
            encoded = [t.encode("utf-8") for t in self.texts]
            out["text"] = torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy())
            out["text_offsets"] = torch.tensor(np.cumsum([0, *map(len, encoded)]), dtype=torch.int64)
        name = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file(out, str(self.folder / name))
        self.files.append({"file": name, "rows": self.n})
        self.n, self.texts = 0, []


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
    total: int | None = None,
    desc: str = "latent cache",
) -> Path:
    """Encode video batches (dicts with video, caption, label) into the bucket folder `out`; returns it.

    `total` (clips) sizes the progress bar.
    """
    out = Path(out)
    remove_stale_partials(out.parent, out.name)  # left by a killed run
    tmp = partial_path(out)  # unique per writer: two nodes encoding into one shared folder never mix shards
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = _write_cache(batches, vae, text_encoder, tmp, key=key, meta=meta, shard_size=shard_size,
                               device=device, total=total, desc=desc)  # fmt: skip
        if not written:
            raise ValueError(f"latent cache {out}: the dataset produced no clips to encode")
        if is_complete(out, key):  # another process (a second node, a parallel run) finished the same cache first
            return out
        shutil.rmtree(out, ignore_errors=True)  # a stale or incomplete folder under the key
        tmp.rename(out)  # the bucket appears complete or not at all
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
    total: int | None,
    desc: str,
) -> int:
    """Shards, caption shards and index.json into `tmp` (layout: module docstring); returns the clip count."""
    clips = ShardWriter(tmp, "shard", shard_size, SHARD_BYTES)
    captions = ShardWriter(tmp, "captions", shard_size, SHARD_BYTES, text=True)
    rows: dict[str, int] = {}  # caption -> its row in the caption table (only the text is kept, not embeddings)
    waiting: list[str] = []  # captions met since the last text-encoder call
    skipped: dict[str, str] = {}
    latent_shape, start = None, time.time()

    def embed() -> None:
        if waiting:
            e, m = text_encoder(waiting)  # (k, L, D), (k, L)
            captions.add({"context": e.float().cpu().to(torch.float16), "context_mask": m.cpu()}, waiting)
            waiting.clear()

    vae = vae.to(device).eval()
    bar = tqdm(total=total, desc=desc, unit="clip", dynamic_ncols=True)  # clips/s and ETA: on real data the long step
    try:
        for batch in batches:
            for path, reason in batch.get("skipped", []):
                skipped[path] = reason
            keep = ~torch.as_tensor(batch.get("substitute", False)).expand(len(batch["caption"]))  # (B,)
            bar.update(len(batch["caption"]))
            if not keep.any():
                continue
            video = batch["video"][keep].to(device)  # (B, 3, T, H, W)
            z = vae.encode(video).to(torch.float16).cpu()  # (B, C, t, h, w), normalised
            latent_shape = list(z.shape[1:])
            idx = []
            for c in (c for c, k in zip(batch["caption"], keep) if k):
                if c not in rows:
                    rows[c] = len(rows)
                    waiting.append(c)
                idx.append(rows[c])
            labels = torch.as_tensor(batch["label"], dtype=torch.long).reshape(-1)[keep]  # (B,)
            clips.add({"latents": z, "caption": torch.tensor(idx, dtype=torch.long), "label": labels})
            if len(waiting) >= EMBED_BATCH:
                embed()
        embed()
    finally:
        bar.close()
    clips.flush()
    captions.flush()
    if clips.rows == 0:
        return 0
    index = {
        "key": key,
        "version": CACHE_VERSION,
        "count": clips.rows,
        "latent_shape": latent_shape,
        "shards": clips.files,
        "captions": {"count": captions.rows, "shards": captions.files},
        "skipped": skipped,
        "seconds": round(time.time() - start, 1),
        **(meta or {}),
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    return clips.rows


def is_complete(folder: str | Path, key: str | None = None) -> bool:
    """A bucket folder whose index.json (with this key) and every shard it lists are there."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("version") != CACHE_VERSION or (key is not None and meta.get("key") != key):
        return False
    files = meta.get("shards", []) + meta.get("captions", {}).get("shards", [])
    return all((folder / s["file"]).is_file() for s in files)


def cache_complete(folder: str | Path, key: str) -> bool:
    """A cache whose buckets.json has this key and whose every bucket folder is complete."""
    try:
        meta = json.loads((Path(folder) / "buckets.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("key") == key and all(is_complete(Path(folder) / b["name"]) for b in meta.get("buckets", []))


def write_cache_index(
    folder: str | Path, key: str, buckets: list[tuple[Bucket, int]], skipped: dict[str, str] | None = None, **info: Any
) -> Path:
    """buckets.json of a cache whose bucket folders are complete: (bucket, clip count) each, the files skipped
    (path -> why), plus `info`. Written last, atomically: its presence marks a complete cache.
    """
    folder = Path(folder)
    entries = [{**dataclasses.asdict(b), "name": b.name, "count": n} for b, n in buckets]
    index = folder / "buckets.json"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(index)
    blob = {"key": key, "version": CACHE_VERSION, "buckets": entries, "skipped": skipped or {}, **info}
    tmp.write_text(json.dumps(blob, indent=1))
    os.replace(tmp, index)
    return index


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic train/val split of n items."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, int(round(n * val_fraction)))) if val_fraction > 0 and n > 1 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])
