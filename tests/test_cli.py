"""The `minisora` command as a user runs it: make-shapes, config, error messages, a tiny end-to-end train."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_run import TINY_RUN

from minisora.cli import main

ROOT = Path(__file__).resolve().parents[1]

# The shared tiny run's overrides, with periodic sampling and the shapes score switched on.
TINY = [o for o in TINY_RUN if not o.startswith(("name=", "sample.", "trainer.max_steps", "shapes.num", "shapes_eval"))] + [
    "shapes.num=24",
    "trainer.max_steps=6",
    "sample.every_n_steps=3",
    "sample.steps=2",
    "shapes_eval.every_n_steps=0",
    "shapes_eval.samples_per_prompt=1",
]


def test_make_shapes_command(tmp_path):
    out = tmp_path / "shapes"
    assert main(["make-shapes", "--out", str(out), "--num", "6", "--seed", "3"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 6 and all((out / r["path"]).is_file() for r in rows)


def test_config_command_prints_resolved_values(capsys):
    assert main(["config", "--config", str(ROOT / "configs/shapes.yaml"), "trainer.max_steps=123"]) == 0
    assert "max_steps: 123" in capsys.readouterr().out


def test_user_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  heigth: 32\n")
    r = subprocess.run(
        [sys.executable, "-m", "minisora", "config", "--config", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "bad.yaml" in r.stderr and "data.heigth" in r.stderr


@pytest.mark.slow
def test_tiny_end_to_end_train_writes_checkpoints_videos_and_scores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", str(ROOT / "configs/shapes.yaml"), "name=tiny", "data.path=data/shapes/manifest.csv"]
    assert main(args + TINY) == 0
    run = tmp_path / "runs" / "tiny"
    assert (run / "config.yaml").is_file()
    assert (run / "vae" / "vae.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    videos = sorted((run / "samples").rglob("*.mp4"))
    assert any(v.parent.name == "step-000003" for v in videos)
    metrics = json.loads((run / "samples" / "final" / "eval.json").read_text())
    assert metrics["samples"] == 84 and 0.0 <= metrics["all/color_accuracy"] <= 1.0
    # Running the same command again resumes: the global step continues instead of restarting.
    same_data = [o for o in TINY if not o.startswith(("trainer.max_steps", "sample."))]
    assert main(args + same_data + ["trainer.max_steps=8", "sample.every_n_steps=0", "sample.steps=2"]) == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 8  # continued from step 6, not restarted
    assert last["minisora_config"]["name"] == "tiny"  # the checkpoint describes itself


def test_library_modules_never_import_the_cli():
    """Layering: the `minisora` command depends on the library, never the reverse."""
    import ast

    src = ROOT / "src" / "minisora"
    offenders = []
    for path in src.rglob("*.py"):
        if path.is_relative_to(src / "cli") or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "minisora.cli" or n.startswith("minisora.cli.") for n in names):
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_renamed_flag_names_its_new_name(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--cfg", "4"])
    assert e.value.code == 2 and "--cfg was renamed: use --guidance" in capsys.readouterr().err
