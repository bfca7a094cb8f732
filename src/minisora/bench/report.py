"""What every benchmark does with its results besides printing them: write them as JSON when asked."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | None, results: dict) -> None:
    """Write `results` to `path` (parents created); nothing when path is None (no --json given)."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
