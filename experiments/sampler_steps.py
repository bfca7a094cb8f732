"""How few sampling steps keep the shapes score? Colour and direction accuracy against steps, per sampler.

    nice .venv/bin/python experiments/sampler_steps.py --ckpt runs/shapes --threads 1 --json bench/samplers-cpu.json
    .venv/bin/python experiments/sampler_steps.py --ckpt runs/shapes --samplers unipc --steps 6 8 --seeds 2
    .venv/bin/python experiments/sampler_steps.py --analytic      # no model: the solvers' error on a known field

Every sampler (euler, heun, unipc) at every step count samples each shapes prompt (training and held-out)
`--seeds` times with the same seeds and the run's guidance, and the shapes evaluator scores them, exactly as
the end of `make train` does (eval.shapes.score_pipeline). Model calls per video: steps for Euler and UniPC,
2 * steps - 1 for Heun, twice that with guidance (cond and uncond in one batch). The verdict line names the
fewest-call setting within --tolerance of the reference (25 Euler steps) on both prompt sets and both
measures. With --out, each row's samples, scores and settings stay in <out>/<sampler>-<steps>/ and a rerun with
the same checkpoint, seeds and guidance reuses them (a long table can be built in pieces). Figures and what they
mean: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from minisora.bench.report import run_and_report

MEASURES = ("train/color_accuracy", "train/direction_accuracy", "heldout/color_accuracy", "heldout/direction_accuracy")


def model_calls(sampler: str, steps: int) -> int:
    """Network evaluations per video (before the doubling of guidance): Heun skips its corrector on the last step."""
    return 2 * steps - 1 if sampler == "heun" else steps


def analytic_errors(steps: list[int], samplers: list[str], mu: float = 2.0, s: float = 0.5) -> dict:
    """Largest endpoint error of each solver for data N(mu, s^2), whose flow ODE maps z to mu + s z exactly."""
    import torch

    from minisora import diffusion
    from minisora.pipeline import SAMPLERS

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # E[noise - x0 | x_t = x], exact
        t = t.reshape(-1, 1)
        a = 1 - t
        return (t - a * s**2) * (x - a * mu) / (a**2 * s**2 + t**2) - mu

    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {name: {n: (SAMPLERS[name](velocity, z.clone(), diffusion.timesteps(n).double()) - (mu + s * z)).abs().max().item()
                   for n in steps} for name in samplers}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    if args.analytic:
        return {"analytic": analytic_errors(args.steps, args.samplers)}
    import torch

    from minisora.pipeline import TextToVideoPipeline
    from minisora.eval.shapes import score_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = TextToVideoPipeline.from_pretrained(args.ckpt)
    guidance = args.guidance if args.guidance is not None else pipe.config.get("sample", {}).get("guidance", 4.0)
    if len(args.reference) not in (2, 3):
        raise SystemExit(f"--reference takes SAMPLER STEPS [SHIFT], got {' '.join(args.reference)}")
    run_shift = next((s for s in (pipe.shift, pipe.t_shift) if s is not None), None)
    if run_shift is None and None in args.shifts:
        raise SystemExit("the run sets neither sample.shift nor dit_train.t_shift: give --shifts")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        for sampler, steps, shift in [(a, n, s) for s in args.shifts for a in args.samplers for n in args.steps]:
            shift = run_shift if shift is None else shift
            folder = out / f"{sampler}-{steps}-shift{shift:g}"
            setting = {"checkpoint": str(pipe.checkpoint), "guidance": guidance, "seeds": args.seeds,
                       "seed": args.seed}  # fmt: skip
            saved = json.loads((folder / "row.json").read_text()) if (folder / "row.json").is_file() else {}
            if saved.get("setting") == setting:
                rows.append(saved["row"])
            else:
                t0 = time.time()
                m = score_pipeline(pipe, folder, samples_per_prompt=args.seeds, fps=pipe.fps, seed=args.seed,
                                   steps=steps, guidance=guidance, sampler=sampler, shift=shift)  # fmt: skip
                rows.append({"sampler": sampler, "steps": steps, "shift": shift,
                             "model_calls": model_calls(sampler, steps),
                             **{k: m[k] for k in MEASURES}, "samples": m["samples"],
                             "seconds": round(time.time() - t0, 1)})  # fmt: skip
                (folder / "row.json").write_text(json.dumps({"setting": setting, "row": rows[-1]}, indent=1))
            print(format_row(rows[-1]), flush=True)
    results = {"checkpoint": str(pipe.checkpoint), "guidance": guidance, "seeds": args.seeds, "rows": rows,
               "reference": {"sampler": args.reference[0], "steps": int(args.reference[1]),
                             "shift": run_shift if len(args.reference) < 3 else float(args.reference[2])},
               "tolerance": args.tolerance}  # fmt: skip
    results["best"] = best_setting(results)
    return results


def best_setting(r: dict) -> dict | None:
    """The fewest-model-call row within `tolerance` of the reference row on every measure (None: no reference row)."""
    ref = [x for x in r["rows"] if (x["sampler"], x["steps"], x["shift"]) == tuple(r["reference"].values())]
    if not ref:
        return None
    close = [x for x in r["rows"] if all(x[k] >= ref[0][k] - r["tolerance"] for k in MEASURES)]
    return min(close, key=lambda x: (x["model_calls"], x["steps"]), default=None)


def format_row(x: dict) -> str:
    return (f"| {x['sampler']:<6} | {x['steps']:>5} | {x['shift']:>5g} | {x['model_calls']:>11} | {x['train/color_accuracy']:.2f} | "
            f"{x['train/direction_accuracy']:.2f} | {x['heldout/color_accuracy']:.2f} | "
            f"{x['heldout/direction_accuracy']:.2f} | {x['seconds']:>7.1f} |")  # fmt: skip


def format_results(r: dict) -> str:
    if "analytic" in r:
        steps = list(next(iter(r["analytic"].values())))
        lines = ["| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{e:.4f}" for e in errors.values()) + " |"
                  for name, errors in r["analytic"].items()]  # fmt: skip
        return "\n".join(lines + ["(largest endpoint error over 20000 samples of N(2, 0.5^2); model calls per "
                                   "sample: steps, Heun 2 * steps - 1)"])  # fmt: skip
    lines = ["| sampler | steps | shift | model calls | train colour | train direction | held-out colour | "
             "held-out direction | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [format_row(x) for x in r["rows"]]
    n = r["rows"][0]["samples"] if r["rows"] else 0
    lines.append(f"({n} samples per row: {r['seeds']} seeds per prompt, guidance {r['guidance']:g}; {r['checkpoint']})")
    ref, best = r["reference"], r["best"]
    if not any((x["sampler"], x["steps"], x["shift"]) == tuple(ref.values()) for x in r["rows"]):
        lines.append(f"no verdict: the reference ({ref['steps']} {ref['sampler']} steps, shift {ref['shift']:g}) is not "
                     "among these rows")
    elif best is None:
        lines.append(f"no row is within {r['tolerance']} of {ref['steps']} {ref['sampler']} steps (shift {ref['shift']:g}) "
                     "on every measure")
    else:
        lines.append(f"fewest model calls within {r['tolerance']} of {ref['steps']} {ref['sampler']} steps on every "
                     f"measure: {best['steps']} {best['sampler']} steps at shift {best['shift']:g} ({best['model_calls']} calls)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments/sampler_steps.py", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/shapes", help="a trained shapes run, .ckpt or export (default runs/shapes)")
    p.add_argument("--samplers", nargs="+", default=["euler", "heun", "unipc"], choices=["euler", "heun", "unipc"])
    p.add_argument("--steps", nargs="+", type=int, default=[4, 8, 12, 25])
    p.add_argument("--seeds", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample (default 0)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the run's sample.guidance)")
    p.add_argument("--shifts", nargs="+", type=float, default=[None],
                   help="sampling-grid shifts to try (default: the run's sample.shift, else its dit_train.t_shift)")
    p.add_argument("--reference", nargs="+", default=["euler", "25"], metavar="SAMPLER STEPS [SHIFT]",
                   help="the row to match (default: 25 Euler steps on the run's grid)")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed accuracy drop from the reference")
    p.add_argument("--out", help="keep each row's mp4s and scores here; reruns reuse them (default: a temporary folder)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (1 ran 10x faster on a 2-core CPU shared with "
                   "other work)")
    p.add_argument("--analytic", action="store_true", help="no model: each solver's error on a Gaussian's exact field")
    p.add_argument("--json", help="write the results here")
    return run_and_report(p, run, format_results, argv)


if __name__ == "__main__":
    raise SystemExit(main())
