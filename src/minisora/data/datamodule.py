"""VideoDataModule: clips from a manifest or folder, a deterministic train/val split, seeded loaders.

With a bucket set (data/buckets.py), clips keep their aspect ratio and duration: each is assigned to a
bucket, each bucket is a ClipDataset at its exact size, and batches come from one bucket at a time.
"""

from __future__ import annotations

import hashlib
import os
import signal
import warnings
from collections import defaultdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

from minisora.data.bucket_sampler import BucketBatches, BucketBatchSampler, bucket_loader
from minisora.data.buckets import Assignment, Bucket, BucketError, BucketSpec, Geometry, assign, probe_all
from minisora.data.clips import CROPS, SHORT_POLICIES, ClipDataset
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


def resume_position(sampler, trainer, per_epoch: int, unit: int = 1) -> None:
    """Point an own-epoch sampler at the batch a resumed run continues from (global step x accumulation)."""
    if trainer is not None and trainer.global_step > 0 and per_epoch > 0:
        done = trainer.global_step * trainer.accumulate_grad_batches
        sampler.epoch, k = divmod(done, per_epoch)
        sampler.start = k * unit


def one_bucket_loader(
    data: BucketBatches, buckets: list[Bucket], spec: BucketSpec, batch_size: int, seed: int, train: bool, trainer,
    num_workers: int, timeout: float, pin_memory: bool = False,
) -> DataLoader:  # fmt: skip
    """Batches of one bucket each, sized by token count (raw clips and the latent cache both use it).

    train: shuffled per epoch, with image_fraction; with a `trainer`, this rank's share, resuming where the run is.
    Validation (train=False): every batch in order, in one process.
    """
    trainer = trainer if train else None
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = BucketBatchSampler(
        [len(d) for d in data.datasets], spec.batch_sizes(buckets, batch_size), shuffle=train,
        seed=seed, rank=rank, world_size=world, is_image=[b.is_image for b in buckets],
        image_fraction=spec.image_fraction,
    )  # fmt: skip
    if train:
        resume_position(sampler, trainer, len(sampler))
    if num_workers > 0:
        rearm_worker_failure_handler()
    return bucket_loader(data, sampler, num_workers, timeout, pin_memory)


def rearm_worker_failure_handler() -> None:
    """Let PyTorch reinstall its SIGCHLD handler (instant notice of a dead DataLoader worker) if a past fit removed it.

    Lightning saves every signal handler when a fit starts and restores them all when it ends, so after a
    fit that started workers SIGCHLD is back at its default while PyTorch still believes its handler is
    installed. In any later fit or loader of the process (`minisora train` fits the VAE, then encodes the
    latent cache and fits the DiT) a killed worker then went unnoticed until the loader's `timeout`:
    30 s instead of 0.1 s in tests/test_data_faults.py. Call this before creating a loader with workers.
    """
    lost = signal.getsignal(signal.SIGCHLD) in (signal.SIG_DFL, None)
    if lost and getattr(signal_handling, "_SIGCHLD_handler_set", False):
        signal_handling._SIGCHLD_handler_set = False  # the next worker iterator installs the handler again


def loader_failure_hint(exception: BaseException, timeout: float) -> str | None:
    """What to do about PyTorch's terse "DataLoader timed out" / "worker exited unexpectedly" errors; None for others."""
    message = str(exception) if isinstance(exception, RuntimeError) else ""
    if message.startswith("DataLoader timed out"):
        return (
            f"a DataLoader worker produced no batch within timeout={timeout:g} s: a decoder stuck on a file or "
            "stalled storage. num_workers=0 loads in the main process and shows where it hangs; raise the "
            "data `timeout` if the storage is just slow."
        )
    if message.startswith("DataLoader worker") and ("exited unexpectedly" in message or "killed by signal" in message):
        return (
            "a DataLoader worker process died. Killed (SIGKILL) usually means the kernel's out-of-memory killer: "
            "use fewer num_workers or a smaller batch_size. num_workers=0 loads in the main process and shows "
            "a Python traceback if it is a crash."
        )
    return None


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
        batch_size: int = 8,
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
        if batch_size < 1 or num_workers < 0 or timeout < 0:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, timeout >= 0; got {batch_size}, {num_workers}, {timeout}"
            )
        if buckets is not None and geometry is None:
            raise ValueError("VideoDataModule: buckets need the model's geometry (autoencoder compression, DiT patch)")
        self.save_hyperparameters(ignore=["buckets", "geometry"])
        self.spec, self.geometry = buckets, geometry
        self.buckets: list[Bucket] = buckets.build(geometry) if buckets is not None else []
        self.assignment: Assignment | None = None  # bucket mode: where the training clips went
        self.path, self.format, self.val_path = path, format, val_path
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.persistent_workers, self.pin_memory, self.timeout = persistent_workers, pin_memory, timeout
        self.clip_args = {
            "num_frames": num_frames, "height": height, "width": width, "frame_stride": frame_stride, "fps": fps,
            "crop": crop, "flip": flip, "short_policy": short_policy, "max_upscale": max_upscale, "seed": seed,
        }  # fmt: skip
        self.train_set: ClipDataset | BucketBatches | None = None
        self.val_set: ClipDataset | BucketBatches | None = None
        # One generator for every train loader this module makes: same seed -> same batches, and a
        # reloaded loader continues the sequence instead of repeating epoch 0.
        self._generator = torch.Generator().manual_seed(seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        records, skipped = load_records(self.path, self.format)
        if self.val_path:
            train, (val, val_skipped) = records, load_records(self.val_path, self.format)
            skipped += val_skipped
        else:
            train, val = split_records(records, self.val_fraction, self.seed, _source_root(self.path))
        if self.spec is not None:
            return self._setup_buckets(train, val, len(skipped))
        self.train_set = ClipDataset(train, train=True, source=self.path, **self.clip_args)
        self.val_set = (
            ClipDataset(val, train=False, source=self.val_path or self.path, **self.clip_args) if val else None
        )
        # Decode a few clips now (in the main process; forked workers inherit what was learned) so a
        # source that is entirely unreadable, too short or too small fails here, not in a worker.
        usable, failures = self.train_set.check(NUM_CHECKED)
        if usable == 0:
            raise RuntimeError(
                f"{self.path}: none of the {len(failures)} clips checked is usable: "
                f"{short_list([f'{p}: {why}' for p, why in failures])}"
            )
        a = self.clip_args
        rank_zero_info(
            f"VideoDataModule: {len(train)} train / {len(val)} val clips from {self.path}"
            f"{f' and {self.val_path}' if self.val_path else ''} ({len(skipped)} rows skipped); "
            f"{a['num_frames']} frames at {a['height']}x{a['width']}, "
            + (f"{a['fps']:g} fps" if a["fps"] else f"stride {a['frame_stride']}")
            + f"; {usable}/{usable + len(failures)} checked clips readable"
        )

    # ---- bucket mode ----------------------------------------------------------------------------
    def assign(self, records: list[ClipRecord]) -> Assignment:
        """Probe every record (header only) and put each in its bucket (buckets.assign with this module's options)."""
        a = self.clip_args
        return assign(records, probe_all(records), self.buckets, max_upscale=self.spec.max_upscale, fps=a["fps"],
                      frame_stride=a["frame_stride"], image_frames=bool(self.spec.image_fraction))  # fmt: skip

    def bucket_datasets(self, records: list[ClipRecord], assignment: Assignment, train: bool,
                        repeat: int = 1) -> tuple[list[Bucket], list[ClipDataset]]:
        """One ClipDataset per non-empty bucket (its clips at its exact size, centre crop), each record `repeat` times."""
        args = {**self.clip_args, "crop": "center", "short_policy": "skip", "max_upscale": self.spec.max_upscale}
        used, datasets = [], []
        for bucket, members, frames in zip(assignment.buckets, assignment.members, assignment.frames):
            chosen = [records[i] for i in members + frames] * repeat
            if chosen:
                args.update(num_frames=bucket.frames, height=bucket.height, width=bucket.width)
                used.append(bucket)
                datasets.append(ClipDataset(chosen, train=train, source=f"{self.path} [{bucket.name}]", **args))
        return used, datasets

    def _setup_buckets(self, train: list[ClipRecord], val: list[ClipRecord], rows_skipped: int) -> None:
        self.assignment = self.assign(train)
        self.train_buckets, datasets = self.bucket_datasets(train, self.assignment, train=True)
        self.train_set = BucketBatches(datasets, collate_clips)
        self.val_buckets, self.val_set = [], None
        try:
            val_assignment = self.assign(val) if val else None
        except BucketError as e:  # validation is optional: say why there is none, train on
            rank_zero_warn(f"VideoDataModule: no validation clips: {e}")
            val_assignment = None
        if val_assignment is not None:
            self.val_buckets, vsets = self.bucket_datasets(val, val_assignment, train=False)
            self.val_set = BucketBatches(vsets, collate_clips)
        counts = ", ".join(f"{b.name}: {len(d)}" for b, d in zip(self.train_buckets, datasets))
        rank_zero_info(
            f"VideoDataModule: {len(self.train_set)} train / {len(self.val_set or [])} val clips from {self.path} in "
            f"{len(self.train_buckets)} buckets ({counts}); {len(self.assignment.skipped)} files fit no bucket or "
            f"were unreadable, {rows_skipped} rows skipped"
        )

    def _bucket_loader(self, data: BucketBatches, buckets: list[Bucket], train: bool) -> DataLoader:
        return one_bucket_loader(data, buckets, self.spec, self.batch_size, self.seed, train, self.trainer,
                                 self.num_workers, self.timeout, self.pin_memory and torch.cuda.is_available())  # fmt: skip

    def _loader(self, dataset: ClipDataset | BucketBatches, train: bool) -> DataLoader:
        if isinstance(dataset, BucketBatches):
            return self._bucket_loader(dataset, self.train_buckets if train else self.val_buckets, train)
        workers = self.num_workers > 0
        if workers:
            rearm_worker_failure_handler()
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=self._generator if train else None,
            num_workers=self.num_workers,
            collate_fn=collate_clips,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers,
            timeout=self.timeout if workers else 0,  # a hung decoder surfaces as an error, not a silent stall
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            self.setup("validate")
        return self._loader(self.val_set, train=False) if self.val_set is not None else []

    def on_exception(self, exception: BaseException) -> None:
        """Attach a hint to a DataLoader timeout or a dead worker (Lightning calls this when a fit fails)."""
        hint = loader_failure_hint(exception, self.timeout)
        if hint is None:
            return
        if hasattr(exception, "add_note"):  # Python >= 3.11: printed right below the error
            exception.add_note(f"VideoDataModule({self.path}): {hint}")
        else:
            rank_zero_warn(f"VideoDataModule({self.path}): {hint}")
