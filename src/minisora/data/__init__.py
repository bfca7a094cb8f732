"""Data: clip sources (manifests, caption folders, class folders), ClipDataset, DataModules, shapes."""

from minisora.data.clips import ClipDataset, SkippedClipWarning
from minisora.data.sources import ClipRecord, load_records

__all__ = ["ClipDataset", "ClipRecord", "SkippedClipWarning", "VideoDataModule", "load_records"]


def __getattr__(name: str):
    # Lazy: the DataModule pulls in Lightning (~2 s), which `minisora make-shapes` and plain
    # dataset use do not need.
    if name == "VideoDataModule":
        from minisora.data.datamodule import VideoDataModule

        return VideoDataModule
    raise AttributeError(f"module 'minisora.data' has no attribute {name!r}")
