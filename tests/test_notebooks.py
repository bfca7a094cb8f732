"""The notebooks run headless, top to bottom, with tiny settings (MINISORA_NOTEBOOK_TINY=1), so they cannot rot."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    """Every output of a cell type: 'text' (stdout), 'text/html', 'image/png', 'error'."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text" and out.get("name") == "stdout":
                found.append(out["text"])
            elif kind == "error" and out.get("output_type") == "error":
                found.append(out)
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


@pytest.mark.slow
def test_quickstart_then_explore_latents_execute(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISORA_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MINISORA_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    paths = [str(NOTEBOOKS.parent / "src"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))

    nb = execute("quickstart.ipynb", tmp_path)
    assert not outputs(nb, "error")
    assert (tmp_path / "runs" / "notebook" / "checkpoints" / "last.ckpt").is_file()
    # GIF figures only: with `rich` installed Lightning also renders its model summary as HTML.
    html = [h for h in outputs(nb, "text/html") if "data:image/gif;base64," in h]
    assert len(html) == 3  # data, samples, image-to-video
    assert html[1].count("<img") == 4 and html[2].count("<img") == 2
    assert len(outputs(nb, "image/png")) == 1  # the loss curve
    assert "identical: True" in "".join(outputs(nb, "text"))

    nb = execute("explore_latents.ipynb", tmp_path)  # reuses the quickstart's autoencoder
    assert not outputs(nb, "error")
    text = "".join(outputs(nb, "text"))
    assert "runs/notebook/vae/vae.safetensors" in text and "PSNR per clip (dB)" in text
    figures = [h for h in outputs(nb, "text/html") if "<img" in h]
    assert len(outputs(nb, "image/png")) == 2 and figures[0].count("<img") == 8
