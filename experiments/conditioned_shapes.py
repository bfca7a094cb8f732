"""Image-to-video and videos longer than the training window on shapes: trained conditioning vs replacement.

    .venv/bin/python experiments/conditioned_shapes.py --ckpt runs/shapes                  # both modes, 49 and 97
    .venv/bin/python experiments/conditioned_shapes.py --ckpt runs/shapes --modes replace --lengths 49 --all-train

For every prompt (the 8 held-out ones and --train-prompts of the 76 training ones, or all) and each of --seeds
seeds, a real 17-frame shapes clip is rendered as the dataset renders them (a random start per seed), then:
1. long videos: the clip is extended to each of --lengths frames (minisora.extend: windows of the training
   length, each conditioned on the last --overlap latent frames of the video so far) and scored by
   eval/conditioned.py: direction in every generated window, colour in the last one, largest seam step
   against the median frame-to-frame step;
2. image-to-video: the clip's first frame animated with the prompt, scored on colour, direction and start
   position (first-frame centroid within 2 px of the image's);
3. text-to-video with the same prompts and seeds (colour, direction), the baseline both must keep.
Each is run in each of --modes: "trained" (known frames given clean, t = 0; needs a model trained with
dit_train.p_image / p_extend) and "replace" (known frames held on their noise path). Prints one table;
--json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "held-out")


def prompts(train_prompts: int | None) -> dict[str, list[str]]:
    """Held-out prompts, and every k-th training prompt (a spread over colours, shapes and directions)."""
    from minisora.data.shapes import heldout_prompts, train_prompts as all_train

    train = all_train()
    if train_prompts is not None and train_prompts < len(train):
        train = train[:: -(-len(train) // train_prompts)][:train_prompts]
    return {"train": train, "held-out": heldout_prompts()}


def real_clips(prompt_list: list[str], seeds: int, num_frames: int, size: int, wrap: bool = False) -> list[np.ndarray]:
    """One rendered clip per (prompt, seed), its random start drawn from the seed: uint8 (T, H, W, 3) each."""
    from minisora.data.shapes import parse_caption, render_clip

    return [render_clip(*parse_caption(p), size=size, num_frames=num_frames, rng=np.random.default_rng([s, i]),
                        wrap=wrap) for i, p in enumerate(prompt_list) for s in range(seeds)]  # fmt: skip


def rate(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def long_videos(pipe, items: list[str], clips: list[np.ndarray], length: int, mode: str, args) -> dict:
    from minisora.eval.conditioned import evaluate_long_video
    from minisora.extend import context_frames

    videos = []
    for i in range(0, len(items), args.batch):  # each prompt continues its own clip
        b = slice(i, i + args.batch)
        videos += pipe(items[b], video=clips[b], extend_to=length, seed=i, condition=mode, overlap=args.overlap,
                       **args.sampling)  # fmt: skip
    T = pipe.defaults["num_frames"]
    new = T - context_frames(args.overlap, pipe.vae.temporal_compression)
    results = [evaluate_long_video(v, p, start=len(c), new_per_window=new, wrap=args.wrap)
               for v, p, c in zip(videos, items, clips)]  # fmt: skip
    return {"n": len(results), "direction every window": rate(r.directions_ok for r in results),
            "windows with the direction": rate(d == r.direction for r in results for d in r.window_directions),
            "direction visible windows": rate(r.visible_directions_ok for r in results),
            "colour at the end": rate(r.color_ok for r in results), "no seam jump": rate(r.seams_ok for r in results),
            "median seam ratio": float(np.nanmedian([r.seam_ratio for r in results])),
            "shape visible in the last window": rate(r.visible[-1] for r in results)}  # fmt: skip


def image_to_video(pipe, items: list[str], clips: list[np.ndarray], mode: str, args) -> dict:
    from minisora.eval.conditioned import evaluate_image_to_video

    videos = []
    for i in range(0, len(items), args.batch):  # each prompt animates its own clip's first frame
        b = slice(i, i + args.batch)
        known = torch.cat([pipe.encode_frames(c[:1]) for c in clips[b]])  # (B, C, 1, h, w)
        latents = pipe.sample_latents(items[b], known=known, seed=i, condition=mode, **args.sampling)
        videos += pipe.decode(latents)
    results = [evaluate_image_to_video(v, c[0], p, wrap=args.wrap) for v, c, p in zip(videos, clips, items)]
    return {"n": len(results), "colour": rate(r.color_ok for r in results),
            "direction": rate(r.direction_ok for r in results), "start within 2 px": rate(r.start_ok for r in results)}


def text_to_video(pipe, items: list[str], args) -> dict:
    from minisora.eval.shapes import evaluate

    videos = []
    for i in range(0, len(items), args.batch):
        batch = items[i : i + args.batch]
        videos += pipe(batch, seed=list(range(i, i + len(batch))), **args.sampling)
    report = evaluate(videos, items, wrap=args.wrap)
    return {"n": len(items), "colour": report.color_accuracy, "direction": report.direction_accuracy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/shapes", help="run folder, .ckpt or export (default: runs/shapes)")
    p.add_argument("--modes", nargs="+", default=["trained", "replace"], choices=["trained", "replace"])
    p.add_argument("--lengths", nargs="+", type=int, default=[49, 97], help="frames of the long videos")
    p.add_argument("--seeds", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--train-prompts", type=int, default=16, help="training prompts scored (default 16 of 76)")
    p.add_argument("--all-train", action="store_true", help="score all 76 training prompts")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps, as make train samples)")
    p.add_argument("--sampler", choices=["euler", "heun", "unipc"], help="ODE sampler (default: the run's)")
    p.add_argument("--overlap", type=int, default=2, help="latent frames of context per window (default 2)")
    p.add_argument("--batch", type=int, default=64, help="videos per progress line")
    p.add_argument("--skip", nargs="*", default=[], choices=["long", "i2v", "t2v"], help="parts to leave out")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    from minisora.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_pretrained(args.ckpt)
    trained = pipe.condition == "trained"
    print(f"{pipe.checkpoint}: trained with conditioning frames: {trained} (its default mode: {pipe.condition})")
    T, size = pipe.defaults["num_frames"], pipe.defaults["height"]
    sample = pipe.config.get("sample", {})
    # The run's sampling settings (its grid shift is the pipeline's default), and its data's geometry: a run
    # trained on wrapping shapes (shapes.wrap) is given wrapping clips and scored on the torus.
    args.sampling = {"steps": args.steps or sample.get("steps", 25), "sampler": args.sampler or sample.get("sampler", "euler"),
                     "guidance": sample.get("guidance", 4.0)}  # fmt: skip
    args.wrap = bool((pipe.config.get("shapes") or {}).get("wrap", False))
    print(f"sampling: {args.sampling}, grid shift {pipe.shift or pipe.t_shift}; wrapping shapes: {args.wrap}")
    out: dict = {"ckpt": str(pipe.checkpoint), "trained_with_conditioning": trained, "wrap": args.wrap,
                 "sampling": args.sampling}  # fmt: skip
    for split, plist in prompts(None if args.all_train else args.train_prompts).items():
        items = [q for q in plist for _ in range(args.seeds)]
        clips = real_clips(plist, args.seeds, T, size, args.wrap)
        t0 = time.time()
        if "t2v" not in args.skip:
            out[f"t2v {split}"] = text_to_video(pipe, items, args)
            print(f"t2v {split}: {out[f't2v {split}']} ({time.time() - t0:.0f} s)", flush=True)
        for mode in args.modes:
            if "i2v" not in args.skip:
                out[f"i2v {mode} {split}"] = r = image_to_video(pipe, items, clips, mode, args)
                print(f"i2v {mode} {split}: {r} ({time.time() - t0:.0f} s)", flush=True)
            if "long" not in args.skip:
                for length in args.lengths:
                    out[f"long {length} {mode} {split}"] = r = long_videos(pipe, items, clips, length, mode, args)
                    print(f"long {length} {mode} {split}: {r} ({time.time() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
