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
KEY = "final_layer.linear.weight"  # re-drawn in the tiny run's checkpoints (tiny_run.py), so it differs by source


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


def test_a_run_folder_means_its_newest_complete_checkpoint(run, tmp_path):
    assert find_checkpoint(run) == ("lightning", run / "checkpoints" / "last.ckpt")  # step 4, tied with step-4
    assert find_checkpoint(run / "checkpoints") == ("lightning", run / "checkpoints" / "last.ckpt")
    # The highest step recorded inside the files wins, whatever their names or times say.
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in (("step-000010.ckpt", 10), ("step-000200.ckpt", 30), ("last.ckpt", 20)):
        torch.save({"global_step": step, "w": torch.zeros(4)}, folder / name)
    assert newest_checkpoint(folder).name == "step-000200.ckpt"
    (folder / "step-000200.ckpt").write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"step-000200.ckpt is incomplete or corrupt"):
        assert newest_checkpoint(folder).name == "last.ckpt"
    (folder / "last.ckpt").write_bytes(b"")
    (folder / "step-000010.ckpt").write_bytes(b"PK\x03\x04")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"no complete checkpoint; last.ckpt, "
                                                                          r"step-000010.ckpt, step-000200.ckpt are"):
        find_checkpoint(tmp_path)


def test_a_corrupt_last_ckpt_sends_sampling_export_and_init_from_to_the_good_step_checkpoint(run, tmp_path):
    from minisora.config import load_config
    from minisora.pipeline import TextToVideoPipeline
    from minisora.training import finetune

    copy = tmp_path / "shapes"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("logs", "samples"))
    last, good = copy / "checkpoints" / "last.ckpt", copy / "checkpoints" / "step-000004.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, as by a full disk
    corrupt = r"last.ckpt is incomplete or corrupt"
    with pytest.warns(UserWarning, match=corrupt):
        assert TextToVideoPipeline.from_pretrained(copy).checkpoint == good  # `minisora sample --ckpt <run>`
    with pytest.warns(UserWarning, match=corrupt):
        exported = export_checkpoint(copy, tmp_path / "export")
    state, info = read_weights(exported)
    assert info["step"] == 4 and torch.equal(state[KEY], load_checkpoint(good).state_dict[KEY])
    with pytest.warns(UserWarning, match=corrupt):
        cfg = load_config(None, [f"init_from={copy}", "name=tuned"])
    assert cfg.model.hidden_size == 32  # the base run's model, read from the good checkpoint
    with pytest.warns(UserWarning, match=corrupt):
        report, _ = finetune.prepare(cfg, dit_for(load_checkpoint(good)), None, resumed=False)
    assert report[0].startswith(f"init_from {good} (ema weights, step 4)")


def test_a_checkpoint_without_its_run_config_is_refused(run, tmp_path):
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del ckpt["minisora_config"]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", tmp_path / "run" / "config.yaml")  # not read: checkpoints carry their config
    torch.save(ckpt, tmp_path / "run" / "checkpoints" / "step-000004.ckpt")
    with pytest.raises(CheckpointError, match=r"step-000004.ckpt: the checkpoint carries no run config"):
        load_checkpoint(tmp_path / "run")


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
