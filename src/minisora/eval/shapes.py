"""Shapes evaluator: does a generated clip show the prompt's colour moving in the prompt's direction?

Colour: a brightness-weighted vote of the foreground pixels for their nearest palette colour.
Direction: the displacement of the foreground centroid between the first and the last frames.
Ground-truth clips score 1.0 on both, also after an H.264 round trip (tests/test_eval_shapes.py).
Clips of a wrapping world (make_shapes(wrap=True)) are scored with `wrap=True`: centroids are circular means on
the torus and the motion is the sum of frame-to-frame steps taken the short way round; without it (the default)
the computation is the linear one, so the verdicts on ordinary clips cannot change.
ShapesEval scores a model during and after training; configs/shapes.yaml switches it on (section shapes_eval).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import lightning as L
import numpy as np
import torch

from minisora.data.shapes import COLORS, HELDOUT, caption, parse_caption, torus_offset
from minisora.io import read_clip, to_uint8_frames

PALETTE_NAMES = list(COLORS)
# Palette as chromaticity: each colour divided by its brightest channel (all are already 0 or 1).
_PALETTE = np.array([COLORS[n] for n in PALETTE_NAMES], dtype=np.float32) / 255.0  # (7, 3)

# A pixel is foreground when its brightest channel exceeds this. Measured on shapes clips written at
# crf 17 and read back: black away from the shape stays <= 20, while 4:2:0 chroma bleed next to a
# blue/red edge reaches ~140; those bleed pixels carry the shape's own hue and hug it symmetrically,
# so they neither change the colour vote nor move the centroid.
FOREGROUND_THRESHOLD = 64
MIN_AREA = 0.005  # foreground fraction of a frame below which the frame counts as empty (~5 px at 32x32)
MIN_TRAVEL = 0.1  # centroid displacement, as a fraction of the shorter side, below which a clip is static
MIN_TRAVEL_PX = 1.5


@dataclass(frozen=True)
class ClipResult:
    prompt: str
    color: str  # asked for
    direction: str
    pred_color: str  # "none" when the clip has no foreground
    pred_direction: str  # "none" when blank or the centroid moved less than the minimum
    displacement: tuple[float, float]  # centroid (dx, dy) in px, x right, y down
    foreground: float  # mean fraction of pixels that are foreground

    @property
    def color_ok(self) -> bool:
        return self.pred_color == self.color

    @property
    def direction_ok(self) -> bool:
        return self.pred_direction == self.direction

    @property
    def correct(self) -> bool:
        return self.color_ok and self.direction_ok


def _brightness(frames: np.ndarray) -> np.ndarray:
    """Brightest channel per pixel, (T, H, W) float; luma would make pure blue look nearly black."""
    return frames.max(axis=-1).astype(np.float32)


def classify_color(frames: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> str:
    """Nearest palette colour of the foreground of uint8 (T, H, W, 3) frames; 'none' if there is none.

    Each foreground pixel votes for the palette colour nearest to its chromaticity (the pixel divided by
    its brightest channel, so anti-aliased edges vote like the interior), weighted by its brightness so
    dim noise and edge pixels count little. A vote rather than the nearest colour of the mean: the mean
    of a red and a green blob is yellow, a colour that is not in the clip, and a few stray pixels shift
    a mean but not a majority. The ambiguous pairs differ in one channel (yellow/white and red/magenta
    in blue, cyan/white in red, ...), so a washed-out (200, 80, 80) still reads red: it is 0.57 from
    red and 0.72 from magenta or yellow in chromaticity.
    """
    bright = _brightness(frames)
    fg = bright > threshold
    if not fg.any():
        return "none"
    pixels = frames[fg].astype(np.float32)  # (N, 3)
    weight = bright[fg]  # (N,)
    chroma = pixels / weight[:, None]  # (N, 3) in [0, 1], max channel 1
    dist = ((chroma[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)  # (N, 7)
    votes = np.bincount(dist.argmin(1), weights=weight, minlength=len(PALETTE_NAMES))
    return PALETTE_NAMES[int(votes.argmax())]


def _circular_mean(mass: np.ndarray, pos: np.ndarray, extent: int) -> np.ndarray:
    """Mass-weighted mean position on a circle of `extent` px, in [0, extent): the angle of the mean of
    exp(2 pi i x / extent). mass (T, N) over positions pos (N,) -> (T,).

    Moves exactly with a shape that moves (a translation turns every term by the same angle), whichever edge it
    straddles; a linear mean of a shape split over two edges lands in the empty middle of the frame.
    """
    z = (mass * np.exp(2j * np.pi * pos / extent)).sum(axis=1)  # (T,)
    return (np.angle(z) * extent / (2 * np.pi)) % extent


def centroids(
    frames: np.ndarray, threshold: float = FOREGROUND_THRESHOLD, min_area: float = MIN_AREA, wrap: bool = False
) -> np.ndarray:
    """Brightness-weighted foreground centroid (x, y) per frame, (T, 2); NaN for empty frames.

    wrap: the frame is a torus (make_shapes(wrap=True)), and the centroid is the circular mean per axis.
    """
    T, H, W, _ = frames.shape
    bright = _brightness(frames)
    weight = np.where(bright > threshold, bright, 0.0)  # (T, H, W)
    total = weight.sum(axis=(1, 2))  # (T,)
    area = (weight > 0).mean(axis=(1, 2))  # (T,)
    ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5  # pixel centres, as render_clip places shapes
    if wrap:
        cx, cy = _circular_mean(weight.sum(axis=1), xs, W), _circular_mean(weight.sum(axis=2), ys, H)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = (weight.sum(axis=1) * xs).sum(axis=1) / total
            cy = (weight.sum(axis=2) * ys).sum(axis=1) / total
    out = np.stack([cx, cy], axis=1)  # (T, 2)
    out[area < min_area] = np.nan
    return out


def unwrap_track(c: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centroids on a torus (T, 2) -> a continuous track: each step between consecutive non-empty frames taken
    the short way round (into [-W/2, W/2) and [-H/2, H/2)) and summed from the first. Empty frames stay NaN.

    Where no step reaches half the frame, as on a clip that never wraps, the track equals the linear centroids.
    """
    extent = np.array([width, height], dtype=np.float64)
    out = np.full(c.shape, np.nan)
    seen = np.flatnonzero(np.isfinite(c).all(axis=1))
    if len(seen):
        steps = torus_offset(np.diff(c[seen], axis=0), extent)  # (n - 1, 2)
        out[seen] = c[seen[0]] + np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return out


def classify_direction(
    frames: np.ndarray,
    threshold: float = FOREGROUND_THRESHOLD,
    min_area: float = MIN_AREA,
    min_displacement: float | None = None,
    wrap: bool = False,
) -> tuple[str, tuple[float, float]]:
    """Direction of the centroid's motion from the first to the last frames and the (dx, dy) moved.

    Averages the centroid over the first and the last ~T/8 frames (at least one) so that a single
    noisy frame does not decide; 'none' when either end is empty or the displacement is below
    `min_displacement` px (default: MIN_TRAVEL of the shorter side, at least MIN_TRAVEL_PX).
    wrap: the frame is a torus; the centroids are unwrapped into a track first (unwrap_track), so the
    displacement is the sum of the frame-to-frame steps, each the short way round.
    """
    T, H, W, _ = frames.shape
    if min_displacement is None:
        min_displacement = max(MIN_TRAVEL_PX, MIN_TRAVEL * min(H, W))
    k = max(1, round(T / 8))
    c = centroids(frames, threshold, min_area, wrap)
    if wrap:
        c = unwrap_track(c, H, W)
    start, end = c[:k], c[-k:]
    if T < 2 or np.isnan(start).all() or np.isnan(end).all():
        return "none", (0.0, 0.0)
    dx, dy = (np.nanmean(end, axis=0) - np.nanmean(start, axis=0)).tolist()
    if max(abs(dx), abs(dy)) < min_displacement:
        return "none", (dx, dy)
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), (dx, dy)
    return ("down" if dy > 0 else "up"), (dx, dy)


def evaluate_clip(
    clip: np.ndarray | torch.Tensor,
    prompt: str,
    *,
    threshold: float = FOREGROUND_THRESHOLD,
    min_area: float = MIN_AREA,
    min_displacement: float | None = None,
    wrap: bool = False,
) -> ClipResult:
    """Score one clip: uint8 (T, H, W, 3), or a float (3, T, H, W) tensor in [-1, 1], against its prompt.

    wrap: the clip shows a wrapping world (make_shapes(wrap=True)); see classify_direction.
    """
    color, shape, direction = parse_caption(prompt)
    frames = to_uint8_frames(clip)
    bright = _brightness(frames)
    foreground = float((bright > threshold).mean())
    if foreground < min_area:  # blank, or a few stray pixels: no shape to judge
        pred_color, (pred_direction, disp) = "none", ("none", (0.0, 0.0))
    else:
        pred_color = classify_color(frames, threshold)
        pred_direction, disp = classify_direction(frames, threshold, min_area, min_displacement, wrap)
    return ClipResult(caption(color, shape, direction), color, direction, pred_color, pred_direction, disp, foreground)


@dataclass
class ShapesReport:
    results: list[ClipResult]

    @property
    def color_accuracy(self) -> float:
        return float(np.mean([r.color_ok for r in self.results])) if self.results else 0.0

    @property
    def direction_accuracy(self) -> float:
        return float(np.mean([r.direction_ok for r in self.results])) if self.results else 0.0

    @property
    def accuracy(self) -> float:
        """Fraction of clips right on both colour and direction."""
        return float(np.mean([r.correct for r in self.results])) if self.results else 0.0

    def per_prompt(self) -> dict[str, dict[str, float]]:
        """prompt -> {'n', 'color', 'direction', 'both'} accuracies, in first-seen order."""
        groups: dict[str, list[ClipResult]] = {}
        for r in self.results:
            groups.setdefault(r.prompt, []).append(r)
        return {p: ShapesReport(rs).metrics() | {"n": len(rs)} for p, rs in groups.items()}

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a logger: color, direction and both accuracies."""
        return {"color": self.color_accuracy, "direction": self.direction_accuracy, "both": self.accuracy}

    def split(self, heldout: bool) -> ShapesReport:
        """The results on held-out prompts (True) or on train prompts (False)."""
        held = {caption(*c) for c in HELDOUT}
        return ShapesReport([r for r in self.results if (r.prompt in held) == heldout])

    def format(self) -> str:
        """A small table: one row per prompt (held-out prompts marked *), then the totals."""
        held = {caption(*c) for c in HELDOUT}
        rows = [f"{'prompt':<34} {'n':>4} {'color':>6} {'dir':>6}  predicted (last clip)"]
        for prompt, m in self.per_prompt().items():
            last = next(r for r in reversed(self.results) if r.prompt == prompt)
            name = prompt + (" *" if prompt in held else "")
            rows.append(
                f"{name:<34} {m['n']:>4} {m['color']:>6.2f} {m['direction']:>6.2f}  "
                f"{last.pred_color} {last.pred_direction}"
            )
        for label, rep in (("train prompts", self.split(False)), ("held-out prompts *", self.split(True))):
            if rep.results and len(rep.results) < len(self.results):
                n, color, direction = len(rep.results), rep.color_accuracy, rep.direction_accuracy
                rows.append(f"{label:<34} {n:>4} {color:>6.2f} {direction:>6.2f}")
        rows.append(
            f"{'all':<34} {len(self.results):>4} {self.color_accuracy:>6.2f} {self.direction_accuracy:>6.2f}"
            f"  both {self.accuracy:.2f}"
        )
        return "\n".join(rows)

    __str__ = format


def evaluate(clips: Iterable[np.ndarray | torch.Tensor], prompts: Sequence[str], **kwargs) -> ShapesReport:
    """Score clips against their prompts; `clips` is a list or a batch (N, T, H, W, 3)."""
    clips = list(clips)
    if len(clips) != len(prompts):
        raise ValueError(f"evaluate: got {len(clips)} clips but {len(prompts)} prompts")
    return ShapesReport([evaluate_clip(c, p, **kwargs) for c, p in zip(clips, prompts)])


def evaluate_manifest(manifest: str | Path, **kwargs) -> ShapesReport:
    """Score the videos of a `path,caption` CSV (paths relative to it), e.g. a folder of samples."""
    manifest = Path(manifest)
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{manifest}: expected a CSV header with 'path' and 'caption', got {reader.fieldnames}")
        rows = list(reader)
    results = [evaluate_clip(read_clip(manifest.parent / r["path"]), r["caption"], **kwargs) for r in rows]
    return ShapesReport(results)


def score_pipeline(
    pipe, out: Path, *, samples_per_prompt: int, fps: float, seed: int = 0, wrap: bool = False, **kw
) -> dict:
    """Sample every shapes prompt (train and held-out), score them, write mp4s and eval.json; return metrics.

    wrap: score as a wrapping world (evaluate_clip); `kw` goes to the pipeline.
    """
    from minisora.data.shapes import heldout_prompts, train_prompts
    from minisora.files import slug
    from minisora.io import save_video

    prompts = [p for p in train_prompts() + heldout_prompts() for _ in range(samples_per_prompt)]
    seeds = [seed + i for i in range(len(prompts))]
    videos: list[np.ndarray] = []
    for i in range(0, len(prompts), 64):
        videos += pipe(prompts[i : i + 64], seed=seeds[i : i + 64], **kw)
    report = evaluate(videos, prompts, wrap=wrap)
    out.mkdir(parents=True, exist_ok=True)
    for j, (p, v) in enumerate(zip(prompts, videos)):
        if j % samples_per_prompt == 0:
            save_video(v, out / f"{slug(p)}.mp4", fps=fps)
    held, train = report.split(heldout=True), report.split(heldout=False)
    metrics = {
        "train/color_accuracy": train.color_accuracy,
        "train/direction_accuracy": train.direction_accuracy,
        "heldout/color_accuracy": held.color_accuracy,
        "heldout/direction_accuracy": held.direction_accuracy,
        "all/color_accuracy": report.color_accuracy,
        "all/direction_accuracy": report.direction_accuracy,
        "samples": len(prompts),
    }
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    (out / "eval.txt").write_text(report.format() + "\n")
    return metrics


class ShapesEval(L.Callback):
    """Every `every_n_steps` and at the end: sample every shapes prompt (training and held-out) `samples_per_prompt`
    times with the EMA weights and log the evaluator's colour and direction accuracies (TensorBoard: shapes/*).

    The final scores go to `<folder>/final/eval.json` and `summary`, which the run prints last. Sampling settings
    (steps, guidance, sampler, seed, fps) are the run's `sample` section's.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module | None,
        folder: str | Path,
        every_n_steps: int = 0,
        samples_per_prompt: int = 4,  # 8 held-out prompts alone would score in steps of 1/8
        steps: int = 25,
        guidance: float = 4.0,
        sampler: str = "euler",
        shift: float | None = None,  # the sampling grid's timestep shift; None: the training t_shift
        seed: int = 0,
        fps: float = 8,
        wrap: bool = False,  # the data wraps around the frame: the run passes its shapes.wrap
    ):
        if samples_per_prompt < 1:
            raise ValueError(f"shapes_eval.samples_per_prompt must be >= 1, got {samples_per_prompt}")
        self.vae, self.text_encoder, self.folder = vae, text_encoder, Path(folder)
        self.every_n_steps, self.samples_per_prompt = every_n_steps, samples_per_prompt
        self.kw = dict(steps=steps, guidance=guidance, sampler=sampler, shift=shift)
        self.seed, self.fps, self.wrap = seed, fps, wrap
        self.metrics: dict | None = None
        self.summary: str | None = None  # one line for the end of the run

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        model = pl_module.full_ema()  # every rank: under FSDP this gathers the EMA's shards to rank 0
        if not trainer.is_global_zero:
            return
        from minisora.training.preview import log_scores, training_pipeline

        pipe = training_pipeline(trainer, pl_module, model, self.vae, self.text_encoder, self.fps)
        step = trainer.global_step
        where = self.folder / "final" if final else self.folder / f"step-{step:06d}" / "shapes"
        m = score_pipeline(pipe, where, samples_per_prompt=self.samples_per_prompt, fps=self.fps, seed=self.seed,
                           wrap=self.wrap, **self.kw)  # fmt: skip
        self.metrics = m
        pl_module.print(
            f"step {step}: shapes colour accuracy {m['train/color_accuracy']:.2f} train / "
            f"{m['heldout/color_accuracy']:.2f} held-out, direction "
            f"{m['train/direction_accuracy']:.2f} / {m['heldout/direction_accuracy']:.2f}"
        )
        log_scores(trainer, self.folder, {f"shapes/{k}": v for k, v in m.items()})
        if final:
            self.summary = (
                f"shapes score ({where / 'eval.txt'}): colour accuracy {m['train/color_accuracy']:.2f} on training "
                f"prompts, {m['heldout/color_accuracy']:.2f} held-out; direction accuracy "
                f"{m['train/direction_accuracy']:.2f} / {m['heldout/direction_accuracy']:.2f}"
            )
        self.vae.cpu()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from minisora.training.preview import due

        if due(trainer, self.every_n_steps):
            self._score(trainer, pl_module, final=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module, final=True)
