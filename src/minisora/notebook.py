"""Helpers the notebooks import (so no logic lives only in a notebook): paths, run settings, inline videos, logs."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def tiny() -> bool:
    """True when the test suite runs a notebook (MINISORA_NOTEBOOK_TINY=1)."""
    return os.environ.get("MINISORA_NOTEBOOK_TINY") == "1"


def config() -> Path:
    """The notebooks' config: configs/notebooks/tiny.yaml under the test suite, else quick.yaml (base: shapes.yaml)."""
    return project_root() / "configs" / "notebooks" / ("tiny.yaml" if tiny() else "quick.yaml")


def project_root() -> Path:
    """The folder holding configs/: MINISORA_ROOT, else the first of cwd and its parents, else the source checkout."""
    if os.environ.get("MINISORA_ROOT"):
        return Path(os.environ["MINISORA_ROOT"]).resolve()
    for folder in [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]]:
        if (folder / "configs" / "shapes.yaml").is_file():
            return folder
    raise FileNotFoundError("configs/shapes.yaml not found in the working folder, its parents or the checkout")


def work_dir() -> Path:
    """Where runs/ and data/ live: MINISORA_NOTEBOOK_WORKDIR, else the project root (where `make train` writes)."""
    return Path(os.environ.get("MINISORA_NOTEBOOK_WORKDIR") or project_root()).resolve()


def _gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def videos_html(
    videos: Sequence[np.ndarray], captions: Sequence[str] | None = None, fps: float = 8, size: int = 160
) -> str:
    """An HTML row of looping GIFs (shown everywhere notebooks render, unlike <video>), pixel art kept sharp."""
    captions = list(captions or [""] * len(videos))
    cells = []
    for frames, text in zip(videos, captions):
        data = base64.b64encode(_gif_bytes(np.asarray(frames), fps)).decode()
        cells.append(
            f'<figure style="display:inline-block;margin:4px;text-align:center">'
            f'<img src="data:image/gif;base64,{data}" style="width:{size}px;image-rendering:pixelated"/>'
            f'<figcaption style="font-size:11px;max-width:{size}px">{html.escape(text)}</figcaption></figure>'
        )
    return "<div>" + "".join(cells) + "</div>"


def show_videos(videos: Sequence[np.ndarray], captions: Sequence[str] | None = None, fps: float = 8, size: int = 160):
    """Display videos inline in a notebook (an IPython HTML object)."""
    from IPython.display import HTML

    return HTML(videos_html(videos, captions, fps, size))


def read_scalars(logdir: str | Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a TensorBoard scalar over every event file under `logdir`, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, values = [], []
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                steps.append(e.step)
                values.append(e.value)
    if not steps:
        raise ValueError(f"no scalar {tag!r} in the TensorBoard logs under {logdir}")
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps)[order], np.asarray(values)[order]
