"""FSDP (ShardedStrategy + LitVideoDiT.configure_model): what it refuses before sharding, and the run on GPUs.

The 2-process CPU run that shards, trains, resumes, checkpoints and samples is in test_distributed.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import DTensor

from minisora.models.dit import DiTBlock, VideoDiT
from minisora.training.lit_dit import LitVideoDiT
from minisora.training.strategy import ShardedStrategy
from test_distributed import assert_same_training_state, load, run_cli


def tiny_lit(**kw) -> LitVideoDiT:
    model = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2, condition="none")
    lit = LitVideoDiT(model, **{"optimizer": "adamw", **kw})
    lit._trainer = SimpleNamespace(strategy=ShardedStrategy({DiTBlock}))  # what Lightning sets before configure_model
    return lit


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "adamw8bit"}, r"dit_train.optimizer=adamw8bit \(bitsandbytes has no sharded-tensor version; use "
                                 r"dit_train.optimizer=adamw"),
    ({"freeze": [r"blocks\.0\."]}, r"frozen DiT weights \(lora, dit_train.freeze\).*use trainer.strategy=ddp"),
    ({"text_encoder": torch.nn.Linear(2, 2)}, r"a text encoder trained with the DiT \(lora.text_encoder\)"),
    ({"compile": True}, r"dit_train.compile=true"),
])  # fmt: skip
def test_fsdp_refuses_what_it_does_not_train_before_sharding_anything(settings, message):
    lit = tiny_lit(**settings)
    with pytest.raises(ValueError, match=f"trainer.strategy=fsdp does not train {message}"):
        lit.configure_model()
    assert not any(isinstance(p, DTensor) for p in lit.parameters())
    assert lit.full_ema() is lit.ema.module  # nothing sharded: the EMA is whole on every rank


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP on CUDA (NCCL) needs a GPU; on CPU: test_distributed")
def test_fsdp_on_gpus_matches_one_gpu_and_trains_in_bf16(tmp_path):
    """On 1 or 2 GPUs: FSDP in fp32 equals one GPU with the global batch; in bf16-mixed it trains and samples."""
    n = min(torch.cuda.device_count(), 2)
    gpu = ("trainer.accelerator=gpu", "vae_trainer.accelerator=gpu", "trainer.max_steps=5",
           "trainer.checkpoint_every=4")  # fmt: skip
    run_cli(tmp_path, "one", "name=one", "trainer.devices=1", f"latents.dit_batch_size={2 * n}",
            "trainer.precision=32-true", *gpu)  # fmt: skip
    vae = f"vae_weights={tmp_path / 'runs' / 'one' / 'vae' / 'vae.safetensors'}"
    fsdp = ("trainer.strategy=fsdp", f"trainer.devices={n}", "latents.dit_batch_size=2", vae, *gpu)
    run_cli(tmp_path, "fsdp", "name=fsdp", "trainer.precision=32-true", *fsdp)
    assert json.loads((tmp_path / "dit-rank0.json").read_text())["world"] == n
    assert_same_training_state(load(tmp_path, "fsdp"), load(tmp_path, "one"))
    run_cli(tmp_path, "bf16", "name=bf16", "trainer.precision=bf16-mixed", *fsdp)
    state = load(tmp_path, "bf16")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert len(list((tmp_path / "runs" / "bf16" / "samples" / "step-000005").glob("*.mp4"))) == 3
