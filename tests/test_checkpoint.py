"""Checkpoint loading: one loader for Lightning checkpoints, run folders and exported folders; clear errors."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_run import build_tiny_run

from minisora.checkpoint import (
    CheckpointError,
    export_checkpoint,
    find_checkpoint,
    load_checkpoint,
    load_dit_weights,
    newest_checkpoint,
    read_weights,
)
from minisora.models.dit import VideoDiT

SRC = Path(__file__).resolve().parents[1] / "src" / "minisora"


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory) / "runs" / "shapes"


@pytest.fixture(scope="session")
def exported(run, tmp_path_factory) -> Path:
    return export_checkpoint(run, tmp_path_factory.mktemp("export") / "shapes")


def lightning_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def dit_for(ckpt) -> VideoDiT:
    from minisora.checkpoint import _text_dim, dit_args
    from minisora.models.autoencoder import load_autoencoder

    return VideoDiT(
        **dit_args(ckpt.config, load_autoencoder(ckpt.vae_path).latent_channels, _text_dim(ckpt.state_dict))
    )


def test_a_run_folder_means_its_newest_checkpoint(run, tmp_path):
    assert find_checkpoint(run) == ("lightning", run / "checkpoints" / "last.ckpt")
    assert find_checkpoint(run / "checkpoints") == ("lightning", run / "checkpoints" / "last.ckpt")
    # Without last.ckpt the highest step wins, whatever the file times say.
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step-000010.ckpt", "step-000200.ckpt", "step-000030.ckpt"):
        (folder / name).write_bytes(b"x")
    assert newest_checkpoint(folder).name == "step-000200.ckpt"


def test_lightning_checkpoint_gives_config_ema_weights_and_vae(run):
    ckpt = load_checkpoint(run)
    state = lightning_state(run)
    assert ckpt.kind == "lightning" and ckpt.weights == "ema" and ckpt.step == 4
    assert ckpt.config["model"]["hidden_size"] == 32 and ckpt.config["dit_train"]["prediction"] == "x0"
    assert ckpt.vae_path == run / "vae" / "vae.safetensors"
    assert set(ckpt.state_dict) == {k[len("ema.module.") :] for k in state if k.startswith("ema.module.")}
    key = "final_layer.linear.weight"
    assert torch.equal(ckpt.state_dict[key], state["ema.module." + key])
    raw = load_checkpoint(run, ema=False)
    assert raw.weights == "raw" and torch.equal(raw.state_dict[key], state["model." + key])
    assert not torch.equal(raw.state_dict[key], ckpt.state_dict[key])


def test_config_falls_back_to_the_run_config_yaml(run, tmp_path):
    """Checkpoints written before checkpoint['minisora_config'] existed still load, from <run>/config.yaml."""
    old = tmp_path / "old_run"
    (old / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "vae", old / "vae")
    shutil.copy(run / "config.yaml", old / "config.yaml")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["minisora_config"]
    torch.save(ckpt, old / "checkpoints" / "step-000004.ckpt")
    loaded = load_checkpoint(old)
    assert loaded.source == old / "checkpoints" / "step-000004.ckpt"
    assert loaded.config["model"]["depth"] == 2 and loaded.vae_path == old / "vae" / "vae.safetensors"
    # Alone, without a run folder around it, it cannot say how to build the model.
    lone = tmp_path / "lone.ckpt"
    shutil.copy(old / "checkpoints" / "step-000004.ckpt", lone)
    with pytest.raises(CheckpointError, match="carries no config"):
        load_checkpoint(lone)


def test_export_folder_is_self_describing_and_relocatable(run, exported, tmp_path):
    assert sorted(p.name for p in exported.iterdir()) == ["config.yaml", "model.safetensors", "vae.safetensors"]
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "minisora-dit-1" and meta["weights"] == "ema" and meta["step"] == "4"
        assert f.get_tensor("final_layer.linear.weight").dtype == torch.float32
    assert "vae_weights: vae.safetensors" in (exported / "config.yaml").read_text()
    moved = tmp_path / "elsewhere"
    shutil.copytree(exported, moved)
    ckpt = load_checkpoint(moved)
    assert ckpt.kind == "exported" and ckpt.vae_path == moved / "vae.safetensors"
    original = load_checkpoint(run)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in original.state_dict.items())


def test_bf16_export_and_overwrite_guard(run, exported, tmp_path):
    with pytest.raises(CheckpointError, match="already holds an export"):
        export_checkpoint(run, exported)
    out = export_checkpoint(run, tmp_path / "bf16", dtype="bf16")
    state, info = read_weights(out)
    assert all(v.dtype == torch.bfloat16 for v in state.values()) and info["weights"] == "ema"
    assert (out / "model.safetensors").stat().st_size < 0.6 * (exported / "model.safetensors").stat().st_size


def test_load_dit_weights_fills_a_model_from_any_kind(run, exported):
    ckpt = load_checkpoint(run)
    for source in (run, run / "checkpoints" / "step-000004.ckpt", exported, exported / "model.safetensors"):
        model = dit_for(ckpt)
        info = load_dit_weights(source, model)
        assert info["weights"] == "ema"
        assert torch.equal(model.final_layer.linear.weight, ckpt.state_dict["final_layer.linear.weight"]), source
    model = dit_for(ckpt)
    load_dit_weights(run, model, ema=False)
    assert torch.equal(model.final_layer.linear.weight, lightning_state(run)["model.final_layer.linear.weight"])


def test_mismatched_model_names_the_tensors_and_shapes(run):
    ckpt = load_checkpoint(run)
    cfg = {**ckpt.config["model"], "in_channels": 8, "text_dim": 32}
    wider = VideoDiT(**{**cfg, "hidden_size": 64})
    with pytest.raises(CheckpointError) as e:
        load_dit_weights(run, wider)
    msg = str(e.value)
    assert "last.ckpt" in msg and "shape mismatch" in msg
    assert re.search(r"x_embedder\.weight: checkpoint \(32, 32\) vs model \(64, 32\)", msg)
    deeper = VideoDiT(**{**cfg, "depth": 3})
    with pytest.raises(CheckpointError, match=r"missing in checkpoint \(\d+\): blocks\.2\."):
        load_dit_weights(run, deeper)
    shallower = VideoDiT(**{**cfg, "depth": 1})
    with pytest.raises(CheckpointError, match=r"unexpected \(\d+\): blocks\.1\."):
        load_dit_weights(run, shallower)


def test_files_that_are_not_dit_checkpoints_get_clear_errors(run, tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n" * 10)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    pickled = tmp_path / "object.ckpt"
    torch.save({"state_dict": {}, "extra": Path("x")}, pickled)  # a Python object beyond tensors
    folder = tmp_path / "folder"
    folder.mkdir()
    early = tmp_path / "early_run"  # a run folder while its VAE trains
    (early / "vae").mkdir(parents=True)
    shutil.copy(run / "config.yaml", early / "config.yaml")
    cases = {
        tmp_path / "missing.ckpt": "no such file or folder",
        text: "not a PyTorch/Lightning checkpoint",
        empty: "empty",
        pickled: "pickled Python object .*weights_only=True",
        run / "vae" / "vae.safetensors": "autoencoder \\(VAE\\) file",
        run / "vae" / "checkpoints" / "last.ckpt": "autoencoder \\(VAE\\) training checkpoint",
        run / "vae": "autoencoder \\(VAE\\) training checkpoint",
        early: "run folder without DiT checkpoints",
        folder: "without model.safetensors or checkpoints",
    }
    model = VideoDiT(in_channels=8, text_dim=32, hidden_size=32, depth=2, num_heads=2)
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_checkpoint(path)
        assert str(path) in str(e.value)
        with pytest.raises(CheckpointError, match=message):
            load_dit_weights(path, model)


def test_every_torch_load_in_the_package_is_weights_only():
    """Checkpoints must never run code on load: no torch.load without weights_only=True anywhere."""
    calls = []
    for path in SRC.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, m.group(1)))
    assert calls, "expected at least the loader's own torch.load"
    assert all("weights_only=True" in args for _, args in calls), calls


class _Payload:
    """Unpickling this calls Path.touch(marker): code that runs on an unsafe torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="pickled Python object .*cannot run code"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError):
        load_dit_weights(evil, VideoDiT(in_channels=8, text_dim=32, hidden_size=32, depth=2, num_heads=2))
    assert not marker.exists()  # nothing ran
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.exists()
