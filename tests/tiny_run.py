"""A tiny trained-ish run folder (runs/shapes) shared by the pipeline, checkpoint and sample-command tests.

Built once per test session (~20 s on 2 CPU cores) by the real `minisora train` pipeline with tiny
settings. A DiT trained for 4 steps still has nearly zero output and cross-attention projections
(both are zero-initialised), so every seed and prompt would decode to the same video and tests of
seeds, prompts and export could not fail; the builder therefore re-draws those weights (seeded) in the
checkpoint, giving a model whose garbage output depends on noise and prompt.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "name=shapes",
    "shapes.num=12",
    "data.vae_batch_size=4",
    "data.num_workers=0",
    "vae.base_channels=8",
    "vae_trainer.max_steps=2",
    "vae_trainer.enable_progress_bar=false",
    "vae_train.latent_stats_batches=2",
    "text.width=32",
    "text.layers=1",
    "text.heads=1",
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "latents.dit_batch_size=4",
    "dit_train.p_image=0.1",  # conditioning draws on: resume, DDP and the experiments cover them
    "dit_train.p_extend=0.2",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.checkpoint_every=2",
    "trainer.enable_progress_bar=false",
    "sample.every_n_steps=0",
    "sample.steps=2",
    "shapes_eval=null",
]
_BUILT: dict[str, Path] = {}


def randomise_zero_layers(ckpt_path: Path, seed: int = 0) -> None:
    """Re-draw the zero-initialised output and cross-attention projections (raw and EMA) in a checkpoint."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for key, value in ckpt["state_dict"].items():
        if key.endswith(("final_layer.linear.weight", "cross_attn.proj.weight")) and not key.startswith("net."):
            ckpt["state_dict"][key] = torch.randn(value.shape, generator=g) * 0.3
    torch.save(ckpt, ckpt_path)


def build_tiny_run(tmp_path_factory) -> Path:
    """The root folder holding runs/shapes (and data/); built on first use, then reused by every module."""
    if "root" in _BUILT:
        return _BUILT["root"]
    from minisora.config import load_config
    from minisora.training.run import run_pipeline

    root = tmp_path_factory.mktemp("tiny_run")
    cwd = os.getcwd()
    os.chdir(root)  # runs/, data/ and the latent cache land under root
    try:
        run_pipeline(load_config(ROOT / "configs/shapes.yaml", TINY_RUN))
    finally:
        os.chdir(cwd)
    for ckpt in (root / "runs/shapes/checkpoints").glob("*.ckpt"):
        randomise_zero_layers(ckpt)
    _BUILT["root"] = root
    return root
