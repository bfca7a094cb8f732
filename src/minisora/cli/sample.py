"""`minisora sample`, `export` and `merge-lora`: checkpoints to mp4 files and to shareable folders.

    minisora sample                                   # after `make train`: default prompts from runs/shapes
    minisora sample --ckpt runs/shapes --prompt "a red circle moving left" --steps 30 --guidance 4 --seed 1 --gif
    minisora sample --image first.png --prompt "a blue square moving up"       # image-to-video
    minisora sample --video clip.mp4 --keep-frames 5 --prompt "..."             # continue a clip in one window
    minisora sample --video clip.mp4 --extend-to 49 --prompt "..."              # continue it window after window
    minisora export --ckpt runs/shapes --out exported/shapes --dtype bf16
    minisora merge-lora --ckpt runs/shapes --lora runs/lora/lora/adapter.safetensors --out exported/merged

Every argument is checked before the model is loaded, and the output folder before any sampling starts.
Files are named after their prompts and never overwrite an existing file unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from minisora.cli.common import add_renamed_flag, user_errors
from minisora.files import slug

DEFAULT_CKPT = "runs/shapes"  # the run `make train` writes
DEFAULT_OUT = "samples"
# Used when the checkpoint's config lists no sample prompts; shapes-style, since that is the default run.
DEFAULT_PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]


class SampleError(ValueError):
    """A bad command-line value for sample/export; the message names the option and what is valid."""


def output_paths(out: Path, prompts: list[str], suffix: str = ".mp4", overwrite: bool = False) -> list[Path]:
    """One file per prompt named after it; `-2`, `-3`, ... where a name is taken (on disk or earlier in the list)."""
    taken: set[Path] = set()
    paths = []
    for p in prompts:
        base, n = slug(p), 1
        path = out / f"{base}{suffix}"
        while path in taken or (not overwrite and (path.exists() or path.with_suffix(".gif").exists())):
            n += 1
            path = out / f"{base}-{n}{suffix}"
        taken.add(path)
        paths.append(path)
    return paths


def check_writable(folder: Path) -> None:
    """Create `folder` and write a probe file in it, or raise SampleError saying why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SampleError(f"--out {folder}: cannot write there ({e.strerror or e})") from None


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values, then the non-empty, non-# lines of --prompts-file."""
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise SampleError(f"--prompts-file {path}: file not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise SampleError(f"--prompts-file {path}: not a UTF-8 text file (one prompt per line)") from None
        out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not out:
            raise SampleError(f"--prompts-file {path}: no prompts in it (one per line; # starts a comment)")
    return out


def validate(args: argparse.Namespace) -> None:
    """Reject bad values with the option's name, before anything slow happens."""
    for name in ("steps", "batch_size", "frames", "height", "width", "keep_frames", "extend_to", "overlap"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise SampleError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.guidance is not None and args.guidance < 1:
        raise SampleError(f"--guidance must be >= 1 (1 = no guidance, 3-5 is typical), got {args.guidance}")
    if args.seed < 0:
        raise SampleError(f"--seed must be >= 0, got {args.seed}")
    if args.fps is not None and args.fps <= 0:
        raise SampleError(f"--fps must be > 0, got {args.fps}")
    if args.aspect and (args.height or args.width):
        raise SampleError("give --aspect (with --resolution) or --height/--width, not both")
    if args.resolution and not args.aspect:
        raise SampleError("--resolution needs --aspect (e.g. --aspect 16:9 --resolution 256px)")
    if args.image and args.video:
        raise SampleError("give --image (image-to-video) or --video (continuation), not both")
    if args.keep_frames is not None and not args.video:
        raise SampleError("--keep-frames needs --video (the clip whose first frames are kept)")
    if args.extend_to is not None and (not args.video or args.keep_frames is not None):
        raise SampleError("--extend-to needs --video (all its frames are kept and continued), without --keep-frames")
    if args.overlap is not None and args.extend_to is None:
        raise SampleError("--overlap needs --extend-to (the latent frames of context each window gets)")
    for name in ("image", "video"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            raise SampleError(f"--{name} {path}: file not found")
    if getattr(args, "strip", None) and Path(args.strip).suffix.lower() != ".png":
        raise SampleError(f"--strip {args.strip}: the strip is a PNG image; give a path ending in .png")


def aspect_size(pipe, aspect: str, resolution: str | None, frames: int) -> tuple[int, int]:
    """(H, W) at width:height `aspect` with the pixel area of `resolution` ("256px", "360p").

    Without a resolution: the largest of the run's bucket resolutions that has `frames` frames, or the area of
    the run's training clips. Sizes are rounded as buckets round them (data/buckets.py).
    """
    from minisora.data.buckets import Geometry, parse_aspect, parse_resolution

    if resolution is None:
        buckets = (pipe.config or {}).get("buckets") or {}
        keys = [k for k, frame_list in (buckets.get("resolutions") or {}).items() if frames in frame_list]
        resolution = max(keys, key=parse_resolution) if keys else None
    area = parse_resolution(resolution) if resolution else pipe.defaults["height"] * pipe.defaults["width"]
    geometry = Geometry.of(pipe.vae, pipe.model.patch_size)
    return geometry.frame_size(area, parse_aspect(aspect))


def trained_size_note(pipe, T: int, H: int, W: int) -> str | None:
    """A note when a run trained on buckets is sampled at a size none of its buckets has (it may still work)."""
    from minisora.data.buckets import BucketSpec, Geometry

    buckets = (pipe.config or {}).get("buckets")
    if not buckets:
        return None
    geometry = Geometry.of(pipe.vae, pipe.model.patch_size)
    sizes = [b.name for b in BucketSpec(**buckets).build(geometry)]
    if f"{T}x{H}x{W}" in sizes:
        return None
    return f"{T}x{H}x{W} is not one of the run's bucket sizes ({', '.join(sizes)}); quality may drop outside them"


def run_sample(args: argparse.Namespace) -> list[Path]:
    """The sample command: check everything, load the pipeline, sample in batches, write one file per prompt."""
    from minisora.checkpoint import best_checkpoint
    from minisora.device import default_device, default_dtype
    from minisora.io import save_video, write_strips
    from minisora.pipeline import TextToVideoPipeline

    validate(args)
    prompts = read_prompts(args.prompt, args.prompts_file)
    out = Path(args.out)
    check_writable(out)
    ckpt = args.ckpt or DEFAULT_CKPT
    if args.ckpt is None and not Path(ckpt).exists():
        raise SampleError(f"no run at {ckpt} (the default of `make train`); train one first or pass --ckpt")
    if args.best:
        ckpt = best_checkpoint(ckpt)
    device = args.device or default_device()
    t0 = time.time()
    pipe = TextToVideoPipeline.from_pretrained(ckpt, device=device, dtype=args.dtype or default_dtype(device),
                                               ema=not args.raw_weights, offload=args.offload,
                                               lora=args.lora, lora_scale=args.lora_scale)  # fmt: skip
    sample_cfg = pipe.config.get("sample", {})
    prompts = prompts or list(sample_cfg.get("prompts") or DEFAULT_PROMPTS)
    steps = args.steps or sample_cfg.get("steps", 25)
    sampler = args.sampler or sample_cfg.get("sampler", "euler")
    guidance = args.guidance if args.guidance is not None else sample_cfg.get("guidance", 4.0)
    fps = args.fps or pipe.fps
    T = args.frames or pipe.defaults["num_frames"]
    H, W = args.height or pipe.defaults["height"], args.width or pipe.defaults["width"]
    if args.aspect:
        H, W = aspect_size(pipe, args.aspect, args.resolution, T)
    T, H, W = pipe.valid_size(T, H, W)
    note = trained_size_note(pipe, T, H, W)
    if note:
        print(f"minisora sample: {note}", file=sys.stderr)
    seeds = f"{args.seed}..{args.seed + len(prompts) - 1}"
    print(f"minisora sample: {pipe.checkpoint} on {device} ({pipe.dtype}); {len(prompts)} video(s) of {T}x{H}x{W} "
          f"at {fps:g} fps, {steps} {sampler} steps, guidance {guidance:g}, seeds {seeds}", file=sys.stderr)  # fmt: skip
    videos = pipe(
        prompts, num_frames=T, height=H, width=W, steps=steps, guidance=guidance, sampler=sampler, seed=args.seed,
        batch_size=args.batch_size, image=args.image, video=args.video, keep_frames=args.keep_frames,
        batched_cfg=not args.no_cfg_batch, progress=True, condition=args.condition, extend_to=args.extend_to,
        **({} if args.overlap is None else {"overlap": args.overlap}), **({} if args.shift is None else {"shift": args.shift}),
    )  # fmt: skip
    paths = output_paths(out, prompts, overwrite=args.overwrite)  # named now: files written meanwhile count
    written = []
    for prompt, video, path in zip(prompts, videos, paths):
        written.append(save_video(video, path, fps=fps))
        if args.gif:
            written.append(save_video(video, path.with_suffix(".gif"), fps=fps))
    if args.strip:
        written.append(write_strips(videos, args.strip))
    print(f"minisora sample: {len(videos)} video(s) in {time.time() - t0:.1f} s", file=sys.stderr)
    for path in written:
        print(path)
    return written


def run_export(args: argparse.Namespace) -> Path:
    from minisora.checkpoint import best_checkpoint, export_checkpoint
    from minisora.device import DTYPES
    from minisora.released_pipeline import export_released_lora, is_released

    if is_released(args.ckpt):  # a released model's LoRA run: its adapter in the ecosystem's keys
        out = Path(args.out)
        if out.suffix != ".safetensors" and (out / "pytorch_lora_weights.safetensors").exists() and not args.overwrite:
            raise SampleError(f"{out}: already holds pytorch_lora_weights.safetensors; pass --overwrite to replace it")
        file = export_released_lora(args.ckpt, out, format=args.lora_format)
        print(file)
        return file
    if args.dtype not in DTYPES:
        raise SampleError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    folder = export_checkpoint(
        best_checkpoint(args.ckpt) if args.best else args.ckpt, args.out, ema=not args.raw_weights, dtype=args.dtype,
        overwrite=args.overwrite,
    )
    for name in ("config.yaml", "model.safetensors", "vae.safetensors"):
        print(folder / name)
    return folder


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None, help=f"run folder, .ckpt file or exported folder (default: {DEFAULT_CKPT})")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the run's sample prompts")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--frames", type=int, help="number of frames, 1 + 4k (default: the training clip length); 1 = an image")
    p.add_argument("--aspect", help="width:height, e.g. 16:9 or 9:16: the size of a bucket (instead of --height/--width)")
    p.add_argument("--resolution", help="with --aspect: pixel area, e.g. 256px (256x256) or 360p (640x360); "
                   "default: the run's largest bucket resolution with --frames")
    p.add_argument("--height", type=int, help="height in pixels (default: the training height)")
    p.add_argument("--width", type=int, help="width in pixels (default: the training width)")
    p.add_argument("--fps", type=float, help="frames per second of the written files (default: the run's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps, 25)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale >= 1 (default: the run's, 4)")
    add_renamed_flag(p, "--cfg", "--guidance")
    p.add_argument("--sampler", choices=["euler", "heun", "unipc", "default"],
                   help="ODE sampler (default: the run's sample.sampler); released models: euler or default (their "
                   "folder's scheduler)")  # fmt: skip
    p.add_argument("--shift", type=float, help="timestep shift of the sampling grid, > 1 spends more steps near noise "
                   "(default: the run's sample.shift, else its dit_train.t_shift)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first video; video i uses seed + i (default: 0)")
    p.add_argument("--batch-size", type=int, help="videos sampled at once (default: all)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--gif", action="store_true", help="also write an animated GIF next to each mp4")
    p.add_argument("--overwrite", action="store_true", help="replace files of the same name instead of numbering")
    p.add_argument("--strip", help="also write one PNG with a row of frames per video (e.g. samples.png)")
    p.add_argument("--image", help="image-to-video: an image to use as the first frame")
    p.add_argument("--video", help="continuation: a clip whose first --keep-frames frames are kept")
    p.add_argument("--keep-frames", type=int, help="frames of --video to keep, 1 + 4k (default: 5)")
    p.add_argument("--extend-to", type=int, help="with --video: continue the whole clip to this many frames, one "
                   "training-length window after another")  # fmt: skip
    p.add_argument("--overlap", type=int, help="with --extend-to: latent frames of context per window "
                   "(default: minisora.extend.DEFAULT_OVERLAP, 2)")  # fmt: skip
    p.add_argument("--condition", choices=["trained", "replace"], help="how --image/--video frames condition: "
                   "given clean as in training (trained), or held on their noise path (replace); default: trained "
                   "for a run trained with dit_train.p_image/p_extend, else replace")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], help="DiT weights dtype (default: bf16 on GPU, else fp32)"
    )
    p.add_argument("--offload", action="store_true", help="keep the text encoder and VAE on the CPU until used")
    p.add_argument("--no-cfg-batch", action="store_true", help="run cond and uncond as two calls (less memory)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw training weights instead of the EMA")
    p.add_argument("--best", action="store_true", help="the run's best.ckpt (lowest val/loss) instead of its newest")
    p.add_argument("--lora", help="a LoRA adapter (<LoRA run>/lora/adapter.safetensors) to apply to --ckpt")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default 1 = as trained)")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder, .ckpt file or exported folder")
    p.add_argument("--out", required=True, help="folder to write config.yaml, model.safetensors, vae.safetensors")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16 for model.safetensors")
    p.add_argument("--raw-weights", action="store_true", help="export the raw training weights instead of the EMA")
    p.add_argument("--best", action="store_true", help="export the run's best.ckpt (lowest val/loss), not its newest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.add_argument("--lora-format", choices=["comfyui", "diffusers"], default="comfyui",
                   help="a released model's LoRA run: write its adapter with original-Wan/ComfyUI keys (default) or "
                   "diffusers keys")  # fmt: skip


def run_merge_lora(args: argparse.Namespace) -> Path:
    """merge-lora: base + adapter -> an exported folder whose weights include the adapter (no peft needed to use it)."""
    from minisora.models.lora import read_adapter
    from minisora.pipeline import TextToVideoPipeline

    if any(k.startswith("text.") for k in read_adapter(args.lora)[0]):
        raise SampleError(
            f"{args.lora}: this adapter also changes the text encoder, which an exported folder does not store; "
            f"sample with --ckpt {args.ckpt} --lora {args.lora} instead"
        )
    out = Path(args.out)
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise SampleError(f"{out}: already holds an export (model.safetensors); pass --overwrite to replace it")
    pipe = TextToVideoPipeline.from_pretrained(args.ckpt, lora=args.lora, lora_scale=args.scale)
    folder = pipe.save_pretrained(out, dtype=args.dtype)
    for name in ("config.yaml", "model.safetensors", "vae.safetensors"):
        print(folder / name)
    return folder


def add_merge_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="the base: run folder, .ckpt file or exported folder")
    p.add_argument("--lora", required=True, help="the adapter (<LoRA run>/lora/adapter.safetensors)")
    p.add_argument("--scale", type=float, default=1.0, help="strength of the adapter (default 1 = as trained)")
    p.add_argument("--out", required=True, help="folder for config.yaml, model.safetensors, vae.safetensors")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")


def cmd_sample(args: argparse.Namespace) -> int:
    return user_errors("sample", run_sample, args)


def cmd_export(args: argparse.Namespace) -> int:
    return user_errors("export", run_export, args)


def cmd_merge_lora(args: argparse.Namespace) -> int:
    return user_errors("merge-lora", run_merge_lora, args)


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="sample videos from a checkpoint, run folder or exported folder")
    add_sample_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="export a checkpoint to safetensors + config.yaml (no Lightning, no pickle)")
    add_export_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base: an exported folder with merged weights")
    add_merge_lora_args(p)
    p.set_defaults(func=cmd_merge_lora)
