"""A training run SIGKILLed again and again (mid checkpoint write, before the rename, at random times) resumes
from its last complete checkpoint each time and ends with the weights of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minisora.checkpoint import checkpoint_step
from tiny_run import ROOT, TINY_RUN

SCRIPT = ROOT / "tests" / "scripts" / "kill_run.py"
STEPS = 120


def command(tmp: Path, name: str, *extra: str) -> list[str]:
    args = [
        *TINY_RUN, f"name={name}", f"run_dir={tmp / 'runs'}", f"data.path={tmp / 'data' / 'shapes' / 'manifest.csv'}",
        f"latents.cache_root={tmp / 'cache'}", "trainer.accelerator=cpu", "vae_trainer.accelerator=cpu",
        f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=1", "trainer.limit_val_batches=0",
        "dit_train.optimizer=adamw", *extra,
    ]  # fmt: skip
    return [sys.executable, str(SCRIPT), "--config", "configs/shapes.yaml", *args]


def start(tmp: Path, cmd: list[str], subcommand: str = "train", **env: str) -> subprocess.Popen:
    env = {**os.environ, "RECORD_DIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), **env}
    cmd = [cmd[0], cmd[1], subcommand, *cmd[2:]]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def newest_step(ckpts: Path) -> int:
    """The step of the newest complete checkpoint on disk (what a rerun must resume from)."""
    steps = [0]
    for p in ckpts.glob("*.ckpt"):
        try:  # a running trainer may delete an old step file between the glob and the read
            steps.append(torch.load(p, map_location="cpu", weights_only=True)["global_step"])
        except (FileNotFoundError, RuntimeError):
            pass
    return max(steps)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_random_points_and_during_checkpoint_writes_loses_nothing(tmp_path):
    # The VAE and the latent cache first, so every kill below lands in DiT training.
    code, out = finish(start(tmp_path, command(tmp_path, "setup"), "cache"))
    assert code == 0, out
    vae = f"vae_weights={tmp_path / 'runs' / 'setup' / 'vae' / 'vae.safetensors'}"
    code, out = finish(start(tmp_path, command(tmp_path, "ref", vae)))
    assert code == 0, out

    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    cmd = command(tmp_path, "killed", vae)
    kills = [("mid-write", {"KILL_MID_WRITE": "5"}), ("before-rename", {"KILL_BEFORE_RENAME": "4"})]
    kills += [("random", {})] * 4
    rng = random.Random(0)
    partial_seen, left = 0, 0
    for kind, env in [*kills, ("none", {})]:
        before = newest_step(ckpts)
        proc = start(tmp_path, cmd, **env)
        if kind == "random":  # wait until training runs (a new checkpoint appears), then kill at a random moment
            deadline = time.time() + 120
            while newest_step(ckpts) == before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
        code, out = finish(proc)
        expected = 0 if kind == "none" else -signal.SIGKILL
        assert code == expected, f"{kind}: expected exit code {expected}, got {code}:\n{out[-3000:]}"
        started = json.loads((tmp_path / "dit-rank0-start.json").read_text())["step"]
        assert started == before, f"{kind}: resumed at step {started}, the last complete checkpoint was step {before}"
        # A rerun first removes what a write killed midway left behind, and says so.
        assert out.count("a checkpoint write that did not finish") == left
        left = len(list(ckpts.glob(".*partial")))
        partial_seen += left
        # Whatever the kill hit, every file under a checkpoint name is complete.
        assert all(checkpoint_step(p) is not None for p in ckpts.glob("*.ckpt")), sorted(ckpts.iterdir())
    assert partial_seen >= 2 and left == 0  # at least the two kills inside writes left partial files
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    ref = torch.load(tmp_path / "runs" / "ref" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == ref["global_step"] == STEPS
    for key, value in ref["state_dict"].items():  # model and EMA: the kills cost nothing
        torch.testing.assert_close(last["state_dict"][key], value, rtol=0, atol=0, msg=key)
