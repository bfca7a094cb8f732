"""Shapes scores for conditioned videos: image-to-video's start position, long videos' windows and seams.

Built on the shapes evaluator (eval/shapes.py: colour vote, foreground centroid, direction), for what
conditioning adds:
- image-to-video: the clip must start where the image has the shape (first-frame centroid within
  START_TOLERANCE px of the image's), besides colour and direction;
- long videos (minisora.extend): every generated window must move in the prompt's direction, the colour must
  hold to the end, and no seam between windows may jump: the largest centroid step at a seam is compared
  with the clip's median frame-to-frame step (SEAM_RATIO).
Every score takes `wrap` for clips of a wrapping world (make_shapes(wrap=True)): positions are compared and
steps taken the short way round the frame, so a shape re-entering at the opposite edge is neither a jump nor
a reversal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minisora.data.shapes import parse_caption, torus_offset
from minisora.eval.shapes import (FOREGROUND_THRESHOLD, MIN_AREA, MIN_TRAVEL, MIN_TRAVEL_PX, centroids,  # fmt: skip
                                  classify_color, classify_direction, unwrap_track)
from minisora.io import to_uint8_frames

START_TOLERANCE = 2.0  # px: the start position counts as kept within this distance
SEAM_RATIO = 3.0  # a seam step above this many median frame-to-frame steps is a jump
CLIP_FRAMES = 17  # the clip length the shapes evaluator's minimum travel is set for


def start_offset(clip: np.ndarray, image: np.ndarray, wrap: bool = False) -> float:
    """Distance (px) between the foreground centroids of the clip's first frame and of the image; inf if either is
    empty. wrap: the frame is a torus, and the distance goes the short way round.
    """
    first = to_uint8_frames(clip)[:1]
    a = centroids(first, wrap=wrap)[0]
    b = centroids(np.asarray(image)[None], wrap=wrap)[0]
    H, W = first.shape[1:3]
    d = float(np.hypot(*torus_offset(a - b, np.array([W, H])))) if wrap else float(np.hypot(*(a - b)))
    return d if np.isfinite(d) else float("inf")


@dataclass(frozen=True)
class ImageToVideoResult:
    color_ok: bool
    direction_ok: bool
    start_px: float  # first-frame centroid's distance from the image's

    @property
    def start_ok(self) -> bool:
        return self.start_px <= START_TOLERANCE


def evaluate_image_to_video(clip: np.ndarray, image: np.ndarray, prompt: str, wrap: bool = False) -> ImageToVideoResult:
    """Colour and direction as the shapes evaluator scores them, and where the clip starts relative to the image."""
    color, _, direction = parse_caption(prompt)
    frames = to_uint8_frames(clip)
    return ImageToVideoResult(classify_color(frames) == color, classify_direction(frames, wrap=wrap)[0] == direction,
                              start_offset(frames, image, wrap))  # fmt: skip


def window_bounds(start: int, length: int, new_per_window: int) -> list[tuple[int, int]]:
    """[first, end) frames of each generated window of a video whose first `start` frames were given."""
    return [(s, min(s + new_per_window, length)) for s in range(start, length, new_per_window)]


def seam_steps(c: np.ndarray, seams: list[int]) -> tuple[float, float]:
    """(largest centroid step across a seam, median step between consecutive frames) from centroids c (T, 2).

    The step into frame s is |c[s] - c[s - 1]|; seams whose frames are empty (NaN) are skipped; NaN when nothing
    is left to compare. For a wrapping world pass the unwrapped track (unwrap_track): its steps go the short way round.
    """
    steps = np.hypot(*np.diff(c, axis=0).T)  # (T - 1,): step into frame i + 1
    at_seams = [steps[s - 1] for s in seams if 0 < s < len(c) and np.isfinite(steps[s - 1])]
    moving = steps[np.isfinite(steps)]
    return (max(at_seams) if at_seams else float("nan"), float(np.median(moving)) if len(moving) else float("nan"))


@dataclass(frozen=True)
class LongVideoResult:
    window_directions: tuple[str, ...]  # per generated window ("none": empty, or moved too little)
    direction: str  # asked for
    color: str
    last_color: str  # the colour vote over the last window
    seam_jump: float  # largest step at a seam (px)
    median_step: float  # median frame-to-frame step (px)
    visible: tuple[bool, ...]  # per window: the shape is in most of its frames

    @property
    def directions_ok(self) -> bool:
        """Every window moves the prompt's way."""
        return all(d == self.direction for d in self.window_directions)

    @property
    def visible_directions_ok(self) -> bool:
        """Every window in which the shape is still visible moves the prompt's way (at least one is)."""
        seen = [d for d, v in zip(self.window_directions, self.visible) if v]
        return bool(seen) and all(d == self.direction for d in seen)

    @property
    def color_ok(self) -> bool:
        return self.last_color == self.color

    @property
    def seam_ratio(self) -> float:
        return self.seam_jump / max(self.median_step, 1e-6)

    @property
    def seams_ok(self) -> bool:
        """No seam step above SEAM_RATIO median steps (a video without a measurable seam passes)."""
        return not self.seam_ratio > SEAM_RATIO


def evaluate_long_video(
    clip: np.ndarray, prompt: str, start: int, new_per_window: int, wrap: bool = False
) -> LongVideoResult:
    """Score a video whose first `start` frames were given and whose windows add new_per_window frames each.

    Each window's direction is classified over its frames and the one before it (the motion into the window
    counts), with the shapes evaluator's minimum travel scaled to the window's length (it is set for a
    17-frame clip: a shorter window at the same speed travels less); the colour over the last window.
    wrap: the video shows a wrapping world; directions and seam steps are measured the short way round.
    """
    color, _, direction = parse_caption(prompt)
    frames = to_uint8_frames(clip)
    c = centroids(frames, wrap=wrap)  # (T, 2)
    if wrap:
        c = unwrap_track(c, *frames.shape[1:3])  # steps modulo the frame: a re-entry is not a jump
    bounds = window_bounds(start, len(frames), new_per_window)
    dirs, visible = [], []
    for a, b in bounds:
        travel = MIN_TRAVEL * min(frames.shape[1:3]) * (b - a) / (CLIP_FRAMES - 1)
        dirs.append(classify_direction(frames[a - 1 : b], min_displacement=max(MIN_TRAVEL_PX, travel), wrap=wrap)[0])
        area = (frames[a:b].max(-1) > FOREGROUND_THRESHOLD).mean(axis=(1, 2))  # (b - a,)
        visible.append(bool((area >= MIN_AREA).mean() > 0.5))
    a, b = bounds[-1]
    jump, median = seam_steps(c, [a for a, _ in bounds])
    return LongVideoResult(tuple(dirs), direction, color, classify_color(frames[a:b]), jump, median, tuple(visible))
