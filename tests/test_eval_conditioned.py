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


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_long_wrapped_video_97_frames(direction):
    """A 17 -> 97 frame continuation of a wrapping world at the 17-frame clips' speed goes 2.5 times round the
    frame: on the torus every window moves the prompt's way and no re-entry counts as a seam jump."""
    prompt = caption("red", "triangle", direction)
    video = render_clip("red", "triangle", direction, num_frames=97, speed=0.42 * 32 / 16, wrap=True,
                        rng=np.random.default_rng(5))  # fmt: skip
    r = evaluate_long_video(video, prompt, start=17, new_per_window=12, wrap=True)
    assert r.window_directions == (direction,) * 7 and r.directions_ok and r.color_ok and r.seams_ok
    assert abs(r.median_step - 0.84) < 0.1 and r.seam_ratio < 1.5 and all(r.visible)
    # The same world scrolled so that the centroid re-enters exactly at the seam into frame 29: still no jump.
    axis = 2 if direction in ("left", "right") else 1  # the (T, H, W, 3) axis it moves along
    at_seam = next(k for k in range(32) if np.abs(np.diff(centroids(np.roll(video[28:30], k, axis=axis),
                                                                   wrap=True), axis=0)).max() > 16)  # fmt: skip
    rolled = evaluate_long_video(np.roll(video, at_seam, axis=axis), prompt, start=17, new_per_window=12, wrap=True)
    assert rolled.seams_ok and rolled.seam_ratio < 1.5 and rolled.directions_ok
    linear = evaluate_long_video(video, prompt, start=17, new_per_window=12)
    assert not linear.directions_ok  # the same video scored as if it did not wrap: crossings read as reversals
    assert not evaluate_long_video(video[::-1], prompt, start=17, new_per_window=12, wrap=True).directions_ok
    # A sideways jump of 4 px at a seam still fails on the torus (np.roll shifts round it, as the world does).
    jumped = video.copy()
    jumped[53:] = np.roll(video[53:], 4, axis=2 if direction in ("up", "down") else 1)
    bad = evaluate_long_video(jumped, prompt, start=17, new_per_window=12, wrap=True)
    assert not bad.seams_ok and bad.directions_ok


def test_image_to_video_start_on_the_torus():
    prompt = caption("red", "circle", "up")
    video = render_clip("red", "circle", "up", wrap=True, rng=np.random.default_rng(1))  # starts across the top edge
    fg = video[0].max(-1) > 0
    assert fg[0].any() and fg[-1].any()
    r = evaluate_image_to_video(video, video[0], prompt, wrap=True)
    assert r.color_ok and r.direction_ok and r.start_ok and r.start_px < 0.01
    shifted = np.roll(video[0], 3, axis=0)  # 3 px further down, round the torus
    assert 2.9 < start_offset(video, shifted, wrap=True) < 3.1
    assert start_offset(video, shifted) > 5  # the linear centroid of a split shape is not where the shape is
