"""Fine-tuning through `minisora train`: LoRA and full fine-tunes from a base run, the load report, adapters
used by `sample --lora` and `merge-lora`, and the errors a user meets first."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from minisora.cli import main
from minisora.config import load_config
from minisora.pipeline import TextToVideoPipeline
from tiny_run import ROOT, TINY_RUN, build_tiny_run

LORA = ROOT / "configs" / "finetune" / "lora.yaml"
FULL = ROOT / "configs" / "finetune" / "full.yaml"
# A fine-tune of the tiny base: few steps, no sampling or scoring.
SHORT = ["trainer.max_steps=3", "trainer.checkpoint_every=3", "trainer.val_check_interval=3",
         "trainer.enable_progress_bar=false", "sample.every_n_steps=0", "sample.prompts=[]", "dit_train.warmup_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory)


@pytest.fixture
def in_root(root):
    cwd = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(cwd)


def train(config: Path, *overrides: str) -> int:
    return main(["train", "--config", str(config), *overrides])


def test_a_finetune_config_continues_the_base_run_config(in_root):
    cfg = load_config(LORA, ["init_from=runs/shapes"])
    base = load_config(ROOT / "configs/shapes.yaml", TINY_RUN)
    assert cfg.model == base.model and cfg.text == base.text  # the architecture comes from the base
    assert cfg.data.num_frames == base.data.num_frames and cfg.data.height == base.data.height
    assert Path(cfg.vae_weights).resolve() == (in_root / "runs/shapes/vae/vae.safetensors").resolve()
    assert cfg.name == "lora" and cfg.lora.rank == 16 and cfg.shapes is None  # the fine-tune's own keys win
    assert cfg.dit_train.lr == 1e-3 and cfg.dit_train.optimizer == "adamw8bit"
    over = load_config(LORA, ["init_from=runs/shapes", "data.manifest=mine.csv", "sample.steps=7"])
    assert over.data.manifest == "mine.csv" and over.sample.steps == 7


def test_lora_finetune_reports_what_loaded_and_writes_an_adapter_that_sampling_and_merging_use(in_root, capsys):
    assert train(LORA, "init_from=runs/shapes", "name=lora", "lora.rank=4", "lora.alpha=4", "dit_train.lr=0.05",
                 "dit_train.optimizer=adamw", *SHORT) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"init_from \S+ \(ema weights, step 4\): loaded every DiT tensor \(\d+ tensors", out), out
    assert re.search(r"LoRA rank 4, alpha 4 on self_attn, cross_attn, mlp: newly initialised 28 tensors", out)
    loss_at_start = float(re.search(r"validation loss of the loaded weights before step 1: ([\d.]+)", out).group(1))
    assert 0 < loss_at_start < 100
    adapter = in_root / "runs/lora/lora/adapter.safetensors"
    assert adapter.is_file() and adapter.stat().st_size < 200_000

    # The adapter on its base, the LoRA run's own checkpoint (merged on load) and a merged export agree.
    kw = dict(num_frames=5, height=32, width=32, steps=2, seed=3)
    with_adapter = TextToVideoPipeline.from_pretrained("runs/shapes", lora=adapter)(["a red circle moving left"], **kw)[0]
    run_ckpt = TextToVideoPipeline.from_pretrained("runs/lora")(["a red circle moving left"], **kw)[0]
    base = TextToVideoPipeline.from_pretrained("runs/shapes")(["a red circle moving left"], **kw)[0]
    assert (with_adapter.astype(int) - base.astype(int)).__abs__().max() > 0  # the adapter learned something
    assert abs(with_adapter.astype(int) - run_ckpt.astype(int)).max() <= 1
    assert main(["merge-lora", "--ckpt", "runs/shapes", "--lora", str(adapter), "--out", "merged"]) == 0
    merged = TextToVideoPipeline.from_pretrained("merged")(["a red circle moving left"], **kw)[0]
    assert abs(with_adapter.astype(int) - merged.astype(int)).max() <= 1
    assert main(["sample", "--ckpt", "runs/shapes", "--lora", str(adapter), "--lora-scale", "0.5", "--frames", "5",
                 "--steps", "2", "--prompt", "a red circle moving left", "--out", "lora_samples"]) == 0  # fmt: skip
    assert len(list(Path("lora_samples").glob("*.mp4"))) == 1

    # A rerun resumes the LoRA run and says so.
    assert train(LORA, "init_from=runs/shapes", "name=lora", "lora.rank=4", "lora.alpha=4", "dit_train.optimizer=adamw",
                 *SHORT[1:], "trainer.max_steps=5") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "resuming from" in out and "resumed: every tensor" in out
    assert "validation loss of the loaded weights before step 4" in out


def test_full_finetune_freezes_chosen_blocks_and_starts_the_ema_from_the_base(in_root, capsys):
    assert train(FULL, "init_from=runs/shapes", "name=full", "dit_train.lr=0.01", r"dit_train.freeze=[x_embedder,blocks\.0\.]",
                 *SHORT) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"frozen by dit_train.freeze: \d+ tensors \(x_embedder.weight", out)
    base = torch.load(next(Path("runs/shapes/checkpoints").glob("last.ckpt")), weights_only=True)["state_dict"]
    tuned = torch.load("runs/full/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(tuned["model.x_embedder.weight"], base["ema.module.x_embedder.weight"])
    assert torch.equal(tuned["model.blocks.0.mlp.fc1.weight"], base["ema.module.blocks.0.mlp.fc1.weight"])
    assert not torch.equal(tuned["model.blocks.1.mlp.fc1.weight"], base["ema.module.blocks.1.mlp.fc1.weight"])


def test_what_a_user_gets_wrong_first(in_root, capsys):
    assert train(LORA, "init_from=runs/shapes/vae/vae.safetensors", *SHORT) == 2
    err = capsys.readouterr().err
    assert "init_from: " in err and "an autoencoder (VAE) file, not a DiT checkpoint" in err
    assert train(LORA, "init_from=runs/shapes", "name=bad", "lora.targets=[blocks.9.attn]", *SHORT) == 2
    assert "lora target 'blocks.9.attn' matches no Linear layer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dit_train.freeze: 'nothing_here' matches no DiT parameter"):
        train(FULL, "init_from=runs/shapes", "name=bad2", "dit_train.freeze=[nothing_here]", *SHORT)
    assert train(LORA, "name=no_base", *SHORT) == 2
    assert "LoRA fine-tunes a trained model; set init_from=" in capsys.readouterr().err
    bogus = Path("bogus.safetensors")
    bogus.write_bytes(b"not an adapter")
    code = main(["sample", "--ckpt", "runs/shapes", "--lora", str(bogus), "--frames", "5", "--steps", "1"])
    assert code == 2 and "bogus.safetensors: not a LoRA adapter" in capsys.readouterr().err


def test_lora_on_the_text_encoder_trains_it_and_travels_in_the_adapter(in_root, capsys):
    from minisora.models.lora import read_adapter

    assert train(LORA, "init_from=runs/shapes", "name=lora_text", "lora.rank=4", "lora.text_encoder=true",
                 "dit_train.optimizer=adamw", "dit_train.lr=0.05", *SHORT) == 0  # fmt: skip
    assert "LoRA on the text encoder's MLPs" in capsys.readouterr().out
    adapter = Path("runs/lora_text/lora/adapter.safetensors")
    tensors, meta = read_adapter(adapter)
    text = {k: v for k, v in tensors.items() if k.startswith("text.")}
    assert text and all(".mlp.c_" in k for k in text)
    assert any(v.abs().max() > 0 for k, v in text.items() if "lora_B" in k)  # it trained (lora_B starts at 0)
    kw = dict(num_frames=5, height=32, width=32, steps=2, seed=3)
    plain = TextToVideoPipeline.from_pretrained("runs/shapes")(["a red circle moving left"], **kw)[0]
    tuned = TextToVideoPipeline.from_pretrained("runs/shapes", lora=adapter)(["a red circle moving left"], **kw)[0]
    assert abs(plain.astype(int) - tuned.astype(int)).max() > 0
    code = main(["merge-lora", "--ckpt", "runs/shapes", "--lora", str(adapter), "--out", "merged_text"])
    assert code == 2 and "also changes the text encoder" in capsys.readouterr().err
