"""`minisora bench latte`: one measured run in this process, and the report's medians and ratios."""

import argparse

import pytest

from minisora.bench import latte as L


def test_child_measures_a_quick_minisora_run():
    args = argparse.Namespace(_child="minisora", quick=True, latte_dir=None, attention="math", threads=0,
                              warmup=1, steps=2, checkpointing=False, recompute=True)  # fmt: skip
    r = L.child(args)
    assert r["model"] == "minisora" and len(r["wall_s"]) == len(r["cpu_s"]) == 2
    assert r["params"] > 0 and r["growth_mb"] >= 0 and all(s > 0 for s in r["wall_s"])
    assert L.child(argparse.Namespace(**{**vars(args), "checkpointing": True}))["params"] == r["params"]


def test_checkpointing_reaches_videodit_and_the_floor_is_the_step_flops_at_the_gemm_rate():
    assert L.build("minisora", L.QUICK, None, "math", checkpointing=True).grad_checkpointing
    assert not L.build("minisora", L.QUICK, None, "math").grad_checkpointing
    assert not L.build("minisora", L.QUICK, None, "math", recompute=False).blocks[0].recompute
    f = L.matmul_floor(L.QUICK, threads=1)
    assert f["threads"] == 1 and f["gflops"] > 0 and f["seconds"] == pytest.approx(f["flops"] / f["gflops"] / 1e9)


def test_latte_dir_without_latte_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/latte.py not found"):
        L.build("latte", L.QUICK, str(tmp_path), "flash")


def test_run_alternates_and_reports_ratios(monkeypatch):
    calls = []

    def fake_child(kind, attention, args):  # the subprocess's figures: latte takes 3 s and 1000 MB, minisora 2 s, 400
        calls.append(kind)
        fast = kind == "minisora"
        return {"model": kind, "params": 10, "threads": 1, "wall_s": [2.0 if fast else 3.0] * 2,
                "cpu_s": [2.0 if fast else 3.0] * 2, "growth_mb": 400.0 if fast else 1000.0}  # fmt: skip

    monkeypatch.setattr(L, "run_child", fake_child)
    args = argparse.Namespace(rounds=2, steps=2, warmup=1, quick=True, latte_attention=["flash"], mmap_threshold=0,
                              checkpointing=False, recompute=True, threads=1)  # fmt: skip
    r = L.run(args)
    assert calls == ["minisora", "latte", "latte", "minisora"]  # the order flips each round
    q = r["vs_latte"]["latte:flash"]
    assert q["speedup_cpu"] == pytest.approx(1.5) and q["memory_ratio"] == pytest.approx(0.4)
    assert r["targets"]["latte:flash"] == {"speedup_1.5x": True, "memory_0.5x": True}
    text = L.format_results(r)
    assert "| minisora | 0.0 M | 2.00 |" in text and "matmul floor" in text
    assert f"means 2.00 s/step: {2.0 / r['matmul_floor']['seconds']:.2f}x the matmul floor" in text
