"""The held-out colour LoRA benchmark runs end to end (mechanics only, at a size that learns nothing).

Whether LoRA teaches the colour is measured by `minisora bench lora` itself (README figures). At sizes that
train within a test's budget here the base learns its colours, but LoRA on magenta-only clips trades magenta
against forgetting the others (0.58 magenta with 0.93 others, up to 0.92 with 0.51), so this test checks
the pipeline, not the accuracy.
"""

from __future__ import annotations

import json

import pytest

from minisora.bench import lora as bench
from minisora.models.lora import read_adapter

TINY = ["--base-clips", "40", "--base-steps", "10", "--lora-clips", "8", "--lora-steps", "4", "--seeds", "1",
        "--steps", "2", "--base-args", "vae_trainer.max_steps=4", "model.hidden_size=32", "model.depth=1",
        "model.num_heads=2", "trainer.val_check_interval=10", "--lora-args", "trainer.val_check_interval=4"]  # fmt: skip


@pytest.mark.slow
def test_held_out_colour_benchmark_trains_a_magenta_free_base_then_a_magenta_lora(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--out", str(out), "--json", str(tmp_path / "r.json"), *TINY]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    for model in ("base", "lora"):
        assert r[model]["magenta"]["samples"] == 12 and r[model]["other colours"]["samples"] == 72
        assert all(0 <= r[model][k][m] <= 1 for k in ("magenta", "other colours") for m in ("color", "direction"))
    base_clips = (out / "data-base" / "manifest.csv").read_text()
    assert "magenta" not in base_clips and base_clips.count("\n") == 41  # the base never saw the colour
    lora_clips = (out / "data-lora" / "manifest.csv").read_text().splitlines()[1:]
    assert len(lora_clips) == 8 and all("magenta" in row for row in lora_clips)
    _, meta = read_adapter(out / "runs" / "lora" / "lora" / "adapter.safetensors")
    assert meta["lora"]["targets"] == ["cross_attn", "pooled_text"] and meta["base_source"].endswith("base")
    assert "base + LoRA on magenta" in capsys.readouterr().out
