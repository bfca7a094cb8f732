"""The training benchmark's --quick mode: runs, writes the JSON it promises, and its figures are sane."""

import json
import math

import pytest
import torch

from minisora.bench import train as bench


def test_latent_and_token_count_of_the_default_clip():
    assert bench.latent_shape(17, 256, 256) == (16, 5, 32, 32)
    model = bench.VideoDiT(**bench.preset("tiny"))
    assert model.tokens(5, 32, 32) == 1280  # 5 * 16 * 16 with patch 1x2x2
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        bench.latent_shape(16, 256, 256)
    with pytest.raises(ValueError, match="unknown preset 'XXL'; available: .*tiny"):  # names the known presets
        bench.preset("XXL")


def test_quick_run_writes_positive_finite_figures(tmp_path, capsys):
    out = tmp_path / "bench" / "train.json"
    threads = torch.get_num_threads()
    try:
        returned = bench.main(["--quick", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole process
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["clips"] == [[5, 32, 32]] and results["latents"] == [[16, 2, 4, 4]] and results["batch"] == 1
    assert results["precision"] == "fp32" and results["optimizer"] == "adamw8bit" and results["threads"] == 1
    assert len(results["loadavg_before"]) == 3 and len(results["loadavg_after"]) == 3

    runs = {r["variant"]: r for r in results["runs"]}
    assert list(runs) == ["base", "grad_ckpt", "adamw", "bf16", "factorized"]  # compile is left out of --quick
    assert runs["grad_ckpt"]["grad_checkpointing"] and not runs["base"]["grad_checkpointing"]
    assert runs["adamw"]["optimizer"] == "adamw" and runs["bf16"]["precision"] == "bf16"
    assert runs["factorized"]["layout"] == "factorized" and runs["base"]["layout"] == "full"
    for r in runs.values():
        assert r["preset"] == "tiny" and r["tokens"] == 8 and r["params"] > 0  # 2 x 2 x 2 tokens
        for key in ("step_s", "fwd_bwd_s", "optimizer_s", "cpu_s", "peak_mem_mb", "clips_per_s", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["step_s"] == pytest.approx(r["fwd_bwd_s"] + r["optimizer_s"], rel=1e-6)
        assert r["tokens_per_s"] == pytest.approx(8 * r["clips_per_s"])
        assert len(r["steps_s"]) == 1

    (state,) = results["optimizer_state"]
    assert state["preset"] == "tiny" and state["params"] == runs["base"]["params"]
    assert state["adamw_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)  # two fp32 moments (+ a step per tensor)
    assert 2.0 <= state["adamw8bit_bytes_per_param"] < 2.5  # two uint8 moments + block scales (+ small fp32 tensors)

    printed = capsys.readouterr().out
    assert "| preset | clip | tokens | variant |" in printed and "AdamW8bit state B/param" in printed


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variant.*'fp8'"):
        bench.variants("fp32", "adamw8bit", ["base", "fp8"])
