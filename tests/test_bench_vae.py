"""`minisora bench vae` (reconstruction quality, speed, released diffusers VAEs) and `minisora vae-stats` on a tiny
trained run. The released VAEs' per-clip path runs on tiny random configs of the same classes; the parameter
counts of the real-size configs are checked on the meta device (no memory, no download)."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import TINY_RUN, build_tiny_run

from minisora.bench import vae as bench
from minisora.bench.vae import clip_records
from minisora.bench.vae import main as bench_vae
from minisora.cli import main
from minisora.models.autoencoder import load_autoencoder

ROOT = Path(__file__).resolve().parents[1]
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="needs the optional diffusers: pip install -e .[diffusers]")  # fmt: skip
# Tiny instances of the wrapped classes (the compression of the real ones, a few thousand parameters).
TINY = {
    "wan": {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
            "latents_mean": [0.1, -0.2, 0.3, -0.4], "latents_std": [1.5, 2.5, 3.5, 4.5]},
    "sd": {"block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "norm_num_groups": 4,
           "latent_channels": 4, "sample_size": 32, "scaling_factor": 0.5},
}  # fmt: skip


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


def diffusers_count(kind: str, config: dict, part: str | None = None) -> int:
    import diffusers

    model = getattr(diffusers, {"wan": "AutoencoderKLWan", "sd": "AutoencoderKL"}[kind])(**config)
    return sum(p.numel() for p in (getattr(model, part) if part else model).parameters())


@needs_diffusers
@pytest.mark.parametrize("kind,latent", [("wan", [4, 3, 8, 8]), ("sd", [4, 9, 8, 8])])  # Wan 4x8x8 causal, SD per frame
def test_released_vae_speed_on_a_tiny_config(kind, latent, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.PRETRAINED, kind, TINY[kind])
    monkeypatch.setattr(bench, "point", lambda args, op, tiled, threads: bench.measure_point(args, op, tiled))
    out = tmp_path / "vae.json"
    assert bench_vae(["--pretrained", kind, "--speed", "--size", "9x64x64", "--repeats", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["vae"] == kind and r["latent"] == latent and r["size"] == [9, 64, 64]
    assert r["parameters"] == diffusers_count(kind, TINY[kind]) > 0
    assert r["encoder_parameters"] == diffusers_count(kind, TINY[kind], "encoder") > 0
    assert r["decoder_parameters"] == diffusers_count(kind, TINY[kind], "decoder") > 0
    assert r["weights_mib"]["bfloat16"] == pytest.approx(r["parameters"] * 2 / 2**20)
    rows = {(row["op"], row["tiled"]): row for row in r["speed"]}
    assert set(rows) == {("encode", None), ("decode", None)}  # diffusers' own tiling, as configured
    assert all(row["seconds"] > 0 and row["peak_mb"] >= 0 for row in rows.values())  # one process: reuse is possible
    assert "| decode | auto |" in capsys.readouterr().out


@needs_diffusers
def test_released_vae_configs_count_the_published_parameters_without_memory():
    """The released configs, built on the meta device; SD's is the published SD 1.x VAE count."""
    from argparse import Namespace

    expected = {"ltx": (419_193_649, 180_404_353, (128, 3, 8, 8)), "wan": (126_892_531, 53_595_872, (16, 5, 32, 32)),
                "sd": (83_653_863, 34_163_592, (4, 17, 32, 32))}  # fmt: skip
    for kind, (params, encoder, latent) in expected.items():
        vae = bench.build_vae(Namespace(vae=None, config=None, pretrained=kind), meta=True)
        facts = bench.facts(vae)
        assert (facts["parameters"], facts["encoder_parameters"], vae.latent_shape(17, 256, 256)) == (params, encoder,
                                                                                                      latent), kind
    assert diffusers_count("sd", bench.SD_CONFIG) == 83_653_863


@needs_diffusers
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-running an imported module
def test_a_size_the_released_vae_cannot_take_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `minisora bench` sets sys.argv for the benchmark it runs
    with pytest.raises(SystemExit) as e:  # through `minisora bench vae`, the real config on the meta device
        main(["bench", "vae", "--pretrained", "wan", "--speed", "--size", "10x256x256"])
    assert e.value.code == 2 and "expected T = 1 + 4k frames" in capsys.readouterr().err


def test_without_diffusers_a_released_vae_exits_2_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert bench_vae(["--pretrained", "sd", "--speed"]) == 2
    assert "pip install -e .[diffusers]" in capsys.readouterr().err


def test_quality_needs_trained_weights(capsys):
    with pytest.raises(SystemExit) as e:
        bench_vae(["--pretrained", "sd", "--shapes", "4"])
    assert e.value.code == 2 and "quality needs trained weights (--vae)" in capsys.readouterr().err
