"""SafeCheckpointIO (atomic writes, free-space check, weights_only loads) and strategies built from the config."""

from __future__ import annotations

import errno
import pickle
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from minisora.config import load_config, to_plain
from minisora.models.dit import DiTBlock
from minisora.training import checkpoint_io
from minisora.training.checkpoint_io import SafeCheckpointIO, tensor_bytes
from minisora.training.run import build_trainer
from minisora.training.strategy import ShardedStrategy, build_strategy
from test_checkpoint import _Payload
from tiny_run import ROOT

Usage = namedtuple("Usage", "total used free")


def state(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}, "nested": [torch.ones(10)]}


def test_write_is_complete_and_leaves_no_partial_file(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint(state(1), path)
    io.save_checkpoint(state(2), path)  # replaces the previous file in one rename
    assert io.load_checkpoint(path)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert tensor_bytes(state(1)) == 256 * 256 * 4 + 10 * 4


def test_short_disk_keeps_the_previous_checkpoint_and_warns(tmp_path, monkeypatch):
    io = SafeCheckpointIO(margin=1.1, reserve_mb=0)
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(state(1), path)
    need = int(tensor_bytes(state(2)) * 1.1)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda p: Usage(10**12, 10**12, need - 1))
    with pytest.warns(UserWarning, match=r"last.ckpt not written: 0 MiB free.*previous file is kept"):
        io.save_checkpoint(state(2), path)
    assert io.load_checkpoint(path)["global_step"] == 1 and io.skipped == [str(path)]
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda p: Usage(10**12, 0, need + 1))
    io.save_checkpoint(state(3), path)  # space again: saving resumes
    assert io.load_checkpoint(path)["global_step"] == 3


def test_disk_filling_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(state(1), path)

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    with pytest.warns(UserWarning, match="disk filled during the write"):
        io.save_checkpoint(state(2), path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file is gone

    def other_error(obj, f):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint_io.torch, "save", other_error)
    with pytest.raises(PermissionError):  # not a full disk: a real error, raised
        io.save_checkpoint(state(2), path)


def test_loading_a_crafted_pickle_for_resume_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": _Payload(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        SafeCheckpointIO().load_checkpoint(evil)
    cfg = load_config(ROOT / "configs/shapes.yaml", ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
    trainer = build_trainer(cfg.trainer, tmp_path / "run", [], tag="t")
    with pytest.raises(pickle.UnpicklingError):  # the path `minisora train` takes to resume
        trainer.strategy.load_checkpoint(evil)
    assert not marker.exists()


def test_strategies_from_the_config(tmp_path):
    cfg = load_config(ROOT / "configs/shapes.yaml", ["trainer.strategy=fsdp"])
    fsdp = build_strategy(cfg.trainer.strategy, to_plain(cfg.trainer.strategy_options), {DiTBlock})
    assert isinstance(fsdp, ShardedStrategy) and isinstance(fsdp.checkpoint_io, SafeCheckpointIO)
    assert fsdp.units == (DiTBlock,)  # whole DiT blocks are FSDP units
    assert fsdp._save_distributed_checkpoint is False  # one full state dict, written by rank 0
    ddp = build_strategy("ddp", {}, None, find_unused=True)
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is True
    assert isinstance(ddp.checkpoint_io, SafeCheckpointIO)
    assert build_strategy("auto") == "auto"
    with pytest.raises(ValueError, match="trainer.strategy_options is only read for ddp, not 'auto'"):
        build_strategy("auto", {"x": 1})
    with pytest.raises(ValueError, match=r"trainer.strategy_options=\{'activation_checkpointing': True\}: fsdp takes "
                                         r"none.*model.grad_checkpointing=true"):  # fmt: skip
        build_strategy("fsdp", {"activation_checkpointing": True}, {DiTBlock})


@pytest.mark.parametrize("name", ["deepspeed_stage_2", "deepspeed", "fsdp_cpu_offload", "model_parallel"])
def test_strategies_whose_checkpoints_minisora_cannot_use_are_refused_naming_the_alternatives(name):
    why = {"d": "DeepSpeed writes checkpoints as folders", "f": "Lightning.s FSDPStrategy .FSDP1. flattens",
           "m": "not one minisora runs"}[name[0]]  # fmt: skip
    with pytest.raises(ValueError, match=f"trainer.strategy='{name}' is not supported: {why}.*strategy=ddp.*or fsdp"):
        build_strategy(name, {}, {DiTBlock})


def test_the_autoencoder_stage_refuses_fsdp_naming_its_key(tmp_path):
    cfg = load_config(ROOT / "configs/shapes.yaml", ["vae_trainer.strategy=fsdp", "vae_trainer.accelerator=cpu"])
    with pytest.raises(ValueError, match=r"vae_trainer.strategy='fsdp' shards a model's transformer blocks.*"
                                         r"vae_trainer.strategy=ddp"):  # fmt: skip
        build_trainer(cfg.vae_trainer, tmp_path, [], tag="vae")


def test_single_device_trainers_write_through_safe_checkpoint_io(tmp_path):
    cfg = load_config(ROOT / "configs/shapes.yaml", ["trainer.accelerator=cpu"])
    trainer = build_trainer(cfg.trainer, Path(tmp_path), [], tag="t")
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
