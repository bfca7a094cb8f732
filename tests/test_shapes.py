"""The synthetic shapes dataset: captions, held-out split, rendering and make_shapes on disk."""

import csv
import json
from collections import Counter

import numpy as np
import pytest

from minisora.data.shapes import (
    COLORS,
    DIRECTION_VECTORS,
    DIRECTIONS,
    HELDOUT,
    SHAPES,
    _combination_order,
    all_combinations,
    caption,
    heldout_prompts,
    make_shapes,
    parse_caption,
    render_clip,
    train_combinations,
    train_prompts,
)
from minisora.eval.shapes import centroids, unwrap_track
from minisora.io import read_clip


def test_caption_round_trip_and_errors():
    assert caption("red", "circle", "left") == "a red circle moving left"
    for combo in all_combinations():
        assert parse_caption(caption(*combo)) == combo
    assert parse_caption("  A Red  circle moving LEFT ") == ("red", "circle", "left")
    with pytest.raises(ValueError, match="a purple circle moving left"):
        parse_caption("a purple circle moving left")
    with pytest.raises(ValueError, match="a red circle"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="shape"):
        caption("red", "hexagon", "left")


def test_heldout_split_keeps_every_part_in_training():
    assert len(all_combinations()) == 84 and len(set(HELDOUT)) == len(HELDOUT) == 8
    assert set(HELDOUT) <= set(all_combinations())
    train = train_combinations()
    assert len(train) == 76 and not set(train) & set(HELDOUT)
    assert "a red circle moving left" in train_prompts()  # the README demo prompt
    assert heldout_prompts() == [caption(*c) for c in HELDOUT]
    # Every pair of parts (colour-shape, colour-direction, shape-direction) is still seen in training,
    # and the held-out set takes at most one combination from each pair.
    parts = [COLORS, SHAPES, DIRECTIONS]
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert len({(c[i], c[j]) for c in train}) == len(parts[i]) * len(parts[j])
        assert max(Counter((c[i], c[j]) for c in HELDOUT).values()) == 1
    for k in range(3):  # each colour, shape and direction is held out at most twice/three times
        assert max(Counter(c[k] for c in HELDOUT).values()) <= (2, 3, 2)[k]


def test_combination_order_is_even_and_excludes_heldout():
    order = _combination_order(500, seed=3)
    counts = Counter(order)
    assert set(counts) == set(train_combinations())
    assert max(counts.values()) - min(counts.values()) <= 1
    assert _combination_order(100, seed=3) == order[:100]
    assert _combination_order(100, seed=4) != order[:100]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_render_clip_moves_inside_the_frame(shape, direction):
    T = 17
    clip = render_clip("magenta", shape, direction, size=32, num_frames=T, rng=np.random.default_rng(7))
    assert clip.shape == (T, 32, 32, 3) and clip.dtype == np.uint8
    # Only the palette colour, scaled by coverage: green is always 0, red equals blue.
    assert clip[..., 1].max() == 0 and np.array_equal(clip[..., 0], clip[..., 2])
    assert clip[..., 0].max() == 255
    # Fully inside the frame in every frame: the border is black, the area does not change.
    for edge in (clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]):
        assert edge.max() == 0
    area = clip[..., 0].astype(float).sum(axis=(1, 2)) / 255
    assert area.min() > 40 and area.max() / area.min() < 1.03  # anti-aliasing keeps the area steady
    # Smooth straight motion: equal steps of ~0.84 px/frame along the captioned direction only.
    c = centroids(clip, threshold=0)  # every covered pixel, weighted by coverage
    dx, dy = DIRECTION_VECTORS[direction]
    steps = np.diff(c, axis=0) @ np.array([dx, dy])
    side = np.diff(c, axis=0) @ np.array([dy, dx])
    assert np.allclose(steps, 0.42 * 32 / (T - 1), atol=0.05), steps
    assert np.abs(side).max() < 0.05


def test_render_clip_sizes_and_options():
    big = render_clip("white", "circle", "right", size=64, rng=np.random.default_rng(0))
    assert big.shape == (17, 64, 64, 3)
    c = centroids(big)
    assert c[-1, 0] - c[0, 0] == pytest.approx(0.42 * 64, abs=0.3)
    wide = render_clip("cyan", "square", "up", size=32, width=48, num_frames=9, rng=np.random.default_rng(0))
    assert wide.shape == (9, 32, 48, 3)
    assert wide[0, ..., 1].sum() / 255 == pytest.approx(0.34**2 * 32**2, rel=0.02)  # square of 0.34 * short side
    c = centroids(wide)
    assert c[0, 1] - c[-1, 1] == pytest.approx(0.42 * 32, abs=0.2)  # moves up by the default travel
    slow = render_clip("red", "square", "left", object_size=8, speed=0.5, rng=np.random.default_rng(0))
    c = centroids(slow)
    assert c[0, 0] - c[-1, 0] == pytest.approx(0.5 * 16, abs=0.1)
    # Same rng seed, same clip; a different seed moves the start.
    a = render_clip("red", "circle", "down", rng=np.random.default_rng(1))
    assert np.array_equal(a, render_clip("red", "circle", "down", rng=np.random.default_rng(1)))
    assert not np.array_equal(a, render_clip("red", "circle", "down", rng=np.random.default_rng(2)))
    with pytest.raises(ValueError, match="does not fit"):
        render_clip("red", "circle", "left", object_size=20, speed=1.0)
    with pytest.raises(ValueError, match="color 'purple'"):
        render_clip("purple", "circle", "left")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "train"
    make_shapes(out, num=24, seed=5)
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_make_shapes_writes_manifest_clips_and_heldout(shapes_dir):
    rows = _rows(shapes_dir / "manifest.csv")
    assert rows[0] == ["path", "caption"] and len(rows) == 25
    assert [r[0] for r in rows[1:]] == [f"clips/{i:05d}.mp4" for i in range(24)]
    assert len(list((shapes_dir / "clips").glob("*.mp4"))) == 24
    combos = [parse_caption(r[1]) for r in rows[1:]]
    assert not set(combos) & set(HELDOUT)
    assert len(set(combos)) == 24  # the first cycle through 76 combinations never repeats
    held = _rows(shapes_dir / "heldout.csv")
    assert held[0] == ["color", "shape", "direction", "caption"]
    assert [tuple(r[:3]) for r in held[1:]] == list(HELDOUT)
    assert [r[3] for r in held[1:]] == heldout_prompts()
    options = json.loads((shapes_dir / "shapes.json").read_text())
    assert options["num"] == 24 and options["seed"] == 5 and options["size"] == 32 and options["num_frames"] == 17


def test_make_shapes_clips_show_their_caption(shapes_dir):
    for path, text in _rows(shapes_dir / "manifest.csv")[1:]:
        color, _, direction = parse_caption(text)
        clip = read_clip(shapes_dir / path)
        assert clip.shape == (17, 32, 32, 3)
        # H.264 4:2:0 is lossy: the fully covered interior keeps the colour within ~40 per channel.
        bright = clip.max(-1)
        interior = clip[bright > 200].astype(float).mean(0)
        assert np.abs(interior - np.array(COLORS[color])).max() < 40, (path, interior)
        # Fully inside: the total brightness stays steady (a shape leaving the frame would lose some);
        # measured within 5% over 76 clips, while a pixel count above a threshold jitters ~30% for blue.
        mass = bright.astype(float).sum(axis=(1, 2)) / 255
        assert mass.min() > 30 and mass.max() / mass.min() < 1.12, (path, mass)
        # Moves the captioned way by ~the default 13.4 px, and not sideways.
        c = centroids(clip)
        dx, dy = DIRECTION_VECTORS[direction]
        move = c[-1] - c[0]
        assert move @ np.array([dx, dy]) > 11, (path, move)
        assert abs(move @ np.array([dy, dx])) < 1.5, (path, move)


def test_make_shapes_is_deterministic_and_skips_when_up_to_date(shapes_dir, tmp_path):
    again = make_shapes(tmp_path / "again", num=24, seed=5)
    assert again.read_bytes() == (shapes_dir / "manifest.csv").read_bytes()
    for i in range(24):
        name = f"clips/{i:05d}.mp4"
        assert np.array_equal(read_clip(tmp_path / "again" / name), read_clip(shapes_dir / name))
    other = make_shapes(tmp_path / "other", num=24, seed=6)
    assert other.read_bytes() != again.read_bytes()
    # Same options: nothing is rewritten; other options: regenerated, stray clips removed.
    stamp = (tmp_path / "again" / "clips" / "00000.mp4").stat().st_mtime_ns
    make_shapes(tmp_path / "again", num=24, seed=5)
    assert (tmp_path / "again" / "clips" / "00000.mp4").stat().st_mtime_ns == stamp
    make_shapes(tmp_path / "again", num=10, seed=5)
    assert len(list((tmp_path / "again" / "clips").glob("*.mp4"))) == 10
    assert json.loads((tmp_path / "again" / "shapes.json").read_text())["num"] == 10
    # Clips are lossless RGB: odd sizes work and decode to exactly the rendered frames.
    make_shapes(tmp_path / "odd", num=1, size=31, width=33, num_frames=5)
    color, shape, direction = _combination_order(1, 0)[0]
    rendered = render_clip(
        color, shape, direction, size=31, width=33, num_frames=5, rng=np.random.default_rng([0, 1, 0])
    )
    assert np.array_equal(read_clip(tmp_path / "odd" / "clips" / "00000.mp4"), rendered)


def _straddles(frames: np.ndarray) -> np.ndarray:
    """Per frame: the shape covers both the left and right columns, or both the top and bottom rows."""
    fg = frames.max(-1) > 0  # (T, H, W)
    return (fg[:, :, 0].any(1) & fg[:, :, -1].any(1)) | (fg[:, 0, :].any(1) & fg[:, -1, :].any(1))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_render_clip_wraps_around_the_frame(direction):
    T, v = 49, 1.0  # 48 px: 1.5 times round a 32 px frame, far more than fits without wrapping
    for shape in SHAPES:
        clip = render_clip("yellow", shape, direction, num_frames=T, speed=v, wrap=True, rng=np.random.default_rng(3))
        assert clip.shape == (T, 32, 32, 3) and clip[..., 2].max() == 0 and clip[..., 0].max() == 255
        assert _straddles(clip).sum() > 5  # it crosses an edge, drawn on both sides while it does
        # Drawn whole in every frame, also while split over two edges: the area does not change.
        area = clip[..., 0].astype(float).sum(axis=(1, 2)) / 255
        assert area.min() > 40 and area.max() / area.min() < 1.03, (shape, area)
        # Equal steps the short way round, along the captioned direction only, across the edges too.
        c = unwrap_track(centroids(clip, threshold=0, wrap=True), 32, 32)
        dx, dy = DIRECTION_VECTORS[direction]
        assert np.allclose(np.diff(c, axis=0) @ np.array([dx, dy]), v, atol=0.05), (shape, c)
        assert np.abs(np.diff(c, axis=0) @ np.array([dy, dx])).max() < 0.05


def test_render_clip_wrap_starts_anywhere_and_checks_its_geometry():
    # Without wrap the centre stays >= s/2 + MARGIN (6.4 px) from every edge; with it, anywhere in the frame.
    firsts = [render_clip("white", "square", "right", num_frames=1, wrap=True, rng=np.random.default_rng(i))
              for i in range(60)]  # fmt: skip
    starts = np.array([centroids(f, wrap=True)[0] for f in firsts])  # (60, 2)
    near_edge = np.minimum(starts, 32 - starts).min(axis=1) < 4
    assert near_edge.sum() >= 10 and starts.min() < 3 and starts.max() > 29
    assert _straddles(firsts[int(np.argmax(near_edge))]).any()
    with pytest.raises(ValueError, match="speed < 16"):  # a step of half the frame has no direction
        render_clip("red", "circle", "left", speed=16, wrap=True)
    with pytest.raises(ValueError, match="object_size"):  # would touch its own copy round the torus
        render_clip("red", "circle", "left", object_size=31, wrap=True)
    with pytest.raises(ValueError, match="does not fit"):
        render_clip("red", "circle", "left", num_frames=97, speed=0.84)
    assert render_clip("red", "circle", "left", num_frames=97, speed=0.84, wrap=True).shape == (97, 32, 32, 3)


def test_make_shapes_wrap_is_recorded_and_regenerates(tmp_path):
    out = tmp_path / "w"
    make_shapes(out, num=3, seed=2)
    plain = [read_clip(out / f"clips/{i:05d}.mp4") for i in range(3)]
    assert "wrap" not in json.loads((out / "shapes.json").read_text())  # data made before the option stays valid
    make_shapes(out, num=3, seed=2, wrap=True)
    assert json.loads((out / "shapes.json").read_text())["wrap"] is True
    for i, (color, shape, direction) in enumerate(_combination_order(3, 2)):
        wrapped = render_clip(color, shape, direction, rng=np.random.default_rng([2, 1, i]), wrap=True)
        assert np.array_equal(read_clip(out / f"clips/{i:05d}.mp4"), wrapped)
        assert not np.array_equal(wrapped, plain[i])
    stamp = (out / "clips" / "00000.mp4").stat().st_mtime_ns
    make_shapes(out, num=3, seed=2, wrap=True)  # same options: kept
    assert (out / "clips" / "00000.mp4").stat().st_mtime_ns == stamp
    make_shapes(out, num=3, seed=2)  # switched back: regenerated, exactly the plain clips again
    assert "wrap" not in json.loads((out / "shapes.json").read_text())
    assert all(np.array_equal(read_clip(out / f"clips/{i:05d}.mp4"), plain[i]) for i in range(3))
