"""`minisora bench vae` (reconstruction quality and speed) and `minisora vae-stats` on a tiny trained run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_run import TINY_RUN, build_tiny_run

from minisora.bench.vae import clip_records
from minisora.bench.vae import main as bench_vae
from minisora.cli import main
from minisora.models.autoencoder import load_autoencoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return build_tiny_run(tmp_path_factory) / "runs" / "shapes" / "vae" / "vae.safetensors"


def test_quality_on_fresh_shapes_clips_and_speed_table(tiny_vae, tmp_path, capsys):
    out = tmp_path / "vae.json"
    bench_vae(["--vae", str(tiny_vae), "--shapes", "6", "--size", "5x16x16", "--speed", "--repeats", "1",
               "--json", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    q = results["quality"]
    assert q["clips"] == 6 and 0 < q["psnr_mean"] < 100 and -1 <= q["ssim_median"] <= 1
    assert results["latent"] == [load_autoencoder(tiny_vae).latent_channels, 2, 4, 4]
    assert results["compression"] == pytest.approx(3 * 5 * 16 * 16 / (results["latent"][0] * 2 * 4 * 4))
    rows = {(r["op"], r["tiled"]): r for r in results["speed"]}
    assert set(rows) == {("encode", False), ("decode", False), ("encode", True), ("decode", True)}
    assert all(r["frames_per_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert "| decode | True |" in capsys.readouterr().out


def test_real_video_clips_are_cut_at_spread_times(shared_videos):
    records = clip_records(str(shared_videos / "manifest.csv"), 4, 17)
    assert len(records) == 8  # two 20 s videos, four windows each
    starts = [r.start for r in records[:4]]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] > 19
    assert all(r.end - r.start == pytest.approx(17 / 30, rel=0.05) for r in records)


def test_vae_stats_command_rewrites_shift_and_scale(tiny_vae, tmp_path, monkeypatch):
    vae_file = tmp_path / "vae.safetensors"
    shutil.copy(tiny_vae, vae_file)
    monkeypatch.chdir(tiny_vae.parents[3])  # the tiny run's data/ lives there
    before = load_autoencoder(vae_file)
    before.set_latent_stats(torch.zeros_like(before.shift), torch.ones_like(before.scale))
    before.save_pretrained(vae_file)
    overrides = [o for o in TINY_RUN if o.startswith(("shapes.", "data.", "vae."))]
    args = ["vae-stats", "--config", str(ROOT / "configs/shapes.yaml"), "--vae", str(vae_file), "--batches", "2"]
    assert main(args + overrides) == 0
    after = load_autoencoder(vae_file)
    assert not torch.equal(after.scale, torch.ones_like(after.scale))
    with torch.no_grad():  # the new statistics normalise the data's latents
        from minisora.data.clips import ClipDataset

        clips = ClipDataset.from_path("data/shapes/manifest.csv", num_frames=17, height=32, width=32, train=False)
        z = after.encode(torch.stack([clips[i]["video"] for i in range(4)]))
    assert z.mean().abs() < 0.5 and 0.5 < z.std() < 2.0
