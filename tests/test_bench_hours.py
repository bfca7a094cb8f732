"""bench hours: GPU-hours of a recipe from FLOPs (the README's UCF-101 estimate)."""

from __future__ import annotations

import pytest

from minisora.bench.flops import dit_train_step_flops, gpu_peak_flops
from minisora.bench.hours import hours, main, stage_flops
from minisora.checkpoint import dit_args
from minisora.config import load_config, to_plain
from minisora.models.dit import VideoDiT
from tiny_run import ROOT


def test_stage_flops_add_up_and_follow_the_recipe():
    cfg = load_config(ROOT / "configs/shapes.yaml", ["trainer.max_steps=10", "vae_trainer.max_steps=5"])
    stages, per_clip = stage_flops(cfg, videos=100, eval_samples=8)
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"))
    dit = VideoDiT(**dit_args(to_plain(cfg), cfg.vae.latent_channels, None))
    step = dit_train_step_flops(dit, 5, 8, 8, batch=cfg.latents.batch_size, include_recompute=False)
    assert stages["DiT training"] == 10 * step  # 17x32x32 clips -> 5x8x8 latents
    assert stages["latent cache"] == pytest.approx(100 * per_clip["vae_encode"] * 1e9)
    assert stages["VAE training"] == pytest.approx(cfg.data.batch_size * 5 * 3 * (per_clip["vae_encode"] + per_clip["vae_decode"]) * 1e9)
    assert hours(3.6e15, "RTX 4090", 0.5) == pytest.approx(3.6e15 / (gpu_peak_flops("NVIDIA GeForce RTX 4090") * 0.5) / 3600)


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["--config", str(ROOT / "configs/shapes.yaml"), "trainer.max_steps=10", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| total |" in text and "not measured" in text and out.is_file()
