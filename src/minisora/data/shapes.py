"""Synthetic moving-shapes dataset, the embedded default: one coloured shape gliding across black.

Every clip shows ONE filled shape moving in a straight line for the whole clip, captioned
"a {color} {shape} moving {direction}". Eight fixed combinations (HELDOUT) never appear in the
train split, so a model can be tested on prompts it has never seen whose parts it has seen.
With `wrap` the frame is a torus, an endless scrolling world: a shape leaving one edge re-enters at the
opposite one, so a video can go on moving far longer than a clip without the shape leaving the frame.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np

from minisora.io import write_video

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates (x right, y down).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Held out of training. Hand-picked for balance: every colour appears once (blue twice), every
# direction twice, shapes 3/3/2, and no (colour, shape), (colour, direction) or (shape, direction)
# pair loses more than one of its combinations, so each part is still seen in training in several
# contexts. "a red circle moving left" (the README demo) stays in training.
HELDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "square", "up"),
    ("green", "triangle", "left"),
    ("blue", "circle", "right"),
    ("blue", "square", "down"),
    ("yellow", "circle", "down"),
    ("magenta", "triangle", "right"),
    ("cyan", "square", "left"),
    ("white", "triangle", "up"),
)

# Defaults as fractions of the shorter frame side, so 32x32 and 64x64 look alike: at 32 px the shape
# is ~11 px across and travels ~13 px over the clip (0.84 px/frame at 17 frames), which leaves room
# for a random start and keeps the motion obvious to the eye and to the evaluator.
OBJECT_FRACTION = 0.34
TRAVEL_FRACTION = 0.42
MARGIN = 1.0  # px of black kept between the shape's bounding box and the frame edge
FORMAT_VERSION = 2  # 2: lossless RGB clips (were yuv420p crf 17). Bump when rendering changes, so make_shapes regenerates old data

_CAPTION_RE = re.compile(r"a (\w+) (\w+) moving (\w+)")


def _check(color: str, shape: str, direction: str) -> None:
    parts = (("color", color, COLORS), ("shape", shape, SHAPES), ("direction", direction, DIRECTIONS))
    for name, value, allowed in parts:
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def caption(color: str, shape: str, direction: str) -> str:
    """The caption of a combination, e.g. 'a red circle moving left'."""
    _check(color, shape, direction)
    return f"a {color} {shape} moving {direction}"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of caption(): 'a red circle moving left' -> ('red', 'circle', 'left')."""
    m = _CAPTION_RE.fullmatch(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(f"caption {text!r} does not match 'a {{color}} {{shape}} moving {{direction}}'")
    try:
        _check(*m.groups())
    except ValueError as e:
        raise ValueError(f"caption {text!r}: {e}") from None
    return m.group(1), m.group(2), m.group(3)


def all_combinations() -> list[tuple[str, str, str]]:
    """All 84 (color, shape, direction) combinations in a fixed order."""
    return list(itertools.product(COLORS, SHAPES, DIRECTIONS))


def train_combinations() -> list[tuple[str, str, str]]:
    heldout = set(HELDOUT)
    return [c for c in all_combinations() if c not in heldout]


def train_prompts() -> list[str]:
    return [caption(*c) for c in train_combinations()]


def heldout_prompts() -> list[str]:
    return [caption(*c) for c in HELDOUT]


def _default_geometry(height: int, width: int, num_frames: int) -> tuple[float, float]:
    """Default object size (px) and speed (px/frame) scaled with the frame and clip length."""
    side = min(height, width)
    return OBJECT_FRACTION * side, TRAVEL_FRACTION * side / max(num_frames - 1, 1)


def torus_offset(d: np.ndarray | float, extent: float) -> np.ndarray | float:
    """An offset taken modulo a wrapping frame's extent into [-extent/2, extent/2): the shortest way round."""
    return (d + extent / 2) % extent - extent / 2


def _geometry(
    H: int, W: int, T: int, object_size: float | None, speed: float | None, direction: str, wrap: bool = False
) -> tuple[float, float]:
    """Object size (px) and speed (px/frame), checked to fit the frame for the whole clip (wrap: any travel)."""
    if H < 4 or W < 4 or T < 1:
        raise ValueError(f"shapes need height/width >= 4 and num_frames >= 1, got {H}x{W}x{T}")
    default_s, default_v = _default_geometry(H, W, T)
    s = float(object_size if object_size is not None else default_s)
    v = float(speed if speed is not None else default_v)
    if s <= 0 or v < 0:
        raise ValueError(f"object_size must be > 0 and speed >= 0, got {s} and {v}")
    along, across = (W, H) if direction in ("left", "right") else (H, W)
    if wrap:
        # The shape must not meet its own copy round the torus, and a step must stay under half the frame,
        # or the shortest way round (what the evaluator measures) would point backwards.
        if s + 2 * MARGIN > min(H, W) or v >= along / 2:
            raise ValueError(
                f"a wrapping {s:.1f} px shape at {v:.2f} px/frame {direction} needs object_size + {2 * MARGIN:g} "
                f"<= {min(H, W)} px and speed < {along / 2:g} px/frame in a {H}x{W} frame; lower object_size or speed"
            )
        return s, v
    if s + 2 * MARGIN + v * (T - 1) > along or s + 2 * MARGIN > across:
        raise ValueError(
            f"a {s:.1f} px shape moving {v * (T - 1):.1f} px {direction} does not fit a {H}x{W} frame "
            f"with {MARGIN:g} px margins; lower object_size or speed"
        )
    return s, v


def _coverage(shape: str, x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    """Fraction of each pixel covered by a shape of size s; (x, y) are pixel centres relative to its centre.

    Area sampling from the signed distance to the outline: a pixel whose centre lies d px outside a
    straight edge is covered clip(0.5 - d, 0, 1) (exact for axis-aligned edges, close for the rest).
    Continuous in the position, so sub-pixel motion is smooth: at 0.84 px/frame the centroid steps
    vary by at most 0.01 (square), 0.02 (circle) and 0.04 px (triangle corners), measured over 600
    clips; 4x4 supersampling gave 0.12 px, 16x16 gave 0.045 px at 25x the cost.
    """
    h = s / 2
    if shape == "circle":
        return np.clip(h + 0.5 - np.sqrt(x * x + y * y), 0, 1)
    if shape == "square":  # exact overlap of the pixel with the square
        return np.clip(h + 0.5 - np.abs(x), 0, 1) * np.clip(h + 0.5 - np.abs(y), 0, 1)
    # Triangle pointing up, base s and height s: the larger of the distance past the slanted sides
    # (|x| <= (y + h) / 2) and past its s x s box, which keeps the sharp corners from spilling more
    # than half a pixel out of the box (and so into the frame's black margin).
    past_sides = (np.abs(x) - (y + h) / 2) / np.sqrt(1.25)
    past_box = np.maximum(np.abs(x), np.abs(y)) - h
    return np.clip(0.5 - np.maximum(past_sides, past_box), 0, 1)


def render_clip(
    color: str,
    shape: str,
    direction: str,
    *,
    size: int = 32,
    width: int | None = None,
    num_frames: int = 17,
    object_size: float | None = None,
    speed: float | None = None,
    rng: np.random.Generator | None = None,
    wrap: bool = False,
) -> np.ndarray:
    """Render one clip as uint8 (T, H, W, 3); `size` is the height, `width` defaults to `size`.

    object_size is the shape's bounding box side in px and speed is px/frame; None scales the
    defaults with the frame (see OBJECT_FRACTION, TRAVEL_FRACTION). The start is random (rng)
    among positions that keep the whole shape inside the frame for the whole clip; with `wrap`,
    anywhere in the frame, and the shape is drawn modulo the frame (on both sides while it crosses an edge).
    """
    _check(color, shape, direction)
    H, W, T = size, width or size, num_frames
    s, v = _geometry(H, W, T, object_size, speed, direction, wrap)
    rng = rng if rng is not None else np.random.default_rng()

    dx, dy = DIRECTION_VECTORS[direction]
    xs = np.arange(W, dtype=np.float32) + 0.5  # pixel centres
    ys = np.arange(H, dtype=np.float32) + 0.5
    if wrap:
        cx = rng.uniform(0, W) + dx * v * np.arange(T)  # (T,), unbounded: the offsets below wrap
        cy = rng.uniform(0, H) + dy * v * np.arange(T)
        # Each pixel's offset from the centre the short way round the torus: the shape is smaller than the
        # frame (_geometry), so this draws it once, split over the edges while it crosses them.
        rel_x = torus_offset(xs[None, None, :] - cx[:, None, None].astype(np.float32), W)  # (T, 1, W)
        rel_y = torus_offset(ys[None, :, None] - cy[:, None, None].astype(np.float32), H)  # (T, H, 1)
        return _paint(shape, color, rel_x, rel_y, s)
    travel = v * (T - 1)
    along, across = (W, H) if dx else (H, W)
    slack_along = along - s - 2 * MARGIN - travel
    slack_across = across - s - 2 * MARGIN
    # Centre positions: the box [c - s/2, c + s/2] stays within [MARGIN, extent - MARGIN] at all times.
    lo = s / 2 + MARGIN
    start_along = lo + rng.uniform(0, slack_along)
    start_across = lo + rng.uniform(0, slack_across)
    if dx:
        cx = start_along + travel * (0 if dx > 0 else 1) + dx * v * np.arange(T)
        cy = np.full(T, start_across)
    else:
        cy = start_along + travel * (0 if dy > 0 else 1) + dy * v * np.arange(T)
        cx = np.full(T, start_across)

    rel_x = xs[None, None, :] - cx[:, None, None].astype(np.float32)  # (T, 1, W)
    rel_y = ys[None, :, None] - cy[:, None, None].astype(np.float32)  # (T, H, 1)
    return _paint(shape, color, rel_x, rel_y, s)


def _paint(shape: str, color: str, rel_x: np.ndarray, rel_y: np.ndarray, s: float) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of the shape's coverage in its colour, from pixel offsets to its centre."""
    coverage = _coverage(shape, rel_x, rel_y, s)  # (T, H, W)
    rgb = np.asarray(COLORS[color], dtype=np.float32)
    return np.rint(coverage[..., None] * rgb).astype(np.uint8)  # (T, H, W, 3)


def _options(
    num: int,
    seed: int,
    size: int,
    width: int | None,
    num_frames: int,
    fps: float,
    object_size: float | None,
    speed: float | None,
) -> dict:
    """What shapes.json records: everything that changes the bytes on disk."""
    return {
        "version": FORMAT_VERSION,
        "num": num,
        "seed": seed,
        "size": size,
        "width": width or size,
        "num_frames": num_frames,
        "fps": float(fps),
        "object_size": object_size,
        "speed": speed,
    }


def _combination_order(num: int, seed: int, colors: list[str] | None = None) -> list[tuple[str, str, str]]:
    """Cycle through the train combinations (of `colors` only, if given), reshuffled each cycle, so counts differ
    by at most one."""
    combos = [c for c in train_combinations() if colors is None or c[0] in colors]
    rng = np.random.default_rng([seed, 0])
    order: list[tuple[str, str, str]] = []
    while len(order) < num:
        order.extend(combos[i] for i in rng.permutation(len(combos)))
    return order[:num]


def _up_to_date(out: Path, options: dict) -> bool:
    """Whether out/ holds complete shapes data generated with exactly these options."""
    try:
        on_disk = json.loads((out / "shapes.json").read_text())
    except (OSError, ValueError):
        return False
    clips = list((out / "clips").glob("*.mp4"))
    return on_disk == options and (out / "manifest.csv").is_file() and len(clips) == options["num"]


def _make_variants(out: Path, num: int, seed: int, fps: float, variants: list[str], **kw) -> Path:
    """Shapes data at several sizes: one make_shapes folder per variant and a manifest listing all of them."""
    sizes = []
    for v in variants:
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", str(v).strip())
        if not m:
            raise ValueError(f"make_shapes: variant {v!r} is not frames x height x width, e.g. '17x32x48'")
        sizes.append(tuple(int(g) for g in m.groups()))
    rows = []
    for k, (T, H, W) in enumerate(sizes):
        n = num // len(sizes) + (k < num % len(sizes))
        sub = make_shapes(out / f"{T}x{H}x{W}", n, seed=seed + k, size=H, width=W, num_frames=T, fps=fps, **kw)
        with open(sub) as f:
            rows += [(f"{T}x{H}x{W}/{r['path']}", r["caption"]) for r in csv.DictReader(f)]
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    shutil.copyfile(out / f"{sizes[0][0]}x{sizes[0][1]}x{sizes[0][2]}" / "heldout.csv", out / "heldout.csv")
    return out / "manifest.csv"


def make_shapes(
    out: str | Path,
    num: int,
    seed: int = 0,
    size: int = 32,
    num_frames: int = 17,
    fps: float = 8,
    *,
    width: int | None = None,
    object_size: float | None = None,
    speed: float | None = None,
    colors: list[str] | None = None,
    variants: list[str] | None = None,
    wrap: bool = False,
    force: bool = False,
) -> Path:
    """Write `num` train clips to out/clips/, out/manifest.csv, out/heldout.csv and out/shapes.json.

    Returns the manifest path. Skips the work when out/shapes.json shows data made with the same
    options (unless `force`). Deterministic for a seed; clip i depends only on (seed, i). `colors`
    limits the clips to those colours (a colour held out of a base model, or the only one of a fine-tune).
    `variants` ("17x32x32", "9x24x40": frames x height x width) splits the clips evenly over those sizes,
    each in out/<variant>/, with one manifest for all (data for bucketed training). `wrap` makes the frame a
    torus (render_clip): shapes start anywhere and re-enter at the opposite edge, for videos longer than a clip.
    """
    if num < 1:
        raise ValueError(f"make_shapes: num must be >= 1, got {num}")
    if variants:
        return _make_variants(Path(out), num, seed, fps, variants, object_size=object_size, speed=speed,
                              colors=colors, wrap=wrap, force=force)  # fmt: skip
    for color in colors or []:
        if color not in COLORS:
            raise ValueError(f"make_shapes: unknown colour {color!r} in colors; expected some of {', '.join(COLORS)}")
    out = Path(out)
    options = _options(num, seed, size, width, num_frames, fps, object_size, speed)
    if colors:  # recorded only when set, so data made before this option existed stays up to date
        options["colors"] = sorted(colors)
    if wrap:  # likewise: recorded when set, so switching it either way regenerates the data
        options["wrap"] = True
    if not force and _up_to_date(out, options):
        return out / "manifest.csv"
    H, W = size, width or size
    for direction in ("right", "down"):  # fail before touching any file on disk
        _geometry(H, W, num_frames, object_size, speed, direction, wrap)
    clips = out / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").unlink(missing_ok=True)  # written last: its presence marks complete data
    for old in clips.glob("*.mp4"):  # a previous run with other options must not leave strays
        if re.fullmatch(r"\d+", old.stem):
            old.unlink()

    digits = max(5, len(str(num - 1)))
    rows = []
    for i, (color, shape, direction) in enumerate(_combination_order(num, seed, colors)):
        frames = render_clip(
            color, shape, direction, size=size, width=width, num_frames=num_frames,
            object_size=object_size, speed=speed, rng=np.random.default_rng([seed, 1, i]), wrap=wrap,
        )  # fmt: skip
        name = f"clips/{i:0{digits}d}.mp4"
        # Lossless: yuv420p cost these saturated 32x32 clips 29-31 dB, a ceiling the VAE could never pass.
        write_video(frames, out / name, fps=fps, lossless=True)
        rows.append((name, caption(color, shape, direction)))

    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    with open(out / "heldout.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["color", "shape", "direction", "caption"])
        writer.writerows((*c, caption(*c)) for c in HELDOUT)
    (out / "shapes.json").write_text(json.dumps(options, indent=2) + "\n")
    return out / "manifest.csv"
