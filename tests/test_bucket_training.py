"""Bucketed data end to end: raw clips and the latent cache agree, T=1 steps train, data-stats, sampling any bucket."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from minisora.data.buckets import BucketSpec, Geometry
from minisora.data.datamodule import VideoDataModule
from minisora.data.latent_datamodule import LatentDataModule
from minisora.data.latent_store import LatentRows, LatentStore
from minisora.data.shapes import make_shapes
from minisora.io import read_clip, write_video
from minisora.models.autoencoder import VideoVAE
from minisora.models.dit import VideoDiT
from minisora.models.text import TextEncoder
from minisora.training.lit_dit import LitVideoDiT
from tiny_run import ROOT, TINY_RUN

GEOMETRY = Geometry(temporal=4, spatial=4, patch=(1, 2, 2))
VARIANTS = ["9x32x32", "5x24x40", "9x40x24"]  # square, landscape and portrait shapes clips of two lengths
SPEC = dict(resolutions={"32px": [1, 5, 9]}, aspect_ratios=["1:1", "16:9", "9:16"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Shapes at three sizes, plus a clip smaller than every bucket and a corrupt file, in one manifest."""
    root = tmp_path_factory.mktemp("bucket_data")
    manifest = make_shapes(root, num=18, variants=VARIANTS)
    write_video(np.zeros((9, 8, 8, 3), np.uint8), root / "tiny.mp4", fps=8)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with open(manifest, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("tiny.mp4", "a tiny clip"), ("corrupt.mp4", "a broken clip")])
    return manifest


def video_module(manifest: Path, **kw) -> VideoDataModule:
    spec = BucketSpec(**{**SPEC, **kw.pop("spec", {})})
    args = dict(path=str(manifest), num_workers=0, vae_batch_size=2, val_fraction=0.0, buckets=spec, geometry=GEOMETRY)
    return VideoDataModule(**{**args, **kw})


def test_raw_clips_come_in_one_bucket_batches_at_their_bucket_size(dataset):
    dm = video_module(dataset)
    dm.setup("fit")
    names = [b.name for b in dm.train_buckets]
    assert names == ["9x32x32", "9x40x24", "5x24x40"]  # the 9-frame square/portrait and 5-frame landscape clips
    assert [len(d) for d in dm.train_set.datasets] == [6, 6, 6]
    skipped = {Path(p).name: why for p, why in dm.assignment.skipped}
    assert set(skipped) == {"tiny.mp4", "corrupt.mp4"}
    assert skipped["tiny.mp4"].startswith("too small: 8x8")  # never upscaled (max_upscale 1)
    shapes = set()
    for batch in dm.train_dataloader():
        b = dm.train_buckets[batch["bucket"]]
        assert batch["video"].shape[1:] == (3, b.frames, b.height, b.width)
        assert all(f"/{b.name}/" in p for p in batch["path"])  # each clip sits in its own size's bucket
        shapes.add(tuple(batch["video"].shape[2:]))
    assert shapes == {(9, 32, 32), (9, 40, 24), (5, 24, 40)}


def test_the_latent_cache_assigns_exactly_as_the_raw_path_with_one_folder_per_bucket(dataset, tmp_path):
    torch.manual_seed(0)
    vae = VideoVAE(latent_channels=4, base_channels=8, channel_multipliers=[1, 2, 2], temporal_compression=4,
                   spatial_compression=4).eval()  # fmt: skip
    text = TextEncoder(model_name="tiny", width=32, layers=1, heads=1, context_length=16)
    video = video_module(dataset)
    latents = LatentDataModule(video, vae, text, cache_root=str(tmp_path), dit_batch_size=2, val_fraction=0.0)
    latents.prepare_data()
    index = json.loads((latents.folder / "buckets.json").read_text())
    raw = video_module(dataset)
    raw.setup("fit")
    raw_assignment = {r.path: b.name for b, d in zip(raw.train_buckets, raw.train_set.datasets) for r in d.records}
    assert index["assignment"] == raw_assignment
    assert {Path(p).name for p in index["skipped"]} == {"tiny.mp4", "corrupt.mp4"}
    store = LatentStore(latents.folder)
    for k, entry in enumerate(index["buckets"]):
        cached = LatentRows(store, k)
        assert len(cached) == entry["count"] == 6
        shape = list(vae.latent_shape(entry["frames"], entry["height"], entry["width"]))
        assert cached.meta["latent_shape"] == shape and list(cached[5]["latents"].shape) == shape
    latents.setup("fit")
    for batch in latents.train_dataloader():
        b = latents.train_buckets[batch["bucket"]]
        assert batch["latents"].shape[2:] == vae.latent_shape(b.frames, b.height, b.width)[1:]
    # A second prepare reuses every bucket (nothing encoded again).
    latents2 = LatentDataModule(video_module(dataset), vae, text, cache_root=str(tmp_path), dit_batch_size=2)
    before = {p: p.stat().st_mtime_ns for p in latents.folder.rglob("*.safetensors")}
    latents2.prepare_data()
    assert {p: p.stat().st_mtime_ns for p in latents.folder.rglob("*.safetensors")} == before


def test_one_frame_latents_train_a_step_through_rope_and_padding():
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=16, patch_size=[2, 2, 2])
    lit = LitVideoDiT(model, null_context=torch.zeros(4, 16), null_mask=torch.ones(4, dtype=torch.bool),
                      optimizer="adamw", warmup_steps=1, lr=1e-2)  # fmt: skip
    for p in model.final_layer.parameters():  # zero-initialised: give the image loss a path to every weight
        torch.nn.init.normal_(p, std=0.02)
    batch = {"latents": torch.randn(3, 4, 1, 8, 8), "context": torch.randn(3, 4, 16),
             "context_mask": torch.ones(3, 4, dtype=torch.bool), "caption": ["a", "b", "c"]}  # fmt: skip
    losses, t = lit._losses(batch)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    losses.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["x_embedder.weight"].abs().sum() > 0 and grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
    out = model(torch.randn(2, 4, 1, 8, 8), torch.rand(2), context=torch.randn(2, 4, 16))
    assert out.shape == (2, 4, 1, 8, 8)  # time padded to the temporal patch of 2, then cropped back


class RecordShapes(L.Callback):
    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self.batches: list[tuple[int, tuple[str, ...]]] = []  # (index in its epoch, captions)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        key = "latents" if "latents" in batch else "video"
        self.shapes.append((key, *batch[key].shape))
        self.batches.append((batch_idx, tuple(batch["caption"])))


@pytest.mark.slow
def test_pipeline_trains_on_buckets_with_image_batches_and_samples_every_bucket(dataset, tmp_path, monkeypatch):
    from minisora.cli import main
    from minisora.config import load_config
    from minisora.training import run

    recorders: dict[str, RecordShapes] = {}
    build = run.build_trainer

    def build_trainer(tcfg, folder, callbacks, tag, **kw):
        recorders[tag] = RecordShapes()
        return build(tcfg, folder, [*callbacks, recorders[tag]], tag, **kw)

    monkeypatch.setattr(run, "build_trainer", build_trainer)
    monkeypatch.chdir(tmp_path)
    overrides = [
        *TINY_RUN, "shapes=null", f"data.path={dataset}", "buckets.resolutions={32px: [1, 5, 9]}",
        'buckets.aspect_ratios=["1:1","16:9","9:16"]', "buckets.image_fraction=0.3", "trainer.max_steps=12",
        "latents.val_fraction=0.0", "data.val_fraction=0.0", "trainer.limit_val_batches=0",
    ]  # fmt: skip
    run.run_pipeline(load_config(ROOT / "configs/shapes.yaml", overrides))
    dit = recorders["dit"].shapes
    assert len(dit) == 12
    frames = [s[3] for s in dit]  # latent frames: 1 + (T - 1) // 4
    assert set(frames) <= {1, 2, 3} and 1 in frames and (2 in frames or 3 in frames)
    vae_shapes = {s[3:] for s in recorders["vae"].shapes}
    assert vae_shapes <= {(9, 32, 32), (9, 40, 24), (5, 24, 40), (1, 32, 32), (1, 40, 24), (1, 24, 40)}
    # Every bucket's size samples: a portrait image and a landscape clip, at the sizes the buckets have.
    for aspect, T, size in (("9:16", "1", (40, 24)), ("16:9", "5", (24, 40))):
        out = tmp_path / f"samples-{T}"
        assert main(["sample", "--ckpt", "runs/shapes", "--aspect", aspect, "--frames", T, "--steps", "2",
                     "--prompt", "a red circle moving left", "--out", str(out)]) == 0  # fmt: skip
        clip = read_clip(next(out.glob("*.mp4")))
        assert clip.shape[:3] == (int(T), *size)

    # Resume mid-epoch: drop the last checkpoints so a rerun starts at step 10; it must reach the same weights.
    ckpts = tmp_path / "runs" / "shapes" / "checkpoints"
    final = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 12
    for name in ("last.ckpt", "step-000012.ckpt"):
        (ckpts / name).unlink()
    reference = recorders["dit"].batches
    assert reference[10][0] > 0  # step 11 is not the first batch of an epoch: step 10 is a mid-epoch checkpoint
    recorders.clear()
    run.run_pipeline(load_config(ROOT / "configs/shapes.yaml", overrides))
    assert recorders["dit"].shapes == dit[10:]  # steps 11 and 12 only, from the same buckets
    assert recorders["dit"].batches == reference[10:]  # and the same clips at the same place in the epoch
    resumed = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 12
    for key, value in final["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_data_stats_prints_buckets_skips_and_the_token_histogram(dataset, tmp_path, capsys):
    from minisora.cli import main

    args = ["data-stats", "--config", str(ROOT / "configs/shapes.yaml"), "shapes=null", f"data.path={dataset}",
            f"run_dir={tmp_path}", "buckets.resolutions={32px: [1, 5, 9]}", 'buckets.aspect_ratios=["1:1","16:9","9:16"]',
            "latents.dit_batch_size=4", "--json", str(tmp_path / "stats.json")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    stats = json.loads((tmp_path / "stats.json").read_text())
    rows = {r["bucket"]: r for r in stats["buckets"]}
    assert {k: r["clips"] for k, r in rows.items() if r["clips"]} == {"9x32x32": 6, "9x40x24": 6, "5x24x40": 6}
    assert rows["9x32x32"]["dit_batch"] == 4 and rows["5x24x40"]["dit_batch"] == 4 * 48 // 30
    assert stats["skipped_by_reason"] == {"too small": 1, "unreadable": 1}
    assert stats["token_histogram"] == {"30": 6, "45": 6, "48": 6}
    assert "too small: 1" in out and "unreadable: 1" in out and "DiT tokens per clip" in out
    assert "18 clips in 3 of 9 buckets; 2 skipped" in out
    # A bucket set no clip fits: the error lists the clip sizes seen; exit code 2, one line.
    assert main([*args[:-2], "buckets.resolutions={256px: [17]}"]) == 2
    err = capsys.readouterr().err
    assert "no clip fits any bucket" in err and "widths 8-40, heights 8-40 pixels" in err


def test_fixed_size_data_stats_reports_the_one_size(dataset, tmp_path, capsys):
    from minisora.cli import main

    assert main(["data-stats", "--config", str(ROOT / "configs/shapes.yaml"), "shapes=null", f"data.path={dataset}",
                 f"run_dir={tmp_path}", "data.num_frames=9"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    # 9x32x32 data: square and portrait clips fit (cropped), the 5-frame ones are too short, and the 8x8 clip
    # fits through data.max_upscale (4) where buckets (max_upscale 1) skip it.
    assert "13 clips in 1 of 1 buckets; 7 skipped" in out and "too short: 6" in out and "unreadable: 1" in out
