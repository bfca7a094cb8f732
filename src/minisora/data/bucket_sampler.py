"""Batches that never mix buckets: a sampler of whole batches, for one process or many (DDP).

Each bucket is its own dataset (its clips at its exact size; fixed-size data is one bucket). The sampler
deals out lists of indices into their concatenation, every list from one bucket; the DataLoader fetches a
list at a time (`batch_size=None`, data/loader.py), so a worker builds a whole batch (and the latent cache
reads a batch's rows in one go). It subclasses DistributedSampler so Lightning keeps it as it is under DDP
instead of wrapping it.

Epoch order: each bucket's clips are shuffled by (seed, epoch) and cut into global batches of
world_size x that bucket's batch size, the global batches of all buckets are shuffled together, and rank
r takes rows r, r+W, ... of each. So at every step all ranks train on the same bucket, no clip is seen
twice in an epoch, and batch i of W ranks together is exactly the global batch i one process with W
times the batch would draw: W processes train like one (tests/test_distributed.py). A bucket's last,
short batch (the remainder cut to a multiple of world_size) is kept, so a small bucket still trains;
with `drop_last` it is dropped whenever the bucket fills a whole global batch, which keeps that
equality for any clip count (the DiT on fixed-size data: one bucket, its clips reshuffled each epoch).

The epoch count is the sampler's own (incremented per pass) because Lightning's set_epoch can be off by
one after a restore. A run resumed mid-epoch sets `epoch` and `start` (batches of this epoch already
trained) from the global step (loader.resume_position), and the first pass begins there: the very batch
the interrupted run would have drawn.
"""

from __future__ import annotations

import bisect
import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler


class BucketBatchSampler(DistributedSampler):
    """Yields this rank's batches (lists of indices into the concatenated bucket datasets), one bucket each."""

    def __init__(
        self,
        sizes: Sequence[int],
        batch_sizes: Sequence[int],
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        is_image: Sequence[bool] | None = None,
        image_fraction: float | None = None,
        drop_last: bool = False,
    ):
        if len(sizes) != len(batch_sizes) or not sizes:
            raise ValueError(f"BucketBatchSampler: one batch size per bucket, got {len(batch_sizes)} for {len(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"BucketBatchSampler: need 0 <= rank < world_size, got {rank}, {world_size}")
        super().__init__(range(max(1, sum(sizes))), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.sizes, self.batch_sizes = [int(n) for n in sizes], [int(b) for b in batch_sizes]
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.is_image = list(is_image) if is_image is not None else [False] * len(self.sizes)
        self.image_fraction = image_fraction if shuffle else None
        self.drop_last = drop_last and shuffle  # validation and cache encoding see every clip
        self.epoch, self.start = 0, 0  # `start`: batches of the first epoch to skip (a resumed run)
        self.counts = self._counts()
        if not sum(self.counts):
            raise ValueError(f"BucketBatchSampler: {sum(self.sizes)} clips make no batch for {world_size} ranks "
                             "(each rank needs at least one clip of a bucket)")
        if self.image_fraction is not None and self.image_fraction > 0 and self._images_short():
            have, want = self._image_batches(), self._wanted_images()
            got = have / max(1, have + self._video_batches())
            warnings.warn(
                f"buckets.image_fraction {self.image_fraction:g} needs {want} image batches per epoch but the 1-frame "
                f"buckets fill {have}: {got:.0%} of the steps will be images (add images, or lower the fraction)",
                stacklevel=2,
            )

    # ---- how many batches each bucket gives per epoch --------------------------------------------
    def _full(self, k: int) -> int:
        """Global batches bucket k gives per epoch: full ones, plus its remainder cut to a multiple of world_size
        (with drop_last only when there is no full one)."""
        W = self.num_replicas if self.shuffle else 1
        g = self.batch_sizes[k] * W
        full = self.sizes[k] // g
        return full + (self.sizes[k] % g >= W and not (self.drop_last and full))

    def _video_batches(self) -> int:
        return sum(self._full(k) for k in range(len(self.sizes)) if not self.is_image[k])

    def _image_batches(self) -> int:
        return sum(self._full(k) for k in range(len(self.sizes)) if self.is_image[k])

    def _wanted_images(self) -> int:
        f = self.image_fraction
        return round(f * self._video_batches() / (1 - f)) if self._video_batches() else self._image_batches()

    def _images_short(self) -> bool:
        return self._wanted_images() > self._image_batches()

    def _counts(self) -> list[int]:
        """Batches per epoch per bucket: all of them, or with image_fraction only enough image batches."""
        counts = [self._full(k) for k in range(len(self.sizes))]
        if self.image_fraction is None:
            return counts
        budget = min(self._wanted_images(), self._image_batches())
        images = [k for k in range(len(self.sizes)) if self.is_image[k]]
        total = sum(counts[k] for k in images)
        left = budget
        for k in images:  # share the image batches among the 1-frame buckets by their size
            counts[k] = min(counts[k], math.floor(budget * counts[k] / total)) if total else 0
            left -= counts[k]
        for k in images:  # rounding leftovers
            extra = min(left, self._full(k) - counts[k])
            counts[k] += extra
            left -= extra
        return counts

    def __len__(self) -> int:
        return sum(self.counts)

    # ---- the epoch ------------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of `epoch` together, in order: lists of world_size x batch indices."""
        batches: list[tuple[int, list[int]]] = []
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        for k, (n, off) in enumerate(zip(self.sizes, self.offsets)):
            order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
            W = self.num_replicas if self.shuffle else 1
            size = self.batch_sizes[k] * W
            for j in range(self.counts[k]):
                chunk = order[j * size : (j + 1) * size]
                chunk = chunk[: len(chunk) // W * W]  # the last, short batch: equal rows for every rank
                batches.append((k, [off + i for i in chunk]))
        if self.shuffle and len(self.sizes) > 1:  # one bucket: its batches are already in shuffled order
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[p] for p in perm]
        return [b for _, b in batches]

    def __iter__(self):
        # A generator: the epoch is counted (and a resumed run's `start` used) when its first batch is drawn. A
        # DataLoader with workers calls iter() on its sampler twice and drops the first iterator; counted at
        # iter(), that made the first epoch epoch 1 and lost a resumed run's position.
        W = self.num_replicas if self.shuffle else 1
        epoch_batches = self.global_batches(self.epoch)
        start, self.start = self.start, 0
        self.epoch += 1
        for b in epoch_batches[start:]:
            yield b[self.rank :: W] if W > 1 else b

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the sampler counts its own passes (see the module docstring)."""


class BucketBatches(ConcatDataset):
    """The concatenated bucket datasets, indexed by a whole batch: `self[[i, j, ...]]` -> the batch.

    `fetch(dataset, rows)` builds the batch of rows of one bucket's dataset (collated clips, or latent rows
    read from the cache in one go); it must be picklable (a module-level function) for worker processes.
    """

    def __init__(self, datasets: Sequence[Dataset], fetch: Callable[[Any, list[int]], dict[str, Any]]):
        super().__init__(datasets)
        self.fetch = fetch

    def locate(self, index: int) -> tuple[int, int]:
        """(bucket, index within it) of an index of the concatenation."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        k = bisect.bisect_right(self.cumulative_sizes, index)
        return k, index - (self.cumulative_sizes[k - 1] if k else 0)

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        where = [self.locate(i) for i in indices]
        buckets = {k for k, _ in where}
        if len(buckets) != 1:  # a sampler bug, never data: say so loudly
            raise RuntimeError(f"a batch mixes buckets {sorted(buckets)}; batches must hold one bucket")
        k = where[0][0]
        batch = self.fetch(self.datasets[k], [i for _, i in where])
        batch["bucket"] = k
        return batch
