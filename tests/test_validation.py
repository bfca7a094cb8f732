"""The fixed-grid validation loss (training.validation), the best checkpoint it keeps, and samples as TensorBoard videos."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from test_lit_dit import LATENT, VIDEO, synthetic_cache, tiny_lit

from minisora.checkpoint import CheckpointError, best_checkpoint, checkpoint_step
from minisora.data.latent_datamodule import LatentDataModule
from minisora.models.text import TextEncoder
from minisora.training import validation
from minisora.training.preview import video_summary


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder(model_name="tiny", width=32, layers=1, heads=1, context_length=16)


def val_datamodule(root: Path, key: str, batch_size: int) -> LatentDataModule:
    dm = LatentDataModule(video=VIDEO, vae=None, text_encoder=None, cache_root=str(root), dit_batch_size=batch_size,
                          num_workers=0, val_fraction=0.25)  # fmt: skip
    dm._key = key
    dm.setup("fit")
    return dm


def test_grid_and_noise_depend_on_the_clip_only():
    assert torch.allclose(validation.t_grid(8), torch.tensor([1, 3, 5, 7, 9, 11, 13, 15], dtype=torch.float64) / 16)
    for bad in (0, 3, 6):
        with pytest.raises(ValueError, match="val_t_points must be a positive multiple of 4"):
            validation.t_grid(bad)
    x0 = torch.zeros(3, *LATENT)
    ids = [(5, 8, 8, 0), (5, 8, 8, 7), (5, 8, 8, 2)]
    noise = validation.fixed_noise(x0, ids, seed=0, k=1)  # (3, C, t, h, w)
    alone = validation.fixed_noise(x0[:1], ids[1:2], seed=0, k=1)
    assert torch.equal(noise[1:2], alone)  # the same clip draws the same noise in any batch, at any position
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise, validation.fixed_noise(x0, ids, 0, 2))
    assert not torch.equal(noise, validation.fixed_noise(x0, ids, seed=1, k=1))
    with pytest.raises(ValueError, match=r"batch\['index'\]"):
        validation.clip_ids({"latents": x0})


def test_validation_loss_is_bit_identical_across_evaluations_and_batchings(text, tmp_path):
    key = synthetic_cache(tmp_path, text, n=16)
    lit = tiny_lit(text, val_t_points=8)
    torch.nn.init.normal_(lit.model.final_layer.linear.weight, std=0.1)  # zero-initialised: make the output vary
    dm = val_datamodule(tmp_path, key, batch_size=4)
    first, again = lit.evaluate_loss(dm.val_dataloader()), lit.evaluate_loss(dm.val_dataloader())
    assert first == again and np.isfinite(first)
    dm2 = val_datamodule(tmp_path, key, batch_size=1)  # other batches: per-clip noise keeps the value
    assert lit.evaluate_loss(dm2.val_dataloader()) == pytest.approx(first, rel=1e-6)
    batch = next(iter(dm.val_dataloader()))
    losses = lit.val_losses(batch)  # (B, 8)
    assert losses.shape == (4, 8)
    quarters = validation.quarter_means(losses)
    assert len(quarters) == 4 and torch.allclose(torch.stack(quarters).mean(), losses.mean())


class ValRecorder(L.Callback):
    """(global step, val/loss) after each validation."""

    def __init__(self):
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.history.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def test_validation_loss_falls_and_best_ckpt_holds_its_lowest_step(text, tmp_path):
    L.seed_everything(0, verbose=False)
    key = synthetic_cache(tmp_path, text, n=16)
    lit = tiny_lit(text, lr=1e-2, warmup_steps=5)
    rec = ValRecorder()
    run = tmp_path / "run"
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_steps=30,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=6,
                        check_val_every_n_epoch=None, callbacks=[rec, validation.best_checkpoint_callback(run)])
    dm = val_datamodule(tmp_path, key, batch_size=4)
    start = lit.evaluate_loss(dm.val_dataloader())  # zero output at init: E|noise - x0|^2 = 1 + E[x0^2] ~ 2.1
    trainer.fit(lit, datamodule=dm)
    steps, losses = zip(*rec.history)
    assert steps == (6, 12, 18, 24, 30)
    # measured: 2.1 at the start, then 1.31, 1.04, 0.92, 0.84, 0.71
    assert 1.8 < start < 2.4 and losses[-1] < 0.5 * start and losses[-1] < 0.75 * losses[0], (start, losses)
    for q in range(1, 5):
        assert f"val/loss_q{q}" in trainer.callback_metrics
    best = best_checkpoint(run)
    assert best == run / "checkpoints" / "best.ckpt" and sorted(p.name for p in best.parent.iterdir()) == ["best.ckpt"]
    assert checkpoint_step(best) == steps[int(np.argmin(losses))]


class ScriptedLoss(L.LightningModule):
    """A module whose validation loss is a script: 3, 1, 2, 4 at its four validations."""

    SCRIPT = (3.0, 1.0, 2.0, 4.0)

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log(validation.MONITOR, self.SCRIPT[self.validations])

    def on_validation_epoch_end(self):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(40, 2), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(2, 2), batch_size=2)


def test_best_pointer_names_the_lowest_val_loss_not_the_newest(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_steps=8,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=2,
                        check_val_every_n_epoch=None, callbacks=[validation.best_checkpoint_callback(tmp_path)])
    trainer.fit(ScriptedLoss())
    best = best_checkpoint(tmp_path)
    assert checkpoint_step(best) == 4  # the validation at step 4 scored 1.0; steps 6 and 8 were worse
    with pytest.raises(CheckpointError, match="no best.ckpt"):
        best_checkpoint(tmp_path / "elsewhere")


def test_video_summary_is_a_gif_with_every_frame(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader  # raw events
    from torch.utils.tensorboard import SummaryWriter

    video = np.random.default_rng(0).integers(0, 256, (9, 16, 24, 3), dtype=np.uint8)  # (T, H, W, 3)
    writer = SummaryWriter(str(tmp_path))
    writer._get_file_writer().add_summary(video_summary("videos/x", video, fps=8), 3)
    writer.close()
    [events] = list(tmp_path.glob("events.out.tfevents.*"))
    values = [(e.step, v) for e in LegacyEventFileLoader(str(events)).Load() for v in e.summary.value]
    [(step, value)] = [(s, v) for s, v in values if v.tag == "videos/x"]
    assert step == 3 and (value.image.height, value.image.width, value.image.colorspace) == (16, 24, 3)
    gif = Image.open(io.BytesIO(value.image.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (24, 16)
    gif.seek(4)
    assert np.abs(np.asarray(gif.convert("RGB")).astype(int) - video[4]).mean() < 40  # a palette of the same frame


def test_the_tiny_run_logs_playable_videos_and_keeps_a_best_checkpoint(tmp_path_factory):
    """The real `minisora train` pipeline (tests/tiny_run.py): TensorBoard gets each sample prompt as a GIF video."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tiny_run import build_tiny_run

    run = build_tiny_run(tmp_path_factory) / "runs" / "shapes"
    assert checkpoint_step(best_checkpoint(run)) in (2, 4)  # it validates at steps 2 and 4
    events = sorted((run / "logs" / "dit").glob("events.out.tfevents.*"))
    videos = {v.tag: v.image for e in events for ev in [LegacyEventFileLoader(str(e)).Load()] for x in ev
              for v in x.summary.value if v.tag.startswith("videos/")}  # fmt: skip
    assert set(videos) == {"videos/a-red-circle-moving-left", "videos/a-blue-square-moving-up",
                           "videos/a-green-triangle-moving-right"}, sorted(videos)  # fmt: skip
    gif = Image.open(io.BytesIO(videos["videos/a-red-circle-moving-left"].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 17 and gif.size == (32, 32)


def test_in_run_clip_score_needs_weights_and_scores_the_prompts(tmp_path, monkeypatch):
    import open_clip

    from minisora.training.preview import PreviewSamples

    tiny = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
            "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2,
            "layers": 1}}  # fmt: skip
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "minisora-test-clip", tiny)
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.CLIP(**tiny).state_dict(), weights)
    prompts = ["a red circle moving left", "a blue square moving up"]
    with pytest.raises(ValueError, match="sample.clip_pretrained"):
        PreviewSamples(None, None, tmp_path, prompts=prompts, clip_model="minisora-test-clip")
    cb = PreviewSamples(None, None, tmp_path, prompts=prompts, clip_model="minisora-test-clip", clip_pretrained=str(weights))
    videos = [np.random.default_rng(i).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8) for i in range(2)]
    score = cb._clip_score(videos, torch.device("cpu"))
    assert 0 <= score <= 100 and score == cb._clip_score(videos, torch.device("cpu"))
