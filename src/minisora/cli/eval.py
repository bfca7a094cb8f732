"""`minisora eval`: FVD and CLIP score of a model's samples, or of a folder of videos, against real clips.

    minisora eval --ckpt runs/ucf101 --real data/UCF-101 --i3d i3d_torchscript.pt --num 2048
    minisora eval --ckpt runs/t2v --i3d i3d_torchscript.pt --clip-model ViT-B-32 --clip-pretrained laion2b_s34b_b79k
    minisora eval --fake samples/ --real data/clips.csv --i3d i3d_torchscript.pt --num 512

Protocol (Latte's, from StyleGAN-V): N real and N generated clips of `--frames` 16 frames at `--size` 256 x 256.
Real clips are a seeded random choice of the --real records (by default the run's own data.path), one centred
window each, read every data.frame_stride-th frame as in training; generated clips take the prompts (class
labels for class-conditional runs) of the same records, seed --seed + i, and their first --frames frames. The
detector and the CLIP model are files the user supplies (fvd.I3D_URL); nothing is downloaded here, except
that an open_clip tag passed as --clip-pretrained is fetched by open_clip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

DEFAULT_NUM = 2048  # clips per set: StyleGAN-V's and Latte's "fvd2048_16f"
DEFAULT_FRAMES = 16
DEFAULT_SIZE = 256


class EvalError(ValueError):
    """A bad `minisora eval` option or input; the message names it and what is expected."""


def add_eval_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to evaluate (one of)")
    src.add_argument("--ckpt", help="sample from this run folder, .ckpt file or exported folder")
    src.add_argument("--fake", help="or: a folder (or manifest) of generated videos")
    p.add_argument("--real", help="real clips: manifest, caption folder or class folders (default: run's data.path)")
    p.add_argument("--real-format", default="auto", help="layout of --real: auto, manifest, captions, classes")
    p.add_argument("--i3d", help="FVD: StyleGAN-V's i3d_torchscript.pt (see docs/evaluation.md)")
    p.add_argument("--clip-model", help="CLIP score: an open_clip model name, e.g. ViT-B-32")
    p.add_argument("--clip-pretrained", help="CLIP score: open_clip tag (e.g. laion2b_s34b_b79k) or a local checkpoint")
    p.add_argument("--clip-tag", help="CLIP score: the tag a local --clip-pretrained file is (its preprocessing)")
    p.add_argument("--num", type=int, default=DEFAULT_NUM, help=f"clips per set (default {DEFAULT_NUM}, as papers)")
    p.add_argument("--num-real", type=int, help="real clips, if not --num")
    p.add_argument("--num-fake", type=int, help="generated clips, if not --num")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"frames per clip (default {DEFAULT_FRAMES})")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"clips are size x size (default {DEFAULT_SIZE})")
    p.add_argument("--real-stride", type=int, help="read every k-th real frame (default: data.frame_stride or 1)")
    p.add_argument("--fake-stride", type=int, default=1, help="read every k-th frame of --fake videos (default 1)")
    p.add_argument("--seed", type=int, default=0, help="picks the real clips; sample i has seed + i (default 0)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--guidance", type=float, help="guidance scale >= 1 (default: the run's sample.guidance)")
    from minisora.cli.common import add_renamed_flag

    add_renamed_flag(p, "--cfg", "--guidance")
    p.add_argument("--sampler", choices=["euler", "heun", "unipc"], help="ODE sampler (default: the run's sample.sampler)")
    p.add_argument("--shift", type=float, help="timestep shift of the sampling grid (default: the run's sample.shift, "
                   "else its dit_train.t_shift)")
    p.add_argument("--batch-size", type=int, default=8, help="videos sampled and scored at once (default 8)")
    p.add_argument("--workers", type=int, default=2, help="data-loader processes reading clips (default 2)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="DiT weights (default: bf16 on GPU, else fp32)")
    p.add_argument("--save-fake", help="also write the generated clips here (mp4 + .txt caption each)")
    p.add_argument("--out", default="eval.json", help="results as JSON (default: eval.json)")


def _validate(args: argparse.Namespace) -> tuple[int, int]:
    if (args.ckpt is None) == (args.fake is None):
        raise EvalError("give --ckpt (sample from a model) or --fake (a folder of generated videos), exactly one")
    if not args.i3d and not args.clip_model:
        raise EvalError("nothing to compute: give --i3d FILE for FVD and/or --clip-model NAME for CLIP score")
    if args.clip_model and not args.clip_pretrained:
        raise EvalError("--clip-model needs --clip-pretrained: an open_clip tag (e.g. laion2b_s34b_b79k for ViT-B-32) "
                        "or a local checkpoint file; a random CLIP scores nothing")  # fmt: skip
    if args.clip_pretrained and not args.clip_model:
        raise EvalError("--clip-pretrained needs --clip-model (the open_clip architecture, e.g. ViT-B-32)")
    num_real, num_fake = args.num_real or args.num, args.num_fake or args.num
    for name, v in (("num-real", num_real), ("num-fake", num_fake)):
        if v < 2:
            raise EvalError(f"--{name} must be >= 2 (a covariance needs two clips), got {v}")
    for name in ("frames", "size", "batch_size", "fake_stride", "real_stride", "steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.workers < 0:
        raise EvalError(f"--workers must be >= 0, got {args.workers}")
    if args.guidance is not None and args.guidance < 1:
        raise EvalError(f"--guidance must be >= 1, got {args.guidance}")
    if args.fake and not Path(args.fake).exists():
        raise EvalError(f"--fake {args.fake}: no such folder or manifest")
    return num_real, num_fake


# ---- clips ----------------------------------------------------------------------------------------


def _records(path: str, fmt: str, what: str) -> list:
    """ClipRecords of a manifest or folder; a folder of bare videos (no captions) gives empty captions."""
    import os

    from minisora.data.sources import ClipRecord, detect_format, is_media, load_records

    p = Path(path)
    if fmt == "auto" and p.is_dir() and detect_format(p) == "captions":
        media = sorted(m for m in p.rglob("*") if is_media(m) and m.is_file())
        media = [m for m in media if not (m.suffix == ".gif" and m.with_suffix(".mp4").is_file())]  # sample --gif
        if media and not any(m.with_suffix(".txt").is_file() for m in media):  # e.g. `minisora sample` output
            return [ClipRecord(os.path.abspath(m), "") for m in media]
    try:
        records, _ = load_records(path, fmt)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"{what}: {e}") from None
    return records


def _clip_stream(records: list, n: int, frames: int, size: int, stride: int, fps: float | None, batch_size: int,
                 workers: int, what: str, skipped: set[str]) -> Iterator[tuple[list, list]]:  # fmt: skip
    """Batches of (uint8 (T, H, W, 3) clips, records) for the first n records that read, each file once.

    Files that cannot give a clip (too short, broken) are added to `skipped`; ClipDataset stands another
    record in for them, which is used only if no earlier batch used it.
    """
    import warnings

    from torch.utils.data import DataLoader

    from minisora.data.clips import ClipDataset, SkippedClipWarning
    from minisora.io import to_uint8_frames

    dataset = ClipDataset(records, num_frames=frames, height=size, width=size, frame_stride=stride, fps=fps,
                          crop="center", train=False, short_policy="skip", source=what)  # fmt: skip
    by_path = {r.path: r for r in records}
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)
    used: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedClipWarning)  # counted and reported instead
        batches = iter(loader)
        while len(used) < n:
            try:
                items = next(batches)
            except StopIteration:
                break
            except RuntimeError as e:  # ClipDataset: not one record could give a clip
                if what not in str(e):
                    raise
                raise EvalError(f"{str(e).splitlines()[-1][:600]}; lower --frames or the stride") from None
            fresh = []
            for it in items:
                skipped.update(path for path, _ in it["skipped"])
                if it["path"] not in used and len(used) < n:
                    used.add(it["path"])
                    fresh.append(it)
            if fresh:
                yield [to_uint8_frames(it["video"]) for it in fresh], [by_path[it["path"]] for it in fresh]
    if len(used) < n:
        raise EvalError(f"{what}: only {len(used)} of {len(records)} files give a {frames}-frame clip at stride "
                        f"{stride} ({len(skipped)} could not), {n} needed; lower --num (or --num-real/--num-fake) "
                        f"or --frames")  # fmt: skip


def _write_fake(folder: Path, start: int, videos: list, captions: list[str], fps: float) -> None:
    from minisora.io import save_video

    for i, (video, caption) in enumerate(zip(videos, captions)):
        path = folder / f"{start + i:06d}.mp4"
        save_video(video, path, fps=fps)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


# ---- the command ----------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> dict:
    """The eval command: check options, load detector / CLIP / model, stream real then generated clips, report."""
    import torch

    from minisora.eval.fvd import I3DFeatures, fvd
    from minisora.device import default_device, default_dtype

    num_real, num_fake = _validate(args)
    t0 = time.time()
    device = args.device or default_device()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Models first: a wrong file fails in seconds, not after an hour of sampling.
    i3d = I3DFeatures(args.i3d, device=device) if args.i3d else None
    clip = None
    if args.clip_model:
        from minisora.eval.clip_score import CLIPScore

        clip = CLIPScore(args.clip_model, args.clip_pretrained, device=device, preprocess_tag=args.clip_tag)
    pipe = None
    if args.ckpt:
        from minisora.pipeline import TextToVideoPipeline

        pipe = TextToVideoPipeline.from_pretrained(args.ckpt, device=device, dtype=args.dtype or default_dtype(device))
    real = _real_source(args, pipe, needed=i3d is not None or pipe is not None)
    read_real = real["path"] is not None and (i3d is not None or clip is not None)
    order = _real_order(args, real, num_real if read_real else 0)
    fake_skipped: set[str] = set()
    # Every input is checked before any clip is read.
    if pipe is not None:
        batches = _sampled(pipe, *_prompts(pipe, order, num_fake), args)
    else:
        batches = _fake_clips(args, num_fake, clip, fake_skipped)
    result: dict = {"protocol": {
        "num_real": num_real if read_real else 0, "num_fake": num_fake, "frames": args.frames, "size": args.size,
        "real": real["path"], "real_stride": real["stride"], "real_fps": real["fps"], "seed": args.seed,
        "i3d": str(args.i3d) if args.i3d else None, "clip": clip.describe() if clip else None,
    }}  # fmt: skip
    real_feats, real_clip = _score_real(args, real, order, num_real, i3d, clip) if read_real else ([], [])
    fake_feats, fake_clip = _score_generated(args, batches, num_fake, i3d, clip, pipe.fps if pipe is not None else 8)
    result["protocol"].update(real_skipped=sorted(real["skipped"]), fake_skipped=sorted(fake_skipped))
    if i3d is not None:
        result["fvd"] = fvd(torch.cat(real_feats), torch.cat(fake_feats))
    if clip is not None:
        result["clip_score"] = {"generated": float(torch.cat(fake_clip).mean()),
                                "real": float(torch.cat(real_clip).mean()) if real_clip else None}  # fmt: skip
    if pipe is not None:
        result["sampling"] = {"checkpoint": str(pipe.checkpoint), "weights": pipe.weights, **_sampling(pipe, args)}
    result["seconds"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(_report(result))
    print(out)
    return result


def _real_source(args: argparse.Namespace, pipe, needed: bool) -> dict:
    """Where the real clips come from and how they are read: --real, or the run's own data settings."""
    data_cfg = pipe.config.get("data", {}) if pipe is not None else {}
    path = args.real or data_cfg.get("path")
    if path is None and needed:
        raise EvalError("--real is needed: the real clips FVD compares with (and whose captions prompt the model)")
    fps = data_cfg.get("fps") if args.real_stride is None else None
    stride = 1 if fps is not None else args.real_stride or data_cfg.get("frame_stride", 1)
    fmt = args.real_format if args.real else data_cfg.get("format", "auto")
    return {"path": path, "format": fmt, "stride": stride, "fps": fps, "skipped": set()}


def _real_order(args: argparse.Namespace, real: dict, num_real: int) -> list:
    """The real records in a seeded random order: the real clips, and the prompts of the generated ones."""
    import numpy as np

    if real["path"] is None:
        return []
    records = _records(real["path"], real["format"], f"--real {real['path']}")
    if len(records) < num_real:
        raise EvalError(f"--real {real['path']}: {len(records)} clips listed, {num_real} asked; lower --num or "
                        f"--num-real (FVD at another N is not comparable)")  # fmt: skip
    return [records[i] for i in np.random.default_rng(args.seed).permutation(len(records))]


def _fake_clips(args: argparse.Namespace, num_fake: int, clip, skipped: set[str]) -> Iterator[tuple[list, list]]:
    """Batches of (uint8 clips, captions) read from --fake, in a seeded random order; the records are checked now."""
    import numpy as np

    fakes = _records(args.fake, "auto", f"--fake {args.fake}")
    if len(fakes) < num_fake:
        raise EvalError(f"--fake {args.fake}: {len(fakes)} videos, {num_fake} asked; lower --num or --num-fake")
    if clip is not None and not all(r.caption for r in fakes):
        raise EvalError(f"--fake {args.fake}: CLIP score needs a caption per video: a .txt of the same name "
                        f"next to each (as --save-fake writes) or a manifest with captions")  # fmt: skip
    fakes = [fakes[i] for i in np.random.default_rng(args.seed).permutation(len(fakes))]
    stream = _clip_stream(fakes, num_fake, args.frames, args.size, args.fake_stride, None, args.batch_size,
                          args.workers, f"--fake {args.fake}", skipped)  # fmt: skip
    return ((videos, [r.caption for r in recs]) for videos, recs in stream)


def _score_real(args: argparse.Namespace, real: dict, order: list, n: int, i3d, clip) -> tuple[list, list]:
    """I3D features of the real clips, and their CLIP score with their own captions (the reference)."""
    from tqdm.auto import tqdm

    from minisora.eval.fvd import to_i3d_input

    feats, scores = [], []
    bar = tqdm(total=n, desc="real clips", unit="clip", file=sys.stderr)
    stream = _clip_stream(order, n, args.frames, args.size, real["stride"], real["fps"], args.batch_size,
                          args.workers, f"--real {real['path']}", real["skipped"])  # fmt: skip
    for videos, recs in stream:
        if i3d is not None:
            feats.append(i3d(to_i3d_input(videos, args.frames, args.size)))
        if clip is not None and all(r.caption for r in recs):
            scores.append(clip(videos, [r.caption for r in recs]))
        bar.update(len(videos))
    bar.close()
    return feats, scores


def _score_generated(args: argparse.Namespace, batches, n: int, i3d, clip, fps: float) -> tuple[list, list]:
    """I3D features and CLIP scores of the generated clips (sampled, or read from --fake); --save-fake keeps them."""
    from tqdm.auto import tqdm

    from minisora.eval.fvd import to_i3d_input

    save = Path(args.save_fake) if args.save_fake else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    feats, scores, done = [], [], 0
    bar = tqdm(total=n, desc="generated clips", unit="clip", file=sys.stderr)
    for videos, captions in batches:
        clips = to_i3d_input(videos, args.frames, args.size)  # (B, 3, T, S, S) uint8: what both metrics see
        frames = [c.permute(1, 2, 3, 0).numpy() for c in clips]  # (T, S, S, 3) each
        if i3d is not None:
            feats.append(i3d(clips))
        if clip is not None:
            scores.append(clip(frames, captions))
        if save is not None:
            _write_fake(save, done, frames, captions, fps)
        done += len(videos)
        bar.update(len(videos))
    bar.close()
    return feats, scores


def _sampling(pipe, args: argparse.Namespace) -> dict:
    """Steps, guidance, sampler and the sampled size, defaults from the run's sample section."""
    sample_cfg = pipe.config.get("sample", {})
    T = max(args.frames, pipe.defaults["num_frames"])
    T, H, W = pipe.valid_size(T, pipe.defaults["height"], pipe.defaults["width"])
    return {"steps": args.steps or sample_cfg.get("steps", 25),
            "guidance": args.guidance if args.guidance is not None else sample_cfg.get("guidance", 4.0),
            "sampler": args.sampler or sample_cfg.get("sampler", "euler"), "sampled_size": [T, H, W],
            "shift": args.shift}  # fmt: skip  (None: the run's grid)


def _prompts(pipe, order: list, n: int) -> tuple[list[str], list[str]]:
    """(model prompts, captions) of the n clips to sample: record i's caption, or its class label, cycling."""
    condition = pipe.model.condition
    if not order and condition != "none":
        raise EvalError("sampling needs prompts: give --real (its captions or class labels prompt the model)")
    recs = [order[i % len(order)] for i in range(n)] if order else [None] * n
    if condition == "class":
        bad = next((r for r in recs if r.label < 0), None)
        if bad is not None:
            raise EvalError(f"the model is class-conditioned but {bad.path} has no class label; give --real as "
                            f"class folders (or a manifest with a label column), labelled as in training")  # fmt: skip
        prompts = [str(r.label) for r in recs]
    else:
        prompts = [r.caption if r is not None else "" for r in recs]
    return prompts, [r.caption if r is not None else "" for r in recs]


def _sampled(pipe, prompts: list[str], captions: list[str], args: argparse.Namespace) -> Iterator[tuple[list, list]]:
    """Batches of (generated uint8 clips (T, H, W, 3), captions); clip i has seed --seed + i."""
    s = _sampling(pipe, args)
    T, H, W = s["sampled_size"]
    for i in range(0, len(prompts), args.batch_size):
        videos = pipe(prompts[i : i + args.batch_size], num_frames=T, height=H, width=W, steps=s["steps"],
                      guidance=s["guidance"], sampler=s["sampler"], shift=s["shift"], seed=args.seed + i)  # fmt: skip
        yield videos, captions[i : i + args.batch_size]


def _report(result: dict) -> str:
    p = result["protocol"]
    lines = []
    if "fvd" in result:
        stride = f"frame stride {p['real_stride']}" if p["real_stride"] != 1 else "consecutive frames"
        if p["real_fps"]:
            stride = f"at {p['real_fps']:g} fps"
        size = f"{p['frames']} frames at {p['size']}x{p['size']}"
        lines.append(f"FVD {result['fvd']:.2f}  ({p['num_real']} real clips from {p['real']}, {stride}; "
                     f"{p['num_fake']} generated; {size}; I3D {p['i3d']})")  # fmt: skip
        if min(p["num_real"], p["num_fake"]) < 400:
            lines.append("  note: fewer clips than the 400 I3D features: the covariances are singular and FVD is "
                         "biased upward; compare only at equal N (papers use 2048)")  # fmt: skip
    if "clip_score" in result:
        c = result["clip_score"]
        real = f", real clips {c['real']:.2f}" if c["real"] is not None else ""
        lines.append(f"CLIP score {c['generated']:.2f} generated{real}  ({p['clip']}; mean over frames of "
                     f"100 * max(cos, 0); {p['frames']} frames at {p['size']}x{p['size']})")  # fmt: skip
    if "sampling" in result:
        s = result["sampling"]
        T, H, W = s["sampled_size"]
        seeds = f"{p['seed']}..{p['seed'] + p['num_fake'] - 1}"
        lines.append(f"sampled {T}x{H}x{W} from {s['checkpoint']} ({s['weights']} weights), {s['steps']} "
                     f"{s['sampler']} steps, guidance {s['guidance']:g}, seeds {seeds}")  # fmt: skip
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from minisora.cli.common import user_errors

    return user_errors("eval", run_eval, args)


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="FVD and CLIP score of a model's samples (or a folder of videos) vs real clips")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)
