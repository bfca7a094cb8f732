"""Shared by the benchmarks and the planner: model presets, results as JSON, this process's memory (Linux /proc)."""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def model_preset(name: str, configs: str | Path = CONFIGS) -> dict:
    """VideoDiT's arguments from configs/model/<name>.yaml (the presets experiments use)."""
    from minisora.config import kwargs, load_config

    path = Path(configs) / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(known) or 'none in ' + str(path.parent)}")
    return kwargs(load_config(path).model)


def parse_size(text: str) -> tuple[int, int, int]:
    """'17x256x256' -> (frames, height, width), as every benchmark's size options are written."""
    T, H, W = (int(v) for v in text.lower().split("x"))
    return T, H, W


def write_json(path: str | None, results: dict) -> None:
    """Write `results` to `path` (parents created); nothing when path is None (no --json given)."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading covers only what follows (Linux >= 4.0).

    getrusage's ru_maxrss cannot do this, and in a subprocess it starts at the parent's peak (kept across exec).
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_and_report(parser, run, format_results, argv: list[str] | None) -> int:
    """A benchmark's main(): parse `--json` and its options, run it, print its table, write the JSON."""
    args = parser.parse_args(argv)
    results = run(args)
    print(format_results(results))
    write_json(args.json, results)
    return 0
