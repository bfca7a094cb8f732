"""The shapes evaluator: perfect on ground truth (also through H.264), failing on corrupted clips."""

import numpy as np
import pytest
import torch

from minisora.data.shapes import COLORS, HELDOUT, all_combinations, caption, make_shapes, render_clip
from minisora.eval.shapes import (
    ShapesReport,
    centroids,
    classify_color,
    evaluate,
    evaluate_clip,
    evaluate_manifest,
    unwrap_track,
)
from minisora.io import read_clip, write_video

PROMPTS = [caption(*c) for c in all_combinations()]


@pytest.fixture(scope="module")
def truth():
    """One ground-truth clip per combination, all 84."""
    return [render_clip(*c, rng=np.random.default_rng(i)) for i, c in enumerate(all_combinations())]


@pytest.fixture(scope="module")
def decoded(truth, tmp_path_factory):
    """The same clips after an H.264 (yuv420p, 4:2:0 chroma) round trip."""
    d = tmp_path_factory.mktemp("h264")
    return [read_clip(write_video(clip, d / f"{i}.mp4")) for i, clip in enumerate(truth)]


def test_ground_truth_scores_perfectly(truth, decoded):
    for clips in (truth, decoded):
        report = evaluate(clips, PROMPTS)
        assert report.color_accuracy == 1.0 and report.direction_accuracy == 1.0 and report.accuracy == 1.0
    for r in evaluate(decoded, PROMPTS).results:
        assert max(abs(r.displacement[0]), abs(r.displacement[1])) > 11  # ~0.84 px/frame over 15 frames
        assert min(abs(r.displacement[0]), abs(r.displacement[1])) < 0.5


def test_other_sizes_score_perfectly():
    clips, prompts = [], []
    for i, c in enumerate(all_combinations()[::5]):
        for size, width in ((64, None), (32, 48), (48, 32)):
            clips.append(render_clip(*c, size=size, width=width, num_frames=9, rng=np.random.default_rng(i)))
            prompts.append(caption(*c))
    assert evaluate(clips, prompts).accuracy == 1.0


def test_recoloured_clips_fail_colour_only(decoded):
    names = list(COLORS)
    prompts = []
    for color, shape, direction in all_combinations():
        prompts.append(caption(names[(names.index(color) + 1) % len(names)], shape, direction))
    report = evaluate(decoded, prompts)
    assert report.color_accuracy == 0.0 and report.direction_accuracy == 1.0


def test_reversed_and_static_clips_fail_direction(decoded):
    reversed_ = evaluate([c[::-1] for c in decoded], PROMPTS)
    assert reversed_.direction_accuracy == 0.0 and reversed_.color_accuracy == 1.0
    static = evaluate([np.repeat(c[:1], len(c), axis=0) for c in decoded], PROMPTS)
    assert static.direction_accuracy == 0.0 and static.color_accuracy == 1.0
    assert {r.pred_direction for r in static.results} == {"none"}


def test_blank_clips_fail_both(decoded):
    noise = np.random.default_rng(0).integers(0, 20, decoded[0].shape, dtype=np.uint8)  # H.264-like black
    stray = np.zeros_like(decoded[0])
    stray[:, 3, 5] = 255  # a couple of stray bright pixels are not a shape
    stray[4, 20, 9] = (255, 0, 0)
    for blank in (np.zeros_like(decoded[0]), noise, stray):
        report = evaluate([blank] * 3, PROMPTS[:3])
        assert report.color_accuracy == 0.0 and report.direction_accuracy == 0.0
        assert {(r.pred_color, r.pred_direction) for r in report.results} == {("none", "none")}


def test_robust_to_washed_out_colours_and_stray_pixels(decoded):
    rng = np.random.default_rng(0)
    perturbed = []
    for clip in decoded:
        x = clip.astype(np.float32)
        coverage = x.max(-1, keepdims=True) / 255
        x = 0.7 * x + 60 * coverage  # desaturated and dimmer: red becomes (239, 60, 60)
        ys, xs = rng.integers(0, 32, 6), rng.integers(0, 32, 6)
        x[:, ys, xs] = rng.integers(0, 256, (6, 3))  # a few stray pixels of random colours
        perturbed.append(x.round().clip(0, 255).astype(np.uint8))
    assert evaluate(perturbed, PROMPTS).accuracy == 1.0


def test_colour_vote_ignores_a_minority_blob():
    """Mean colour of red and green is yellow; a vote gives the dominant colour."""
    frames = np.zeros((1, 32, 32, 3), np.uint8)
    frames[0, 4:14, 4:14] = COLORS["red"]
    frames[0, 20:27, 20:27] = COLORS["green"]
    assert classify_color(frames) == "red"


def test_accepts_tensors_and_batches(truth):
    clip = torch.from_numpy(truth[0])
    assert evaluate_clip(clip, PROMPTS[0]).correct
    as_float = clip.permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W) in [-1, 1], as a decoder returns
    assert evaluate_clip(as_float, PROMPTS[0]).correct
    assert evaluate(np.stack(truth[:4]), PROMPTS[:4]).accuracy == 1.0
    with pytest.raises(ValueError, match="3 clips but 2 prompts"):
        evaluate(truth[:3], PROMPTS[:2])
    with pytest.raises(ValueError, match="a red blob moving left"):
        evaluate_clip(truth[0], "a red blob moving left")


def test_report_per_prompt_splits_and_table(truth):
    clips = [truth[0], truth[0][::-1], truth[1]]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    report = evaluate(clips, prompts)
    assert report.color_accuracy == 1.0 and report.direction_accuracy == pytest.approx(2 / 3)
    per = report.per_prompt()
    assert per[PROMPTS[0]] == {"color": 1.0, "direction": 0.5, "both": 0.5, "n": 2}
    assert per[PROMPTS[1]]["n"] == 1 and per[PROMPTS[1]]["both"] == 1.0
    held = caption(*HELDOUT[0])
    i = PROMPTS.index(held)
    mixed = evaluate([truth[i], truth[0]], [held, PROMPTS[0]])
    assert [r.prompt for r in mixed.split(heldout=True).results] == [held]
    table = str(mixed)
    assert f"{held} *" in table and "held-out prompts" in table and table.splitlines()[-1].startswith("all")
    assert ShapesReport([]).accuracy == 0.0


def test_evaluate_manifest_on_generated_data(tmp_path):
    manifest = make_shapes(tmp_path / "shapes", num=12, seed=1, size=64, num_frames=9)
    report = evaluate_manifest(manifest)
    assert len(report.results) == 12 and report.accuracy == 1.0
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\nx.mp4,a red circle moving left\n")
    with pytest.raises(ValueError, match="bad.csv"):
        evaluate_manifest(bad)


def test_wrapped_clip_crossing_the_left_edge_scores_left(tmp_path):
    clip = render_clip("green", "triangle", "left", wrap=True, rng=np.random.default_rng(2))
    fg = clip.max(-1) > 0  # (T, H, W)
    first_edge = int(np.argmax(fg[:, :, 0].any(axis=1)))  # the first frame touching the left edge
    assert not fg[0, :, -1].any() and fg[first_edge:, :, -1].any() and fg[-1, :, -1].any()  # re-enters on the right
    prompt = caption("green", "triangle", "left")
    for frames in (clip, read_clip(write_video(clip, tmp_path / "wrapped.mp4"))):  # also through H.264
        r = evaluate_clip(frames, prompt, wrap=True)
        assert r.correct and r.displacement[0] == pytest.approx(-0.42 * 32 * 15 / 16, abs=1.0)
        assert not evaluate_clip(frames, prompt).direction_ok  # the linear centroid jumps to the right edge


def test_wrapped_clips_of_every_combination_score_perfectly_on_the_torus():
    clips = [render_clip(*c, wrap=True, rng=np.random.default_rng(i)) for i, c in enumerate(all_combinations())]
    fg = np.stack(clips).max(-1) > 0  # (N, T, H, W)
    crossing = (fg[..., :, 0].any(-1) & fg[..., :, -1].any(-1)) | (fg[..., 0, :].any(-1) & fg[..., -1, :].any(-1))
    assert crossing.any(axis=1).mean() > 0.5  # most of them cross an edge within 17 frames
    assert evaluate(clips, PROMPTS, wrap=True).accuracy == 1.0
    assert evaluate(clips, PROMPTS).direction_accuracy < 0.7  # the linear scorer is fooled by the crossings
    assert evaluate([c[::-1] for c in clips], PROMPTS, wrap=True).direction_accuracy == 0.0


def test_wrap_scoring_leaves_ordinary_clips_verdicts_unchanged(truth, decoded):
    """On clips that never wrap, circular centroids and steps modulo the frame agree with the linear computation."""
    wrong = PROMPTS[1:] + PROMPTS[:1]  # reversed clips and other prompts: verdicts that fail must fail alike
    for clips, prompts in ((truth, PROMPTS), (decoded, PROMPTS), ([c[::-1] for c in decoded], wrong)):
        for clip, prompt in zip(clips, prompts):
            linear, torus = evaluate_clip(clip, prompt), evaluate_clip(clip, prompt, wrap=True)
            assert (torus.pred_color, torus.pred_direction) == (linear.pred_color, linear.pred_direction)
            assert np.allclose(torus.displacement, linear.displacement, atol=0.05)
            c = centroids(clip)
            assert np.allclose(centroids(clip, wrap=True), c, atol=0.1)  # the triangle's circular mean moves a little
            assert np.allclose(unwrap_track(c, 32, 32), c, atol=1e-9)  # no step reaches half the frame
