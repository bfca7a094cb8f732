"""`make bench` (= minisora bench all): the --quick smoke run writes one JSON whose figures are all sane."""

import json
import math

import torch

from minisora.bench.all import main


def numbers(tree, path=""):
    """Every (path, number) leaf of a JSON tree, booleans excluded."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_quick_bench_writes_every_benchmark_with_positive_finite_figures(tmp_path, shared_videos, capsys):
    threads = torch.get_num_threads()
    main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # no benchmark's --threads leaks out
    assert torch.is_grad_enabled()  # nor the sampling benchmark's no_grad
    (out,) = tmp_path.glob("results-*-quick.json")
    results = json.loads(out.read_text())
    assert out.name == f"results-{results['device']}-quick.json" and results["quick"] is True
    assert set(results) >= {"device", "machine", "date", "seconds", "data", "train", "sample", "vae"}
    # Each benchmark's own schema, briefly: the figures the README tables are made of.
    assert results["data"]["clips_per_s"]["0"] > 0
    assert {r["variant"] for r in results["train"]["runs"]} == {"base", "grad_ckpt", "adamw", "bf16", "factorized"}
    assert results["sample"]["speed"][0]["euler_batched_step_s"] > 0
    assert {(r["op"], r["tiled"]) for r in results["vae"]["speed"]} == {
        ("encode", False), ("decode", False), ("encode", True), ("decode", True)
    }
    # Load averages may be 0 on an idle machine; every other figure is a positive, finite measurement or count.
    leaves = [(p, v) for p, v in numbers(results) if "loadavg" not in p and "load_avg" not in p]
    assert leaves and all(math.isfinite(v) for _, v in leaves)
    settings = (".data.config.workers[0]", ".data.config.seed")  # inputs, not measurements: 0 workers, seed 0
    # Differences of two timed runs (a step's share of a clip's CPU time): 0 when below the timing noise.
    differences = tuple(f".data.breakdown.{k}_cpu_ms" for k in ("rgb_full_size", "rgb_with_resize", "crop_and_tensor"))
    bad = [(p, v) for p, v in leaves if v <= 0 and p not in settings and not (p in differences and v == 0)]
    assert not bad, bad
    assert all(p in dict(leaves) for p in differences)  # each is reported
    printed = capsys.readouterr().out
    assert printed.count("## minisora bench") == 4
