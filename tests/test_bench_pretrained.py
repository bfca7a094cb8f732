"""`minisora bench pretrained`: real-size diffusers autoencoders' parameters, weight memory, CPU time and peak memory.

The per-clip path (subprocesses, JSON, table) runs on tiny random configs of the same classes; the parameter
counts of the real-size configs are checked on the meta device (no memory, no download).
"""

from __future__ import annotations

import json
import sys

import pytest

diffusers = pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")

from minisora.bench import pretrained  # noqa: E402

# Tiny instances of the wrapped classes (the compression of the real ones, a few thousand parameters).
TINY = {
    "wan": {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
            "latents_mean": [0.1, -0.2, 0.3, -0.4], "latents_std": [1.5, 2.5, 3.5, 4.5]},
    "sd": {"block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "norm_num_groups": 4,
           "latent_channels": 4, "sample_size": 32, "scaling_factor": 0.5},
}  # fmt: skip
CLASSES = {"wan": "AutoencoderKLWan", "sd": "AutoencoderKL"}


def real_count(kind: str, config: dict, part: str | None = None) -> int:
    model = getattr(diffusers, CLASSES[kind])(**config)
    return sum(p.numel() for p in (getattr(model, part) if part else model).parameters())


def in_process(kind, op, frames, size, threads, config):
    return pretrained.measure(kind, op, frames, size, config)


def test_json_and_table_on_tiny_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "CONFIGS", TINY)
    monkeypatch.setattr(pretrained, "run_child", in_process)  # the subprocess itself: the next test
    out = tmp_path / "bench" / "pretrained.json"
    assert pretrained.main(["--kinds", "wan", "sd", "--frames", "9", "--size", "64", "--threads", "1",
                            "--json", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert r["clip"] == [3, 9, 64, 64] and r["threads"] == 1 and r["dtype"] == "float32"
    assert len(r["load_average_before"]) == len(r["load_average_after"]) == 3
    assert r["diffusers"] == diffusers.__version__
    assert list(r["models"]) == ["wan", "sd"]
    latents = {"wan": [4, 3, 8, 8], "sd": [4, 9, 8, 8]}  # Wan 4x8x8 causal, SD 1x8x8 per frame
    for kind, m in r["models"].items():
        assert m["class"] == CLASSES[kind] and m["latent"] == latents[kind]
        assert m["parameters"] == real_count(kind, TINY[kind]) > 0
        assert m["encoder_parameters"] == real_count(kind, TINY[kind], "encoder") > 0
        assert m["decoder_parameters"] == real_count(kind, TINY[kind], "decoder") > 0
        assert m["encoder_parameters"] + m["decoder_parameters"] <= m["parameters"]
        assert m["weights_mib"]["float32"] == pytest.approx(m["parameters"] * 4 / 2**20)
        assert m["weights_mib"]["bfloat16"] == pytest.approx(m["weights_mib"]["float32"] / 2)
        for op in ("encode", "decode"):  # in one process a later call may reuse freed memory: >= 0 here
            assert m[op]["seconds"] > 0 and m[op]["peak_mib"] >= 0, (kind, op, m[op])
    table = capsys.readouterr().out
    assert "| Wan2.1 (`wan`) |" in table and "| 4x9x8x8 |" in table and f"wrote {out}" in table


def test_each_call_runs_in_a_fresh_process():
    m = pretrained.run_child("wan", "decode", 9, 64, 1, TINY["wan"])
    assert m["parameters"] == real_count("wan", TINY["wan"])
    assert m["latent"] == [4, 3, 8, 8] and m["output"] == [1, 3, 9, 64, 64]
    assert m["seconds"] > 0 and m["peak_mib"] > 0  # a fresh process: the call's own allocations raise the peak


def test_real_size_counts_without_memory():
    """The released configs, counted on the meta device; SD's is the published SD 1.x VAE count."""
    expected = {"ltx": (419_193_649, [8, 32]), "wan": (126_892_531, [4, 8]), "sd": (83_653_863, [1, 8])}
    for kind, (params, compression) in expected.items():
        facts = pretrained.model_facts(kind, pretrained.CONFIGS[kind])
        assert (facts["parameters"], facts["compression"]) == (params, compression), kind
        assert facts["encoder_parameters"] + facts["decoder_parameters"] <= params
    assert pretrained.model_facts("sd", pretrained.SD_CONFIG)["parameters"] == real_count("sd", pretrained.SD_CONFIG)


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-running an imported module
def test_clip_size_the_model_cannot_take_exits_2(monkeypatch, capsys):
    from minisora.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `minisora bench` sets sys.argv for the benchmark it runs
    with pytest.raises(SystemExit) as e:  # through `minisora bench pretrained` (the real configs, on the meta device)
        main(["bench", "pretrained", "--kinds", "wan", "--frames", "10"])
    assert e.value.code == 2
    monkeypatch.setattr(pretrained, "CONFIGS", TINY)
    assert pretrained.main(["--kinds", "wan", "--frames", "10"]) == 2
    assert "wan needs frames = 1 + 4k" in capsys.readouterr().err


def test_without_diffusers_exits_2_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert pretrained.main(["--kinds", "sd"]) == 2
    assert "pip install -e .[diffusers]" in capsys.readouterr().err
