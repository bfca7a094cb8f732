"""The experiments/ scripts at a size that runs in seconds: their mechanics, not their findings.

The findings come from the full runs, whose figures and commands are in docs/finetuning.md (LoRA on a colour
the base never saw) and docs/data.md (one model on four bucket sizes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_run import ROOT, build_tiny_run

from minisora.config import load_config
from minisora.models.lora import read_adapter
from minisora.pipeline import TextToVideoPipeline


def experiment(name: str):
    """Import experiments/<name>.py (a script, not part of the package) as a module."""
    path = ROOT / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory) / "runs" / "shapes"


def test_lora_experiment_trains_an_adapter_that_changes_the_held_out_colour(tiny_base, tmp_path, monkeypatch, capsys):
    """The full experiment (`.venv/bin/python experiments/lora_heldout_colour.py`, 2-core CPU, ~12 min) measured, on a
    2000-step base that never saw magenta, magenta colour accuracy 0.00 -> 0.88 after a 600-step LoRA on 96
    magenta clips, with the other colours 1.00 -> 0.81 (docs/finetuning.md). Here the tiny shared base (which
    did see magenta: the mechanics only) gets a 4-step LoRA and is scored on 14 of the 84 prompts; the adapter
    must change the magenta samples and both models must be scored on the held-out colour and the others."""
    from minisora.data import shapes

    few = [c for c in shapes.all_combinations() if c[1] == "circle" and c[2] in ("left", "right")]
    monkeypatch.setattr(shapes, "all_combinations", lambda: few)  # 7 colours x 2 directions
    lora = experiment("lora_heldout_colour")
    out = tmp_path / "lora"
    argv = ["--base", str(tiny_base), "--out", str(out), "--lora-clips", "8", "--lora-steps", "4", "--seeds", "1",
            "--steps", "2", "--json", str(tmp_path / "r.json"), "--lora-args", "dit_train.lr=1e-2",
            "dit_train.warmup_steps=0", "dit_train.ema_decay=0.5", "trainer.val_check_interval=4",
            "trainer.checkpoint_every=4"]  # fmt: skip
    assert lora.main(argv) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    for model in ("base", "lora"):  # 2 magenta prompts, 12 of the other six colours, one seed each
        assert r[model]["magenta"]["samples"] == 2 and r[model]["other colours"]["samples"] == 12
        assert all(0 <= r[model][k][m] <= 1 for k in ("magenta", "other colours") for m in ("color", "direction"))
    lora_clips = (out / "data-lora" / "manifest.csv").read_text().splitlines()[1:]
    assert len(lora_clips) == 8 and all("magenta" in row for row in lora_clips)
    adapter = out / "runs" / "lora" / "lora" / "adapter.safetensors"
    _, meta = read_adapter(adapter)
    assert meta["lora"]["targets"] == ["cross_attn", "pooled_text"] and meta["base_source"].startswith(str(tiny_base))
    prompt = "a magenta circle moving left"
    before = TextToVideoPipeline.from_pretrained(tiny_base)(prompt, steps=2, seed=0)
    after = TextToVideoPipeline.from_pretrained(tiny_base, lora=adapter)(prompt, steps=2, seed=0)
    assert np.abs(before.astype(float) - after.astype(float)).mean() > 0.5  # uint8 levels: the adapter took
    assert "base + LoRA on magenta" in capsys.readouterr().out


def test_lora_experiment_base_never_sees_the_held_out_colour(tmp_path):
    from minisora.training.run import ensure_data

    lora = experiment("lora_heldout_colour")
    args = argparse.Namespace(
        out=str(tmp_path), holdout="magenta", base_clips=40, base_steps=10, vae=None, base_args=[])
    cfg = load_config(ROOT / "configs/shapes.yaml", lora.base_overrides(args))
    assert "magenta" not in cfg.shapes.colors and len(cfg.shapes.colors) == 6 and cfg.trainer.max_steps == 10
    ensure_data(cfg)
    rows = Path(cfg.data.path).read_text().splitlines()[1:]
    assert len(rows) == 40 and not any("magenta" in row for row in rows)


def test_buckets_experiment_puts_each_size_in_its_own_bucket(tmp_path):
    """The full experiment (`.venv/bin/python experiments/buckets_four_sizes.py`, 38 min) trained one model on the four
    sizes and scored colour 1.00 in every bucket, direction 0.82-1.00 (docs/data.md). Here: its data and
    bucket set, without training: 2 clips of each size, each in the bucket of its own size."""
    from minisora.data.stats import data_stats
    from minisora.training.run import ensure_data

    buckets = experiment("buckets_four_sizes")
    args = argparse.Namespace(out=str(tmp_path), clips=8, train_steps=10, extra=[])
    cfg = load_config(ROOT / "configs/shapes.yaml", buckets.overrides(args))
    ensure_data(cfg)
    stats = data_stats(cfg)
    rows = {b["bucket"]: (b["clips"], b["tokens"]) for b in stats["buckets"]}
    assert rows == {"17x32x32": (2, 80), "17x24x40": (2, 75), "9x32x32": (2, 48), "9x24x40": (2, 45)}, rows
    assert stats["skipped"] == 0


def test_sampler_steps_experiment_scores_every_sampler_and_step_count(tiny_base, tmp_path, monkeypatch, capsys):
    """The full table (docs/benchmarks.md) scores the default run's 84 prompts x 4 seeds per row; here the tiny base,
    fewer prompts, one seed, 1 and 2 steps: each row is scored by the shapes evaluator and the verdict is printed."""
    from minisora.data import shapes

    few = [c for c in shapes.all_combinations() if c[1] == "circle" and c[2] in ("left", "right")]
    monkeypatch.setattr(shapes, "all_combinations", lambda: few)
    steps = experiment("sampler_steps")
    argv = ["--ckpt", str(tiny_base), "--samplers", "euler", "heun", "unipc", "--steps", "1", "2", "--seeds", "1",
            "--shifts", "1", "3", "--reference", "euler", "2", "1", "--json", str(tmp_path / "r.json"),
            "--out", str(tmp_path / "rows")]  # fmt: skip
    assert steps.main(argv) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    calls = [("euler", 1, 1), ("euler", 2, 2), ("heun", 1, 1), ("heun", 2, 3), ("unipc", 1, 1), ("unipc", 2, 2)]
    assert [(x["sampler"], x["steps"], x["model_calls"], x["shift"]) for x in r["rows"]] == [
        (*c, 1.0) for c in calls] + [(*c, 3.0) for c in calls]
    n = len(shapes.train_prompts()) + len(shapes.heldout_prompts())
    assert all(x["samples"] == n and all(0 <= x[k] <= 1 for k in steps.MEASURES) for x in r["rows"]), (n, r["rows"])
    assert (tmp_path / "rows" / "unipc-2-shift3" / "eval.json").is_file()
    assert r["best"] is not None and r["best"]["model_calls"] <= 2  # the reference itself qualifies
    assert "| unipc  |     2 |     3 |" in capsys.readouterr().out
    (tmp_path / "rows" / "euler-1-shift1" / "eval.json").unlink()  # a rerun reuses the saved rows, samples nothing
    assert steps.main(argv) == 0 and json.loads((tmp_path / "r.json").read_text())["rows"] == r["rows"]
    assert not (tmp_path / "rows" / "euler-1-shift1" / "eval.json").exists()


def test_sampler_steps_verdict_needs_every_measure_within_tolerance():
    steps = experiment("sampler_steps")
    m = steps.MEASURES

    def row(sampler, n, *acc):
        return {"sampler": sampler, "steps": n, "shift": 1.0, "model_calls": steps.model_calls(sampler, n),
                **dict(zip(m, acc))}

    rows = [row("euler", 25, 1.0, 0.98, 1.0, 0.95), row("heun", 4, 1.0, 0.99, 1.0, 0.99),
            row("unipc", 4, 1.0, 0.90, 1.0, 0.97), row("unipc", 8, 0.99, 0.97, 0.98, 0.93)]
    r = {"rows": rows, "reference": {"sampler": "euler", "steps": 25, "shift": 1.0}, "tolerance": 0.02}
    assert steps.best_setting(r)["sampler"] == "heun"  # 7 calls; unipc 4 misses train direction by 0.08
    r["rows"] = rows[:1] + rows[2:]
    assert (steps.best_setting(r)["sampler"], steps.best_setting(r)["steps"]) == ("unipc", 8)
    r["tolerance"] = 0.0
    assert steps.best_setting(r)["steps"] == 25


def test_sampler_steps_analytic_mode_needs_no_model(capsys):
    steps = experiment("sampler_steps")
    errors = steps.analytic_errors([8], ["euler", "unipc"])
    assert errors["unipc"][8] < 0.1 * errors["euler"][8]
    assert steps.main(["--analytic", "--steps", "4", "8", "--samplers", "euler", "heun"]) == 0
    assert "| heun | 0.2884 | 0.0638 |" in capsys.readouterr().out


def test_conditioned_shapes_experiment_scores_every_part_in_both_modes(tiny_base, tmp_path, monkeypatch):
    """experiments/conditioned_shapes.py (figures in docs/conditioning.md) on the tiny run: one training prompt and
    one held-out one, one seed, a 21-frame extension (one window) and 2 sampling steps; every part is scored
    in both modes, on as many samples as asked, with rates in [0, 1]."""
    from minisora.data import shapes

    monkeypatch.setattr(shapes, "heldout_prompts", lambda: [shapes.caption(*shapes.HELDOUT[0])])
    conditioned = experiment("conditioned_shapes")
    out = tmp_path / "r.json"
    argv = ["--ckpt", str(tiny_base), "--seeds", "1", "--train-prompts", "1", "--lengths", "21", "--steps", "2",
            "--json", str(out)]  # fmt: skip
    assert conditioned.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["trained_with_conditioning"] is True  # the tiny run trains with p_image / p_extend (tiny_run.py)
    for split, n in (("train", 1), ("held-out", 1)):
        assert r[f"t2v {split}"]["n"] == n
        for mode in ("trained", "replace"):
            i2v, long = r[f"i2v {mode} {split}"], r[f"long 21 {mode} {split}"]
            assert i2v["n"] == long["n"] == n
            assert all(0 <= i2v[k] <= 1 for k in ("colour", "direction", "start within 2 px"))
            assert all(0 <= long[k] <= 1 for k in ("direction every window", "colour at the end", "no seam jump"))
