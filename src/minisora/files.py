"""Crash-safe files: write under a temporary name beside the target, rename when complete, and clean up
what killed writers left behind. Used by checkpoints and the latent cache; and file names from prompts."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial"


def partial_path(path: Path) -> Path:
    """A hidden name beside `path`, unique per writer (host and pid), for writing before the rename.

    Beside, not in /tmp: a rename within one filesystem is atomic, one across filesystems is a copy
    that a kill can leave half done.
    """
    return path.with_name(f".{path.name}@{socket.gethostname()}-{os.getpid()}{PARTIAL}")


def _writer_is_gone(name: str) -> bool:
    """Whether the writer a partial name records was on this host and no longer runs (its files can go)."""
    host, _, pid = name.removesuffix(PARTIAL).rpartition("@")[2].rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and not Path(f"/proc/{pid}").exists()


def remove_stale_partials(folder: Path, name: str = "*") -> list[Path]:
    """Delete the partial files or folders of `name` in `folder` whose writer is gone; returns them.

    Writers still running, and writers on other hosts of a shared filesystem, are left alone.
    """
    if not folder.is_dir():
        return []
    stale = [p for p in sorted(folder.glob(f".{name}@*{PARTIAL}")) if _writer_is_gone(p.name)]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


@contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if missing): processes of one run take turns at a shared step.

    Under torchrun every rank starts at once; the first to arrive generates data, the others wait here and
    then find it complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe version of a prompt (sample files are named after their prompts)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "empty"
