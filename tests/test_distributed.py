"""Multi-process training: the real `minisora train` pipeline on 2 CPU processes (DDP and FSDP over gloo).

Lightning's launcher starts rank 1 by re-running the command, exactly as on a multi-GPU machine; the
only difference from a user's run is the recording callback of tests/scripts/record_run.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minisora.checkpoint import export_checkpoint, read_weights
from minisora.data.bucket_sampler import BucketBatchSampler
from minisora.io import read_clip
from tiny_run import ROOT, TINY_RUN

SCRIPT = ROOT / "tests" / "scripts" / "record_run.py"
KEY = "final_layer.linear.weight"


def test_one_bucket_deals_disjoint_shares_that_interleave_into_the_global_batch():
    # Fixed-size data: one bucket, its short last batch dropped (drop_last) so any clip count splits evenly.
    n, world, batch = 23, 3, 2
    one = BucketBatchSampler([n], [world * batch], seed=5, drop_last=True)  # one process, the global batch
    shares = [list(BucketBatchSampler([n], [batch], seed=5, rank=r, world_size=world, drop_last=True))
              for r in range(world)]  # fmt: skip
    assert [len(s) for s in shares] == [len(one)] * world == [n // (world * batch)] * world  # 3 steps, 18 of 23 clips
    assert all(len(b) == batch for s in shares for b in s)
    flat = [i for s in shares for b in s for i in b]
    assert len(set(flat)) == len(flat)  # no clip twice in an epoch across ranks
    # Batch i of every rank together is batch i of one process with batch world * batch.
    for i, together in enumerate(one):
        assert {x for s in shares for x in s[i]} == set(together)
    # Each rank's next pass is the next epoch's shuffle, not a repeat; set_epoch (Lightning's) is ignored.
    sampler = BucketBatchSampler([n], [batch], seed=5, rank=1, world_size=world, drop_last=True)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) != first
    # Fewer clips than one global batch: one short batch, the same size on every rank.
    small = [list(BucketBatchSampler([7], [4], seed=0, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert [[len(b) for b in s] for s in small] == [[3], [3]]
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([n], [batch], seed=0, rank=3, world_size=3)
    with pytest.raises(ValueError, match="2 clips make no batch for 3 ranks"):
        BucketBatchSampler([2], [batch], seed=0, rank=0, world_size=3)


def run_cli(tmp: Path, tag: str, *overrides: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECORD_DIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    args = [
        *TINY_RUN, f"run_dir={tmp / 'runs'}", f"data.path={tmp / 'data' / 'shapes' / 'manifest.csv'}",
        f"latents.cache_root={tmp / 'cache'}", "trainer.accelerator=cpu", "vae_trainer.accelerator=cpu",
        "trainer.max_steps=4", "trainer.limit_val_batches=0", "dit_train.optimizer=adamw", "dit_train.warmup_steps=1",
        *overrides,
    ]  # fmt: skip
    cmd = [*launcher, str(SCRIPT), "train", "--config", "configs/shapes.yaml", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{tag} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def load(tmp: Path, name: str, file: str = "last.ckpt") -> dict:
    return torch.load(tmp / "runs" / name / "checkpoints" / file, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints of one step hold the same model, EMA and AdamW state (up to float reduction order)."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # the model and its EMA
        torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_a[k][name], opt_b[k][name], rtol=1e-3, atol=1e-8)
    # Training moved the zero-initialised output layer, so the equality above is of trained weights.
    assert a["state_dict"]["model.final_layer.linear.weight"].abs().max() > 1e-4


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory) -> SimpleNamespace:
    """A 2-process DDP run (VAE and DiT) and one process with the global batch on its VAE: 5 DiT steps each.

    checkpoint_every=4: step 4 is a periodic checkpoint, step 5 the final one (saved although 5 % 4 != 0).
    Shared by the DDP and FSDP tests, which both compare with the single-process run.
    """
    tmp = tmp_path_factory.mktemp("distributed")
    steps = ("trainer.max_steps=5", "trainer.checkpoint_every=4")
    ddp = run_cli(tmp, "ddp", "name=ddp", "trainer.devices=2", "trainer.strategy=ddp", "latents.dit_batch_size=2",
                  "vae_trainer.devices=2", "vae_trainer.strategy=ddp", *steps)  # fmt: skip
    ranks = [json.loads((tmp / f"dit-rank{r}.json").read_text()) for r in (0, 1)]
    caches = list((tmp / "cache").iterdir())
    vae = tmp / "runs" / "ddp" / "vae" / "vae.safetensors"
    run_cli(tmp, "single", "name=single", "trainer.devices=1", "latents.dit_batch_size=4", f"vae_weights={vae}", *steps)
    single = json.loads((tmp / "dit-rank0.json").read_text())  # overwritten by the single run's rank 0
    return SimpleNamespace(tmp=tmp, ddp=ddp, ranks=ranks, single=single, caches=caches, vae=vae)


@pytest.mark.slow
def test_two_process_ddp_sees_disjoint_data_and_writes_the_single_process_checkpoint(ddp_and_single):
    tmp, ranks, single = ddp_and_single.tmp, ddp_and_single.ranks, ddp_and_single.single
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [5, 5]
    assert "resuming" not in ddp_and_single.ddp.stdout
    # The VAE trained under DDP too, and rank 0 alone wrote it; the cache was encoded once.
    assert ddp_and_single.vae.is_file()
    caches = ddp_and_single.caches
    assert len(caches) == 1 and not caches[0].name.endswith("partial"), caches
    # 11 training clips (12 minus 1 for validation): each rank gets 5 a pass, in 2 batches of 2.
    per_epoch = 2
    for epoch in range(2):
        seen = [b for r in ranks for b in r["batches"][epoch * per_epoch : (epoch + 1) * per_epoch]]
        flat = [i for b in seen for i in b]
        assert len(flat) == 8 and len(set(flat)) == 8, f"epoch {epoch}: a clip was seen twice across ranks: {seen}"

    # One process with the global batch (2 ranks x 2) draws the same clips, the same noise, the same steps.
    assert single["world"] == 1
    for i, batch in enumerate(single["batches"]):
        assert set(batch) == set(ranks[0]["batches"][i]) | set(ranks[1]["batches"][i])
    assert len(caches) == len(list((tmp / "cache").iterdir()))  # the single run reused the cache
    for name in ("ddp", "single"):  # the periodic step and the final one, which 4 does not divide
        assert sorted(p.name for p in (tmp / "runs" / name / "checkpoints").glob("*.ckpt")) == [
            "last.ckpt", "step-000004.ckpt", "step-000005.ckpt"]  # fmt: skip
    assert_same_training_state(load(tmp, "ddp"), load(tmp, "single"))


@pytest.mark.slow
def test_two_process_fsdp_resumes_a_single_process_checkpoint_and_matches_it(ddp_and_single):
    """FSDP (fully_shard, model and EMA sharded alike, blocks re-computed in backward) on 2 gloo processes: resumed
    from the single run's step 4, its step 5 is the single run's step 5, model, EMA and optimizer; the checkpoint
    is one full state dict and the EMA, gathered to rank 0, samples the single run's videos."""
    tmp = ddp_and_single.tmp
    ckpts = tmp / "runs" / "fsdp" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(tmp / "runs" / "single" / "checkpoints" / "step-000004.ckpt", ckpts)
    fsdp = run_cli(tmp, "fsdp", "name=fsdp", "trainer.devices=2", "trainer.strategy=fsdp", "latents.dit_batch_size=2",
                   "trainer.max_steps=5", "trainer.checkpoint_every=4", f"vae_weights={ddp_and_single.vae}",
                   "model.grad_checkpointing=true")  # fmt: skip
    assert f"resuming from {ckpts / 'step-000004.ckpt'}" in fsdp.stdout
    ranks = [json.loads((tmp / f"dit-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [5, 5]
    assert set(ranks[0]["batches"][0]) | set(ranks[1]["batches"][0]) == set(ddp_and_single.single["batches"][4])
    last, single = load(tmp, "fsdp"), load(tmp, "single")
    assert_same_training_state(last, single)
    assert int(last["state_dict"]["ema.n_averaged"]) == 5 and last["minisora_config"]["trainer"]["strategy"] == "fsdp"
    # Sampled at the end from the gathered EMA: the single run's videos (same weights, prompts and seed).
    videos = sorted((tmp / "runs" / "single" / "samples" / "step-000005").glob("*.mp4"))
    assert len(videos) == 3
    for video in videos:
        a = read_clip(video).astype(np.float32)
        b = read_clip(tmp / "runs" / "fsdp" / "samples" / "step-000005" / video.name).astype(np.float32)
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5, video.name  # in 0..255 levels
    exported = export_checkpoint(tmp / "runs" / "fsdp", tmp / "export")
    assert torch.equal(read_weights(exported)[0][KEY], last["state_dict"][f"ema.module.{KEY}"])  # the EMA, whole
    # The same run goes on in one process: the FSDP checkpoint resumes without FSDP.
    one = run_cli(tmp, "fsdp", "name=fsdp", "trainer.devices=1", "latents.dit_batch_size=4", "trainer.max_steps=6",
                  f"vae_weights={ddp_and_single.vae}")  # fmt: skip
    assert f"resuming from {ckpts / 'last.ckpt'}" in one.stdout
    resumed = load(tmp, "fsdp")
    assert resumed["global_step"] == 6 and int(resumed["state_dict"]["ema.n_averaged"]) == 6
    assert not torch.equal(resumed["state_dict"][f"model.{KEY}"], last["state_dict"][f"model.{KEY}"])


@pytest.mark.slow
def test_bucketed_ddp_ranks_share_one_bucket_per_step_and_match_one_process(tmp_path):
    buckets = ["shapes.variants=[9x32x32,5x24x40]", "shapes.num=32", "buckets.resolutions={32px: [5, 9]}",
               'buckets.aspect_ratios=["1:1","16:9"]', "latents.val_fraction=0.0", "trainer.max_steps=6"]  # fmt: skip
    run_cli(tmp_path, "ddp", "name=ddp", "trainer.devices=2", "trainer.strategy=ddp", "latents.dit_batch_size=2", *buckets)
    ranks = [json.loads((tmp_path / f"dit-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [6, 6]
    # 16 clips per bucket, per rank 2 clips of 9 frames (48 tokens) or 3 of 5 frames (30 tokens): an epoch is
    # 4 + 3 steps (16 / 6 leaves a last batch of 2 x 2), so these 6 steps see 6 batches of distinct clips.
    seen, buckets_seen = [], set()
    for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert len(a) == len(b)  # equal rows: the ranks stay in lockstep
        assert {x.split(":")[0] for x in a + b} == {a[0].split(":")[0]}  # one bucket for both ranks at each step
        buckets_seen.add(a[0].split(":")[0])
        seen += a + b
    assert len(set(seen)) == len(seen) and buckets_seen == {"0", "1"}, seen
    vae = tmp_path / "runs" / "ddp" / "vae" / "vae.safetensors"
    # One process with twice the batch: the same global batches (no bucket's batch rounds differently here).
    run_cli(tmp_path, "single", "name=single", "trainer.devices=1", "latents.dit_batch_size=4", f"vae_weights={vae}", *buckets)
    single = json.loads((tmp_path / "dit-rank0.json").read_text())
    for i, batch in enumerate(single["batches"]):
        assert set(batch) == set(ranks[0]["batches"][i]) | set(ranks[1]["batches"][i])
    a, b = (torch.load(tmp_path / "runs" / n / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for n in ("ddp", "single"))  # fmt: skip
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_torchrun_launches_the_same_command_without_code_changes(tmp_path):
    # torchrun starts both ranks at once: shapes data, the VAE file and the cache must still be made once.
    torchrun = Path(sys.executable).with_name("torchrun")
    run_cli(
        tmp_path, "torchrun", "name=tr", "trainer.devices=2", "trainer.strategy=ddp", "latents.dit_batch_size=2",
        "vae_trainer.devices=2", "vae_trainer.strategy=ddp", launcher=(str(torchrun), "--nproc_per_node", "2"),
    )  # fmt: skip
    ranks = [json.loads((tmp_path / f"dit-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [4, 4]
    assert not {i for b in ranks[0]["batches"][:2] for i in b} & {i for b in ranks[1]["batches"][:2] for i in b}
    assert len(list((tmp_path / "data" / "shapes" / "clips").glob("*.mp4"))) == 12
    assert (tmp_path / "runs" / "tr" / "vae" / "vae.safetensors").is_file()
    assert len(list((tmp_path / "cache").iterdir())) == 1
