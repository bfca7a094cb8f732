"""What `minisora plan` prints: the memory plan, the token budget table (--tokens), a recipe's GPU-hours (--hours).

The memory model itself is minisora.plan; its calibration is in docs/benchmarks.md ("Memory planner").
"""

from __future__ import annotations

import argparse
import json

from minisora.plan import CONFIGS, GIB, GLIBC_RSS_FACTOR, GPU_CONTEXT_GIB, GPU_SLACK, check_positive, plan, round_clip

SWITCH_NAMES = {  # switch: (name when on, name when off)
    "bf16": ("bf16", "fp32"),
    "adamw8bit": ("AdamW8bit", "AdamW"),
    "checkpointing": ("checkpointing", "no checkpointing"),
    "offload": ("offload", "no offload"),
    "vae_tiling": ("VAE tiling", "untiled VAE"),
    "cfg_two_calls": ("CFG as two calls", "CFG batched"),
}


HOW = {
    "training": "switches: trainer.precision=bf16-mixed, dit_train.optimizer=adamw8bit, model.grad_checkpointing=true",
    "sampling": "switches: minisora sample --dtype bf16, --offload, --no-cfg-batch; the VAE tiles by itself above "
    "its tile_size / chunk_frames (untiled: vae.decode(tiled=False))",
}


def describe(switches: dict[str, bool]) -> str:
    return ", ".join(SWITCH_NAMES[k][0 if on else 1] for k, on in switches.items())


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _task_text(res: dict, task: str, title: str, name: str) -> list[str]:
    info, budget = res[task], res["budget_gb"]
    rows = info["rows"]
    base = next(r for r in rows if not any(r["switches"].values()))
    chosen = info["cheapest"] or max(rows, key=lambda r: r["cost"])  # every switch on when nothing fits
    label = "cheapest that fits" if info["cheapest"] else "every switch (does not fit)"
    lines = [f"## {title}", "", f"| component, GiB live at the peak | no switches: {describe(base['switches'])} | "
             f"{label}: {describe(chosen['switches'])} |", "|---|---|---|"]  # fmt: skip
    names = [k for k in base["components"] if k != "total"]
    names += [k for k in chosen["components"] if k not in names and k != "total"]
    for k in names:
        a, b = base["components"].get(k, 0.0), chosen["components"].get(k, 0.0)
        if a or b:
            lines.append(f"| {k} | {_gib(a)} | {_gib(b)} |")
    lines.append(f"| **peak (live tensors)** | **{_gib(base['components']['total'])}** | "
                 f"**{_gib(chosen['components']['total'])}** |")  # fmt: skip
    lines.append(f"| needed on the device | {_gib(base['on_device'])} | {_gib(chosen['on_device'])} |")
    keys = list(base["switches"])
    header = " | ".join(SWITCH_NAMES[k][0] for k in keys)
    lines += ["", f"| {header} | peak GiB | on device GiB | fits {budget:g} GiB |", "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        marks = " | ".join("yes" if r["switches"][k] else "-" for k in keys)
        lines.append(f"| {marks} | {_gib(r['components']['total'])} | {_gib(r['on_device'])} | "
                     f"{'yes' if r['fits'] else 'no'} |")  # fmt: skip
    lines += ["", HOW[task]]
    if info["cheapest"]:
        on = [SWITCH_NAMES[k][0] for k, v in chosen["switches"].items() if v]
        lines.append(f"{name}: fits {budget:g} GiB with " + (", ".join(on) if on else "no switches")
                     + f" ({_gib(chosen['on_device'])} GiB on the device).")  # fmt: skip
    else:
        m, (_, H, W) = info["max_fit"], res["rounded"]
        fit = (f"at most {m['frames']} frames at {H}x{W} ({m['tokens']:,} tokens) fit" if m["latent_frames"]
               else f"not even 1 frame at {H}x{W} fits; at most {m['tokens']:,} tokens would")  # fmt: skip
        lines.append(f"{name}: does not fit {budget:g} GiB even with all switches "
                     f"({_gib(chosen['on_device'])} GiB): reduce frames/size/batch: {fit} (batch {res['batch']}).")
    return lines


def format_plan(res: dict) -> str:
    """The plan as text: set-up, component tables, every switch combination, the verdicts."""
    su, (F, H0, W0), (T, H, W) = res["setup"], res["clip"], res["rounded"]
    v = su["vae"]
    kt, s, (pt, ph, pw) = v["temporal_compression"], v["spatial_compression"], su["patch"]
    C, t, h, w = res["latent"]
    lines = [
        f"preset {res['preset']}: {su['params'] / 1e6:.1f} M parameters ({su['hidden']} wide, {su['depth']} blocks, "
        f"{su['heads']} heads); VAE {kt}x{s}x{s}, {C} channels ({su['vae_params'] / 1e6:.1f} M); text "
        f"{su['text_tokens']} x {su['text_dim']} (CLIP tower, {su['text_params'] / 1e6:.1f} M)",
        f"clip {F}x{H0}x{W0}" + ("" if (F, H0, W0) == (T, H, W) else f" rounded up to {T}x{H}x{W} (the VAE needs 1 + "
        f"{kt}k frames; height a multiple of {s} x patch {ph} = {s * ph}, width of {s} x {pw} = {s * pw})")
        + f"; latent {C}x{t}x{h}x{w} -> {'x'.join(map(str, res['grid']))} = {res['tokens']:,} tokens "
        f"(patch {pt}x{ph}x{pw}), batch {res['batch']}",
        (f"device cuda, budget {res['budget_gb']:g} GiB: live tensors + {GPU_SLACK:.0%} allocator slack + "
         f"{GPU_CONTEXT_GIB} GiB CUDA context (both assumed, not yet measured)") if res["device"] == "cuda" else
        (f"device cpu, budget {res['budget_gb']:g} GiB: live tensors x {GLIBC_RSS_FACTOR} (peak RSS with glibc's "
         "default malloc, calibrated on the CPU training figures in docs/benchmarks.md)"),
        "attention: SDPA is flash / memory-efficient on a GPU (and torch 2.14's CPU flash kernel): no N x N scores, "
        "memory grows linearly with tokens; a math-backend fallback would add heads x N^2 per block",
        "",
    ]  # fmt: skip
    title = "Training one step (latent cache: no VAE or text encoder on the device)"
    if su.get("lora_params"):
        title = (f"LoRA fine-tuning one step: {su['lora_params'] / 1e6:.2f} M adapter parameters trained, "
                 f"the base frozen (latent cache: no VAE or text encoder on the device)")  # fmt: skip
    lines += _task_text(res, "training", title, "Training")
    lines.append("")
    lines += _task_text(res, "sampling", "Sampling (classifier-free guidance, then VAE decode)", "Sampling")
    return "\n".join(lines)


# ---- token budget ------------------------------------------------------------------------------
# (name, temporal compression, spatial compression, DiT patch (t, h, w)); checked against the config files in
# tests/test_plan.py. Latte: a per-frame (image) 8x VAE, no temporal compression, 2x2 patches.
TOKEN_SETTINGS = (
    ("vae/standard.yaml 4x8x8, patch 1x2x2", 4, 8, (1, 2, 2)),
    ("vae/deep.yaml 8x32x32, patch 1x1x1", 8, 32, (1, 1, 1)),
    ("per-frame 8x VAE, patch 2 (Latte)", 1, 8, (1, 2, 2)),
)


def token_table(seconds: tuple[float, ...] = (2, 5, 10), fps: float = 24, height: int = 480,
                width: int = 854) -> list[dict]:
    """DiT tokens and attention cost of each duration under each TOKEN_SETTINGS autoencoder.

    Full attention costs ~N^2 per layer; factorized (Latte: spatial and temporal layers alternating) costs
    N * (tokens per frame + latent frames) / 2 per layer on average. Both are relative to full attention with
    vae/standard.yaml at the same duration (the first setting).
    """
    rows = []
    for sec in seconds:
        ref = None
        for name, kt, s, (pt, ph, pw) in TOKEN_SETTINGS:
            T, H, W = round_clip(max(1, round(sec * fps)), height, width, kt, s, ph, pw)
            t = 1 + (T - 1) // kt if kt > 1 else T
            gt, gh, gw = -(-t // pt), H // (s * ph), W // (s * pw)
            n = gt * gh * gw
            full, factorized = float(n) ** 2, n * (gh * gw + gt) / 2
            ref = full if ref is None else ref
            rows.append({"seconds": sec, "setting": name, "frames": T, "height": H, "width": W,
                         "grid": [gt, gh, gw], "tokens": n, "full_attention": full / ref,
                         "factorized_attention": factorized / ref})  # fmt: skip
    return rows


def format_token_table(rows: list[dict], fps: float) -> str:
    def rel(x: float) -> str:
        return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"

    lines = ["| clip | autoencoder, DiT patch | frames x H x W | token grid | tokens | full attention | factorized |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['seconds']:g} s at {fps:g} fps | {r['setting']} | {r['frames']}x{r['height']}x{r['width']} | "
            f"{'x'.join(map(str, r['grid']))} | {r['tokens']:,} | {rel(r['full_attention'])} | "
            f"{rel(r['factorized_attention'])} |"
        )
    lines += ["", "Attention cost per layer relative to full attention with vae/standard.yaml at the same duration: "
              "full ~ N^2, factorized (spatial and temporal layers alternating) ~ N x (tokens per frame + latent "
              "frames) / 2. Frames rounded up to 1 + 4k / 1 + 8k, sides to multiples of VAE x patch."]  # fmt: skip
    return "\n".join(lines)


# ---- GPU-hours of a recipe ----------------------------------------------------------------------
HOURS_GPUS = ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090")
HOURS_MFUS = (0.2, 0.35, 0.5)  # ASSUMED until `make bench` measures MFU on a GPU


def hours_table(cfg, videos: int, eval_samples: int) -> dict:
    """EFLOP and hours per stage of the config's recipe at each assumed MFU (computed, not measured)."""
    from minisora.bench.flops import gpu_hours, recipe_flops

    stages, per_clip = recipe_flops(cfg, videos, eval_samples)
    first, second = HOURS_GPUS
    table = {name: {"eflop": f / 1e18, "hours": {first: [gpu_hours(f, first, m) for m in HOURS_MFUS],
                                                 second: [gpu_hours(f, second, 0.35)]}}
             for name, f in stages.items()}  # fmt: skip
    return {"per_clip_gflop": per_clip, "stages": table, "mfu_assumed": list(HOURS_MFUS)}


def format_hours(res: dict) -> str:
    first, second = (g.removeprefix("NVIDIA GeForce ") for g in HOURS_GPUS)
    mfus = " / ".join(f"{m:.0%}" for m in HOURS_MFUS)
    lines = ["per clip: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} GFLOP" for k, v in res["per_clip_gflop"].items()),
             f"| stage | EFLOP | {first} h at MFU {mfus} | {second} h at 35% |", "|---|---|---|---|"]  # fmt: skip
    for name, row in res["stages"].items():
        h1, (h2,) = row["hours"].values()
        lines.append(f"| {name} | {row['eflop']:.3f} | {' / '.join(f'{x:.1f}' for x in h1)} | {h2:.1f} |")
    lines.append("computed from FLOPs with an assumed MFU, not measured")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------
def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="B", help="DiT preset (configs/model/<preset>.yaml)")
    p.add_argument("--frames", type=int, default=48, help="clip frames (rounded up to 1 + kt*k for the VAE)")
    p.add_argument("--height", type=int, default=480, help="pixels (rounded up to a multiple of VAE x patch)")
    p.add_argument("--width", type=int, default=854, help="pixels (rounded up to a multiple of VAE x patch)")
    p.add_argument("--batch", type=int, default=1, help="clips per training step / videos per sampling call")
    p.add_argument("--budget-gb", type=float, default=24.0, help="device memory in GiB (a '24 GB' card has 24 GiB)")
    p.add_argument("--vae", help="config with the vae: section (default: configs/vae/standard.yaml)")
    p.add_argument("--text-tokens", type=int, default=77, help="text context length")
    p.add_argument("--text-dim", type=int, default=768, help="text encoder width (768: CLIP ViT-L/14)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (peak RSS with glibc's malloc)")
    p.add_argument("--lora-rank", type=int, help="plan a LoRA fine-tune of this rank (0: full training; default 0, "
                   "32 with --pretrained as in configs/finetune/released/lora.yaml)")
    p.add_argument("--pretrained", metavar="NAME_OR_FOLDER", help="plan a released model instead: a diffusers folder "
                   "(pretrained.path) or a preset (wan2.1-t2v-1.3b, wan2.2-ti2v-5b, ltx-video-2b)")
    p.add_argument("--released-table", action="store_true", help="print the released models' 24 GB table (markdown)")
    p.add_argument("--lora-targets", nargs="+", help="LoRA targets (default: self_attn cross_attn mlp)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--tokens", action="store_true", help="print the token budget table instead (markdown)")
    p.add_argument("--seconds", type=float, nargs="+", default=[2, 5, 10], help="durations for --tokens")
    p.add_argument("--fps", type=float, default=24, help="frame rate for --tokens")
    p.add_argument("--hours", action="store_true", help="print the GPU-hours of a recipe's stages instead (FLOPs)")
    p.add_argument("--config", help="--hours: the recipe (default: configs/experiments/ucf101.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="--hours: overrides of --config")
    p.add_argument("--videos", type=int, help="--hours: videos in the dataset (default: UCF-101's 13,320)")
    p.add_argument("--eval-samples", type=int, help="--hours: clips sampled for FVD (default 2048)")


def run_plan(args: argparse.Namespace) -> None:
    """The plan command: the plan, the token table or the hours, as text or JSON; bad input raises ValueError."""
    if sum(map(bool, (args.tokens, args.hours, args.released_table, args.pretrained))) > 1:
        raise ValueError("give one of --tokens, --hours, --released-table and --pretrained")
    hours_only = {"--config": args.config, "key=value": args.overrides, "--videos": args.videos,
                  "--eval-samples": args.eval_samples}  # fmt: skip
    if args.hours:
        from minisora.config import load_config

        videos = 13320 if args.videos is None else args.videos
        samples = 2048 if args.eval_samples is None else args.eval_samples
        check_positive("--videos", videos)
        check_positive("--eval-samples", samples)
        cfg = load_config(args.config or CONFIGS / "experiments" / "ucf101.yaml", args.overrides)
        res = hours_table(cfg, videos, samples)
        print(json.dumps(res, indent=1) if args.json else format_hours(res))
        return
    given = [k for k, v in hours_only.items() if v not in (None, [])]
    if given:
        raise ValueError(f"{', '.join(given)} go with --hours (the GPU-hours of a recipe)")
    if args.released_table or args.pretrained:
        from minisora import plan_released_report as RR

        ignored = [k for k, v in (("--lora-targets", args.lora_targets), ("--vae", args.vae)) if v]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not for a released model (its LoRA covers every attention and "
                             "MLP linear of the blocks; its VAE is the folder's or the preset's)")  # fmt: skip

        if args.released_table:
            rows = RR.released_table(args.budget_gb, RR.LORA_RANK if args.lora_rank is None else args.lora_rank)
            print(json.dumps(rows, indent=1) if args.json else RR.format_released_table(rows))
            return
        res = RR.plan_released(args.pretrained, args.frames, args.height, args.width, args.batch, args.budget_gb,
                               RR.LORA_RANK if args.lora_rank is None else args.lora_rank, args.device)  # fmt: skip
        print(json.dumps(res, indent=1) if args.json else RR.format_released_plan(res))
        return
    if args.tokens:
        for name, value in [("--fps", args.fps), ("--height", args.height), ("--width", args.width)] + [
            ("--seconds", s) for s in args.seconds
        ]:
            check_positive(name, value)
        rows = token_table(tuple(args.seconds), args.fps, args.height, args.width)
        print(json.dumps(rows, indent=1) if args.json else format_token_table(rows, args.fps))
        return
    res = plan(args.preset, args.frames, args.height, args.width, args.batch, args.budget_gb, args.vae,
               args.text_tokens, args.text_dim, args.device, lora_rank=args.lora_rank or 0,
               lora_targets=args.lora_targets)  # fmt: skip
    print(json.dumps(res, indent=1) if args.json else format_plan(res))


def cmd_plan(args: argparse.Namespace) -> int:
    from minisora.cli.common import user_errors

    return user_errors("plan", run_plan, args)


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="predict peak GPU memory of training and sampling; --tokens: token budget "
                       "table; --hours: GPU-hours of a recipe")
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)
