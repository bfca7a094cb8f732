"""record_run.py that SIGKILLs itself at a chosen point of a checkpoint write, for test_kill_resume.py.

KILL_MID_WRITE=N: the N-th checkpoint write (counting every file, step-*.ckpt and last.ckpt) stops after
half its bytes reached the disk. KILL_BEFORE_RENAME=N: the N-th write completes but the process dies
before the rename that publishes it. A real SIGKILL either way: no Python cleanup runs.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

import record_run
from minisora.training import checkpoint_io

MID_WRITE, BEFORE_RENAME = int(os.environ.get("KILL_MID_WRITE", 0)), int(os.environ.get("KILL_BEFORE_RENAME", 0))
writes = 0
_save, _replace = torch.save, os.replace


def save(obj, f, *args, **kwargs):
    global writes
    writes += 1
    if writes != MID_WRITE or isinstance(f, (str, os.PathLike)):
        return _save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def replace(src, dst):
    if BEFORE_RENAME and writes == BEFORE_RENAME:
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst)


checkpoint_io.torch.save = save  # the module's torch is the torch module: patched for this process only
checkpoint_io.os.replace = replace

if __name__ == "__main__":
    from minisora.cli import main

    record_run.install()
    sys.exit(main(sys.argv[1:]))
