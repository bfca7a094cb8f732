"""Scores for conditioned videos on synthetic shapes clips: image-to-video start, long videos' windows and seams."""

import numpy as np
import pytest

from minisora.data.shapes import caption, render_clip
from minisora.eval.conditioned import (evaluate_image_to_video, evaluate_long_video, start_offset,  # fmt: skip
                                       window_bounds)
from minisora.eval.shapes import centroids


def clip(direction: str = "right", n: int = 17, speed: float | None = None, seed: int = 0) -> np.ndarray:
    return render_clip("red", "circle", direction, num_frames=n, speed=speed, rng=np.random.default_rng(seed))


def test_image_to_video_start_position_colour_and_direction():
    video = clip()
    r = evaluate_image_to_video(video, video[0], caption("red", "circle", "right"))
    assert r.color_ok and r.direction_ok and r.start_ok and r.start_px < 0.01
    shifted = np.roll(video[0], 3, axis=1)  # the image has the shape 3 px further right
    assert 2.9 < start_offset(video, shifted) < 3.1
    assert not evaluate_image_to_video(video, shifted, caption("red", "circle", "right")).start_ok
    wrong = evaluate_image_to_video(video, video[0], caption("blue", "circle", "left"))
    assert not wrong.color_ok and not wrong.direction_ok and wrong.start_ok
    assert start_offset(video, np.zeros_like(video[0])) == float("inf")  # an empty image: no start to keep


def test_window_bounds():
    assert window_bounds(17, 49, 12) == [(17, 29), (29, 41), (41, 49)]
    assert window_bounds(17, 97, 12)[-1] == (89, 97) and len(window_bounds(17, 97, 12)) == 7


def test_long_video_windows_and_seams():
    prompt = caption("red", "circle", "right")
    video = clip(n=49, speed=0.35)  # slow enough to stay in the frame for 49 frames
    good = evaluate_long_video(video, prompt, start=17, new_per_window=12)
    assert good.window_directions == ("right",) * 3 and good.directions_ok and good.visible_directions_ok
    assert good.color_ok and good.seams_ok and abs(good.median_step - 0.35) < 0.05 and good.seam_ratio < 1.5
    # A window that jumps 4 px sideways at its seam (11 median steps) and then runs on: the seam fails, directions
    # hold. Sideways towards the middle: np.roll must not wrap the shape around the frame.
    jumped = video.copy()
    jumped[29:] = np.roll(video[29:], 4 if centroids(video[:1])[0, 1] < 16 else -4, axis=1)
    bad = evaluate_long_video(jumped, prompt, start=17, new_per_window=12)
    assert not bad.seams_ok and bad.seam_ratio > 8 and bad.directions_ok
    # The last window turns back: its direction fails, the others do not.
    back = np.concatenate([video[:41], video[40:32:-1]])
    r = evaluate_long_video(back, prompt, start=17, new_per_window=12)
    assert r.window_directions[:2] == ("right", "right") and r.window_directions[2] == "left" and not r.directions_ok
    # The shape fades out in the last window: direction 'none' there and the colour is lost, but the windows where
    # it is visible still move right.
    gone = video.copy()
    gone[41:] = 0
    r = evaluate_long_video(gone, prompt, start=17, new_per_window=12)
    assert r.visible == (True, True, False) and not r.directions_ok and r.visible_directions_ok and not r.color_ok
    recoloured = video.copy()
    recoloured[41:] = recoloured[41:][..., [1, 0, 2]]  # red -> green at the end
    assert not evaluate_long_video(recoloured, prompt, start=17, new_per_window=12).color_ok
