"""`minisora bench cache --quick`: latent caches of N and 8N clips, a DiT epoch on each, memory and read figures."""

import json

from minisora.bench.cache import main


def test_quick_cache_benchmark_reports_memory_size_and_read_time(tmp_path, capsys):
    out = tmp_path / "cache.json"
    assert main(["--quick", "--out", str(tmp_path / "caches"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "random latents written through the cache writer" in r["what"]
    small, big = r["caches"]
    assert (small["clips"], big["clips"]) == (8, 64)
    for c in (small, big):  # one full epoch: every row read once, in batches of 4
        assert c["rows_read"] == c["clips"] and c["steps"] == c["clips"] // 4
        assert c["peak_rss_mb"] >= c["rss_before_mb"] > 100 and c["growth_mb"] == c["peak_rss_mb"] - c["rss_before_mb"]
    # 4x2x8x8 float16 latents: 512 bytes a clip, plus the caption shards and indexes.
    assert small["size_bytes"] > 8 * 512 and big["size_bytes"] > 64 * 512 + small["size_bytes"] / 2
    assert isinstance(r["targets"]["growth_8n_within_10pct_plus_100mb"], bool)
    assert r["targets"]["cache_2gb_under_300mb"] is None  # the 8N cache is far below 2 GB
    read = r["read"]  # 64 clips, 3 held out: 61 train in batches of 32 (the last short one dropped), 2 epochs
    assert (read["clips"], read["batch_size"], read["batches"]) == (64, 32, 2) and read["wall_ms_median"] > 0
    assert not (tmp_path / "caches").exists()  # removed without --keep
    printed = capsys.readouterr().out
    assert "| 64 |" in printed and "not measured (the larger cache is under 2 GB)" in printed
