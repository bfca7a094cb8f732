"""The held-out colour LoRA benchmark: its mechanics at a size that learns nothing, then the real thing at tiny
scale (a base that never saw magenta learns it from LoRA on magenta clips alone, the other colours kept).

Smaller bases than the second test's (64 wide, 2 blocks) learned their colours but traded magenta against
forgetting the others under LoRA (0.58 magenta with 0.93 others, up to 0.92 with 0.51).
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lora_on_magenta_clips_only_teaches_a_base_that_never_saw_magenta(tmp_path, capsys):
    # The autoencoder is a generic part (it saw every colour, as a pretrained VAE would); the DiT base never
    # saw magenta. Base: the default 128-wide DiT, 600 steps on 300 magenta-free clips; LoRA: 200 steps at
    # LR 2e-3 on 48 magenta clips. About 3.5 min on 2 cores.
    from minisora.cli import main

    assert main(["train-vae", "--config", str(bench.ROOT / "configs/vae/shapes.yaml"), f"run_dir={tmp_path / 'vae'}",
                 f"data.path={tmp_path / 'vae-data' / 'manifest.csv'}", "shapes.num=300", "vae_trainer.max_steps=300",
                 "vae_trainer.enable_progress_bar=false"]) == 0  # fmt: skip
    vae = next((tmp_path / "vae").rglob("vae.safetensors"))
    args = ["--out", str(tmp_path / "bench"), "--vae", str(vae), "--base-clips", "300", "--base-steps", "600",
            "--lora-clips", "48", "--lora-steps", "200", "--seeds", "1", "--steps", "10",
            "--lora-args", "dit_train.lr=2e-3", "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert bench.main(args) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    base, tuned = r["base"], r["lora"]
    assert base["other colours"]["color"] >= 0.85  # the base learned the colours it saw...
    assert base["magenta"]["color"] <= 0.1  # ...and not the one it never saw
    assert tuned["magenta"]["color"] >= 0.75  # LoRA on magenta clips alone taught it
    margin = 0.1  # the stated margin for the colours the base already knew
    assert tuned["other colours"]["color"] >= base["other colours"]["color"] - margin, r
