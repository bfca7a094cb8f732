"""Released models trained by minisora's own trainer: `minisora train` with configs/finetune/wan2.1-t2v-1.3b-lora.yaml
on a tiny random-weight Wan2.1 folder (tests/released_folders.py) and four tiny clips, end to end on the CPU.

The run's adapter loads in diffusers' WanPipeline.load_lora_weights and gives minisora's latents; the run folder
loads as a pipeline; a resumed run equals an uninterrupted one; the full fine-tune variant trains and samples.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
pytest.importorskip("transformers", reason="needs transformers: pip install -e .[diffusers]")

import released_folders as rf  # noqa: E402
from test_released_parity import GUIDANCE, SEED, STEPS, TOLERANCE, pipeline_latents, relative_error  # noqa: E402

from minisora.cli import main  # noqa: E402

CAPTIONS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
            "a white cat runs on the black background"]  # fmt: skip
TINY = ["data.num_frames=9", "data.height=32", "data.width=32", "data.fps=null", "data.num_workers=0",
        "latents.dit_batch_size=2", "latents.val_fraction=0.25", "latents.encode_batch_size=2", "pretrained.dtype=float32",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=2", "trainer.checkpoint_every=2", "trainer.log_every_n_steps=1",
        "dit_train.warmup_steps=1", "lora.rank=4", "lora.alpha=8"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, tiny Wan2.1 folder, manifest of 4 captioned 9-frame clips)."""
    import numpy as np

    from minisora.io import write_video

    root = tmp_path_factory.mktemp("released-train")
    folder = rf.build_folder(root, "wan21")  # the other families: test_each_family_trains_a_step
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        frames = (rng.random((17, 64, 64, 3)) * 255).astype(np.uint8)  # LTX-Video's tiny folder takes 17x64x64
        rows.append({"path": str(write_video(frames, root / f"clip{i}.mp4", fps=8)), "caption": caption})
    manifest = root / "clips.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root, folder, manifest


def train(setup, name: str, *extra: str, config: str = "configs/finetune/wan2.1-t2v-1.3b-lora.yaml") -> int:
    root, folder, manifest = setup
    args = ["train", "--config", str(rf.ROOT / config), f"pretrained.path={folder}", f"data.path={manifest}",
            f"name={name}", f"run_dir={root / 'runs'}", f"latents.cache_root={root / 'cache'}", *TINY,
            *extra]  # fmt: skip
    if "full" in config:
        args = [a for a in args if not a.startswith("lora.")]
    return main(args)


def adapter(setup, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(setup[0] / "runs" / name / "lora" / "pytorch_lora_weights.safetensors"))


def test_lora_run_loads_in_diffusers_with_minisora_latents(setup, capsys):
    """A LoRA fine-tune through `minisora train`: adapter in diffusers' format with its alpha; WanPipeline with
    load_lora_weights gives the latents of from_pretrained("runs/NAME"); the adapter moved them."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    from minisora.pipeline import TextToVideoPipeline

    root, folder, _ = setup
    assert train(setup, "lora", "trainer.max_steps=3", "dit_train.lr=0.05") == 0
    out = capsys.readouterr().out
    assert "loaded every transformer tensor" in out and "LoRA rank 4, alpha 8" in out and "shifted by 3" in out
    run = root / "runs" / "lora"
    file = run / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta[LORA_ADAPTER_METADATA_KEY])["transformer.lora_alpha"] == 8
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert all(adapter(setup, "lora")[k].abs().max() > 0 for k in keys if "lora_B" in k)  # it trained
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # the frozen base is not stored

    pipe = TextToVideoPipeline.from_pretrained(run)
    F, H, W = rf.CLIPS["wan21"]
    pipe.negative_prompt = rf.NEGATIVE
    ours = pipe.sample_latents([rf.PROMPT], num_frames=F, height=H, width=W, steps=STEPS, guidance=GUIDANCE,
                               seed=SEED, sampler="default")  # fmt: skip
    ref = pipeline_latents(folder, "wan21", "default", lora=file)
    base = pipeline_latents(folder, "wan21", "default")
    print(f"trained LoRA: diffusers vs minisora {relative_error(ours, ref):.2e}, vs base "
          f"{relative_error(base, ref):.2e}")  # fmt: skip
    assert relative_error(ours, ref) <= TOLERANCE
    assert relative_error(base, ref) > 100 * TOLERANCE

    # minisora sample on the run folder writes a video
    rc = main(["sample", "--ckpt", str(run), "--prompt", rf.PROMPT, "--steps", "2", "--frames", "9", "--height", "32",
               "--width", "32", "--sampler", "default", "--out", str(root / "samples"), "--device", "cpu"])  # fmt: skip
    assert rc == 0 and list((root / "samples").glob("*.mp4"))

    # minisora export writes original-Wan / ComfyUI keys, which diffusers converts back to the same latents
    assert main(["export", "--ckpt", str(run), "--out", str(root / "comfy.safetensors")]) == 0
    with safe_open(str(root / "comfy.safetensors"), "pt") as f:
        assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in set(f.keys())
    comfy = pipeline_latents(folder, "wan21", "default", lora=root / "comfy.safetensors")
    assert relative_error(comfy, ref) <= TOLERANCE


def test_lora_run_resumes_exactly(setup, capsys):
    """4 steps in one go equal 2 steps, a stop, and a resumed run to step 4 (adapter tensors equal)."""
    assert train(setup, "whole", "trainer.max_steps=4") == 0
    assert train(setup, "parts", "trainer.max_steps=2") == 0
    half = adapter(setup, "parts")
    capsys.readouterr()
    assert train(setup, "parts", "trainer.max_steps=4") == 0
    assert "resuming from" in capsys.readouterr().out
    whole, parts = adapter(setup, "whole"), adapter(setup, "parts")
    assert any((half[k] - parts[k]).abs().max() > 0 for k in half)  # the resumed run trained on
    assert whole.keys() == parts.keys()
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=0, atol=0)


def test_full_finetune_trains_and_samples(setup):
    """The full variant trains every weight for a step, writes transformer/ and samples from the run folder."""
    from minisora.pipeline import TextToVideoPipeline

    root, folder, _ = setup
    freeze = r"dit_train.freeze=[transformer\.blocks\.0\.]"
    assert train(setup, "full", "trainer.max_steps=1", "dit_train.lr=0.01", freeze,
                 config="configs/finetune/wan2.1-t2v-1.3b-full.yaml") == 0  # fmt: skip
    run = root / "runs" / "full"
    assert (run / "transformer" / "config.json").is_file()
    from safetensors.torch import load_file

    tuned_w = load_file(str(next((run / "transformer").glob("*.safetensors"))))
    base_w = load_file(str(next((folder / "transformer").glob("*.safetensors"))))
    changed = {k for k in base_w if not torch.equal(tuned_w[k], base_w[k])}
    assert any(k.startswith("blocks.0.") for k in base_w)
    assert changed and not {k for k in changed if k.startswith("blocks.0.")}  # dit_train.freeze held block 0
    pipe = TextToVideoPipeline.from_pretrained(run)
    base = TextToVideoPipeline.from_pretrained(folder)
    kw = dict(num_frames=9, height=32, width=32, steps=2, guidance=3.0, seed=0, sampler="euler")
    tuned, original = pipe.sample_latents([rf.PROMPT], **kw), base.sample_latents([rf.PROMPT], **kw)
    assert tuned.shape == original.shape == (1, 16, 3, 4, 4)
    assert relative_error(tuned, original) > 100 * TOLERANCE


def test_bad_released_configs_are_named(setup, capsys):
    root, folder, manifest = setup
    assert train(setup, "bad", "dit_train.prediction=x0") == 2
    assert "dit_train.prediction='x0'; released models predict velocity" in capsys.readouterr().err
    assert train(setup, "bad", "lora.text_encoder=true") == 2
    assert "lora.text_encoder=true" in capsys.readouterr().err
    rc = main(["train", "--config", str(rf.ROOT / "configs/finetune/wan2.1-t2v-1.3b-lora.yaml"),
               f"data.path={manifest}"])  # fmt: skip
    assert rc == 2 and "required keys not set: pretrained.path" in capsys.readouterr().err
    rc = main(["train", "--config", str(rf.ROOT / "configs/finetune/wan2.1-t2v-1.3b-lora.yaml"),
               f"pretrained.path={folder}", f"run_dir={root / 'runs'}"])  # fmt: skip
    assert rc == 2 and "data.path is not set" in capsys.readouterr().err
    assert train(setup, "bad", f"pretrained.path={root / 'nowhere'}") == 2
    assert "no such folder" in capsys.readouterr().err
    assert train(setup, "bad", f"init_from={root / 'runs' / 'lora'}") == 2
    assert "init_from loads minisora DiT weights; a released model starts from pretrained.path" in \
        capsys.readouterr().err  # fmt: skip
    rc = main(["train", "--config", str(rf.ROOT / "configs/finetune/lora.yaml"), f"init_from={folder}"])
    assert rc == 2 and "is a released model" in capsys.readouterr().err


def test_cache_holds_the_pipelines_prompt_embeddings(setup):
    """`minisora cache` encodes captions exactly as WanPipeline.encode_prompt (umT5, zero-padded to 512 tokens) and
    clips into the transformer's latent channels."""
    import diffusers

    from minisora.data.latent_store import LatentStore

    root, folder, manifest = setup
    assert main(["cache", "--config", str(rf.ROOT / "configs/finetune/wan2.1-t2v-1.3b-lora.yaml"),
                 f"pretrained.path={folder}", f"data.path={manifest}", f"latents.cache_root={root / 'cache'}",
                 *[a for a in TINY if not a.startswith(("trainer.", "dit_train.", "lora."))]]) == 0  # fmt: skip
    (key,) = [d for d in (root / "cache").iterdir() if (d / "buckets.json").is_file() and
              json.loads((d / "buckets.json").read_text())["source"] == str(manifest)][:1]  # fmt: skip
    store = LatentStore(key)
    batch = store.read(0, list(range(store.count(0))))
    assert batch["latents"].shape == (4, 16, 3, 4, 4) and batch["context"].shape[1:] == (512, rf.TEXT_DIM)
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(batch["caption"], do_classifier_free_guidance=False, max_sequence_length=512)
    assert sorted(batch["caption"]) == sorted(CAPTIONS)
    torch.testing.assert_close(batch["context"], ref.float(), rtol=2e-3, atol=2e-3)  # float16 in the cache
    assert (batch["context"][:, 20:] == 0).all()  # zero past the prompt: part of Wan's input


@pytest.mark.parametrize("family, config", [("wan22", "wan2.2-ti2v-5b-lora"), ("ltx", "ltx-video-2b-lora")])
def test_each_family_trains_a_step(setup, family, config, capsys):
    """Wan2.2 TI2V (48 channels, per-token timesteps) and LTX-Video (packed tokens, text mask, dynamic shift) train
    through the same stage, with an EMA of the LoRA-wrapped model; the adapter is written and loads back."""
    from minisora.pipeline import TextToVideoPipeline

    root = setup[0]
    folder = rf.build_folder(root, family)
    F, H, W = rf.CLIPS[family]
    size = [f"data.num_frames={F}", f"data.height={H}", f"data.width={W}"]
    if family == "wan22":  # buckets sized for the released VAE (16x) and patch (2): multiples of 32 pixels
        size.append(f"buckets={{resolutions: {{{H}px: [{F}, 5]}}, aspect_ratios: ['1:1', '2:1'], max_upscale: 2.0}}")
    assert train(setup, family, f"pretrained.path={folder}", "trainer.max_steps=2", "dit_train.ema_decay=0.9",
                 "dit_train.lr=0.05", *size, config=f"configs/finetune/{config}.yaml") == 0  # fmt: skip
    out = capsys.readouterr().out
    shift = {"wan22": "shifted by 5", "ltx": "shifted by "}[family]
    assert shift in out and "EMA on" in out
    # sizes and tokens from the released VAE (4x16x16) and patch (1x2x2): 5x32x96 -> 2x1x3 patches
    assert family != "wan22" or "4 bucket sizes from 5x32x96 (6 tokens) to 9x64x64 (12 tokens)" in out
    pipe = TextToVideoPipeline.from_pretrained(root / "runs" / family)
    base = TextToVideoPipeline.from_pretrained(folder)
    kw = dict(num_frames=F, height=H, width=W, steps=2, guidance=3.0, seed=0, sampler="default")
    tuned, original = pipe.sample_latents([rf.PROMPT], **kw), base.sample_latents([rf.PROMPT], **kw)
    assert tuned.shape == original.shape and relative_error(tuned, original) > 100 * TOLERANCE


def test_load_pretrained_options_and_a_cache_of_other_channels(setup, tmp_path):
    """pretrained.gradient_checkpointing and quantize act on the transformer; a bad quantize value and cached
    latents whose channels are not the transformer's are errors naming the key or file."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from minisora.config import ConfigError
    from minisora.models.quantized import is_int8
    from minisora.training.released_stage import check_channels, load_pretrained

    folder = setup[1]
    model = load_pretrained(str(folder), quantize="int8")
    assert model.denoiser.transformer.is_gradient_checkpointing and is_int8(model.denoiser.transformer)
    plain = load_pretrained(str(folder), gradient_checkpointing=False)
    assert not plain.denoiser.transformer.is_gradient_checkpointing and not is_int8(plain.denoiser.transformer)
    with pytest.raises(ConfigError, match="pretrained.quantize must be null or 'int8', got 'fp4'"):
        load_pretrained(str(folder), quantize="fp4")

    (tmp_path / "9x32x32").mkdir()
    (tmp_path / "buckets.json").write_text(json.dumps({"buckets": [{"name": "9x32x32"}]}))
    (tmp_path / "9x32x32" / "index.json").write_text(json.dumps({"latent_shape": [48, 3, 4, 4]}))
    cfg = OmegaConf.create({"pretrained": {"path": str(folder)}})
    with pytest.raises(ConfigError, match=r"9x32x32/index.json: latents of 48 channels, but .* in_channels 16"):
        check_channels(cfg, plain, SimpleNamespace(folder=tmp_path))
