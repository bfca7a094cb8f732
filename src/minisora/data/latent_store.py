"""Reading the latent cache without loading it: a batch's rows come from the shard files by positional reads.

LatentStore opens a cache folder (the format: latents.py): the indexes are read into memory, the rows stay
on disk, and a batch reads its rows with os.preadv straight into the batch's buffer. The kernel's page
cache does the caching, outside the process. A memory map would do the same, but every page of it that a
run touches counts in the process's resident memory, which then grows to the size of the cache, as loading
it did (about 17 GB per process for the UCF-101 recipe). tests/test_latents.py checks that reading stays
flat; `minisora bench cache` measures a training epoch (docs/data.md).
Train and validation sets are LatentRows views of one store. File handles are opened lazily in each
process, so forked DataLoader workers each read through their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from minisora.data.buckets import Bucket

DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "BOOL": np.bool_, "U8": np.uint8}
MAX_OPEN = 64  # shard files a process keeps open (least recently used closed first): far below `ulimit -n`
# Caption embeddings a process keeps, least recently used dropped first: captions repeat (UCF-101: 101 for 13k
# videos; shapes: 76 for 1000 clips), and re-reading them made a batch of the default run 1.5x slower to read.
CAPTION_CACHE_BYTES = 64 * 2**20
GRAIN = 32768  # at::internal::GRAIN_SIZE: elementwise ops on fewer elements run on the calling thread


@dataclass(frozen=True)
class Column:
    """Where one tensor of a safetensors file lies: rows of `shape` and `dtype`, `row_bytes` each, from byte `start`."""

    dtype: np.dtype
    shape: tuple[int, ...]  # one row's shape
    start: int
    row_bytes: int


def read_header(fd: int, path: Path) -> dict[str, Column]:
    """The tensors of a safetensors file (an 8-byte little-endian header length, a JSON header, the data)."""
    size = int.from_bytes(os.pread(fd, 8, 0), "little")
    header = json.loads(os.pread(fd, size, 8))
    columns = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {spec['dtype']}; the latent cache reads {sorted(DTYPES)}")
        dtype, shape = np.dtype(DTYPES[spec["dtype"]]), tuple(spec["shape"][1:])
        row_bytes = math.prod(shape) * dtype.itemsize
        columns[name] = Column(dtype, shape, 8 + size + spec["data_offsets"][0], row_bytes)
    return columns


def float32(array: np.ndarray) -> torch.Tensor:
    """A float32 copy of a float16 array, converted in pieces below torch's parallel grain (32768 elements).

    One piece at a time stays on this thread: a whole batch's float() went to torch's intra-op threads, and
    with num_workers=0 on a loaded 2-core machine that handoff cost 20 ms a batch instead of 1 ms (numpy's
    astype has no vectorised float16 path here and took 0.3 ms per 80k values).
    """
    src = torch.from_numpy(array)
    out = torch.empty(src.shape, dtype=torch.float32)
    flat_src, flat_out = src.view(-1), out.view(-1)
    for a in range(0, flat_src.numel(), GRAIN):
        flat_out[a : a + GRAIN].copy_(flat_src[a : a + GRAIN])
    return out


class OpenFiles:
    """This process's open shard files with their headers, the least recently used closed beyond MAX_OPEN.

    Empty again in a forked worker (the parent's descriptors are closed there, not shared) and when pickled.
    """

    def __init__(self):
        self.pid, self.files = os.getpid(), OrderedDict()

    def get(self, path: Path) -> tuple[int, dict[str, Column]]:
        if self.pid != os.getpid():  # a DataLoader worker forked from the process that opened these
            self.close()
            self.pid = os.getpid()
        entry = self.files.get(path)
        if entry is None:
            fd = os.open(path, os.O_RDONLY)
            entry = self.files[path] = (fd, read_header(fd, path))
            if len(self.files) > MAX_OPEN:
                os.close(self.files.popitem(last=False)[1][0])
        else:
            self.files.move_to_end(path)
        return entry

    def close(self) -> None:
        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __del__(self) -> None:  # a dropped store closes its files (a test session opens many stores)
        try:
            if self.pid == os.getpid():
                self.close()
        except (AttributeError, TypeError, OSError):  # interpreter shutdown, or never fully built
            pass


class Table:
    """Rows split over numbered shard files (a bucket's clips, or its captions): row i lies in shard searchsorted."""

    def __init__(self, folder: Path, shards: list[dict[str, Any]]):
        self.paths = [folder / s["file"] for s in shards]
        self.starts = np.cumsum([0] + [s["rows"] for s in shards])  # (shards + 1,) first row of each shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} out of range for {len(self)} rows in {self.paths[0].parent}")
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        return shard, rows - self.starts[shard]

    def read(self, files: OpenFiles, name: str, rows: np.ndarray) -> np.ndarray:
        """Tensor `name` at `rows`: (len(rows), *row shape), one positional read per row into one buffer."""
        shard, local = self._locate(rows)
        out, col = None, None
        for s in np.unique(shard).tolist():
            fd, columns = files.get(self.paths[s])
            col = columns[name]
            if out is None:
                out = np.empty((len(rows), col.row_bytes), np.uint8)
            mine = np.flatnonzero(shard == s)
            for i, offset in zip(mine.tolist(), (col.start + local[mine] * col.row_bytes).tolist()):
                if os.preadv(fd, [out[i]], offset) != col.row_bytes:
                    raise EOFError(f"{self.paths[s]}: a row of {name!r} is cut short (a truncated file); delete "
                                   f"{self.paths[s].parent.parent} to encode the cache again")  # fmt: skip
        if out is None:
            raise ValueError("no rows to read")
        return out.view(col.dtype).reshape(len(rows), *col.shape)

    def read_text(self, files: OpenFiles, rows: np.ndarray) -> list[str]:
        """The strings stored with `rows` (the `text` bytes between two `text_offsets`)."""
        texts = []
        for s, r in zip(*(a.tolist() for a in self._locate(rows))):
            fd, columns = files.get(self.paths[s])
            a, b = np.frombuffer(os.pread(fd, 16, columns["text_offsets"].start + 8 * r), dtype=np.int64).tolist()
            texts.append(os.pread(fd, b - a, columns["text"].start + a).decode("utf-8"))
        return texts


class LatentStore:
    """A complete cache folder opened for reading: its buckets and their row counts; rows read per batch."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "buckets.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise FileNotFoundError(f"no complete latent cache in {self.folder} (run `minisora cache` or `minisora train`)") from None
        fields = [f.name for f in dataclasses.fields(Bucket)]
        self.buckets = [Bucket(**{f: entry[f] for f in fields}) for entry in self.index["buckets"]]
        self.meta = [json.loads((self.folder / b.name / "index.json").read_text()) for b in self.buckets]
        self.clips = [Table(self.folder / b.name, m["shards"]) for b, m in zip(self.buckets, self.meta)]
        self.captions = [Table(self.folder / b.name, m["captions"]["shards"]) for b, m in zip(self.buckets, self.meta)]
        self.files = OpenFiles()
        self.recent: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, str]] = OrderedDict()
        self.recent_bytes = 0

    def count(self, k: int) -> int:
        return len(self.clips[k])

    def read(self, k: int, rows: Sequence[int]) -> dict[str, Any]:
        """The batch of rows `rows` of bucket k, ready for LitVideoDiT; each distinct caption is read once."""
        rows = np.asarray(rows, dtype=np.int64)
        clips, captions = self.clips[k], self.captions[k]
        latents = clips.read(self.files, "latents", rows)  # (B, C, t, h, w) float16
        caption = clips.read(self.files, "caption", rows)  # (B,)
        label = clips.read(self.files, "label", rows)  # (B,)
        distinct, which = np.unique(caption, return_inverse=True)
        entries = self._captions(k, distinct.tolist())
        which = which.reshape(-1).tolist()
        return {
            "latents": float32(latents),  # (B, C, t, h, w)
            "context": float32(np.stack([entries[i][0] for i in which])),  # (B, L, D)
            "context_mask": torch.from_numpy(np.stack([entries[i][1] for i in which])),  # (B, L)
            "labels": torch.from_numpy(label),  # (B,)
            "caption": [entries[i][2] for i in which],
            "index": torch.from_numpy(rows),  # (B,) the clips' rows in the bucket: which clips a rank or a bad step saw
        }

    def _captions(self, k: int, rows: list[int]) -> list[tuple[np.ndarray, np.ndarray, str]]:
        """(context (L, D) float16, context_mask (L,), text) of caption rows of bucket k, recently used ones kept."""
        missing = [r for r in rows if (k, r) not in self.recent]
        found = {}
        if missing:
            table, at = self.captions[k], np.asarray(missing, dtype=np.int64)
            context = table.read(self.files, "context", at)  # (K, L, D)
            mask = table.read(self.files, "context_mask", at)  # (K, L)
            for r, c, m, text in zip(missing, context, mask, table.read_text(self.files, at)):
                found[r] = (c.copy(), m.copy(), text)  # their own memory, not the batch buffer's
        entries = []
        for r in rows:
            entry = found.get(r) or self.recent[(k, r)]
            entries.append(entry)
            if r in found:
                self.recent[(k, r)] = entry
                self.recent_bytes += entry[0].nbytes + entry[1].nbytes
            self.recent.move_to_end((k, r))
        while self.recent_bytes > CAPTION_CACHE_BYTES and self.recent:
            _, (c, m, _) = self.recent.popitem(last=False)
            self.recent_bytes -= c.nbytes + m.nbytes
        return entries


class LatentRows(Dataset):
    """Rows of one bucket of a LatentStore (all, or a train or val split): a view, nothing loaded."""

    def __init__(self, store: LatentStore, bucket: int, rows: Sequence[int] | None = None):
        self.store, self.bucket = store, bucket
        self.rows = np.arange(store.count(bucket)) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def meta(self) -> dict[str, Any]:
        """The bucket folder's index.json (latent_shape, count, skipped files)."""
        return self.store.meta[self.bucket]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: Sequence[int]) -> dict[str, Any]:
        return self.store.read(self.bucket, self.rows[np.asarray(positions, dtype=np.int64)])

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One clip: latents (C, t, h, w), context (L, D), context_mask (L,), label, caption, index."""
        b = self.batch([i])
        return {"latents": b["latents"][0], "context": b["context"][0], "context_mask": b["context_mask"][0],
                "label": int(b["labels"][0]), "caption": b["caption"][0], "index": int(b["index"][0])}  # fmt: skip


def read_rows(view: LatentRows, positions: list[int]) -> dict[str, Any]:
    """One batch of a LatentRows view (BucketBatches' `fetch`)."""
    return view.batch(positions)
