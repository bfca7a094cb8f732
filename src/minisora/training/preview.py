"""PreviewSamples: sample fixed prompts from the EMA model during and after training (mp4 + TensorBoard strips)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from minisora.files import slug
from minisora.io import film_strip, save_video
from minisora.pipeline import TextToVideoPipeline


def training_pipeline(
    trainer: L.Trainer, pl_module: L.LightningModule, model: torch.nn.Module, vae: torch.nn.Module,
    text_encoder: torch.nn.Module | None, fps: float,
) -> TextToVideoPipeline:  # fmt: skip
    """A pipeline over `model` (the gathered EMA) that samples at the training clip size, on the module's device."""
    clip = trainer.datamodule.video.clip_args
    T, H, W = clip["num_frames"], clip["height"], clip["width"]
    vae.to(pl_module.device)
    if text_encoder is not None:
        text_encoder.to(pl_module.device)
    return TextToVideoPipeline(
        model, vae, text_encoder, prediction=pl_module.prediction,
        t_shift=pl_module.t_shift, num_frames=T, height=H, width=W, fps=fps,
    )  # fmt: skip


def due(trainer: L.Trainer, every_n_steps: int) -> bool:
    """True at every `every_n_steps`-th step before the last one (the end of training samples anyway)."""
    step = trainer.global_step
    return every_n_steps > 0 and step > 0 and step % every_n_steps == 0 and step < trainer.max_steps


class PreviewSamples(L.Callback):
    """Every `every_n_steps` and at the end: sample `prompts` with the EMA weights and a fixed seed.

    Videos go to `<folder>/step-XXXXXX/*.mp4` and to TensorBoard. steps, guidance, sampler, seed and fps are
    also the defaults of `minisora sample` for the run (the checkpoint stores this section).
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module | None,
        folder: str | Path,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        steps: int = 25,
        guidance: float = 4.0,
        sampler: str = "euler",
        seed: int = 0,
        fps: float = 8,
    ):
        self.vae, self.text_encoder, self.folder = vae, text_encoder, Path(folder)
        self.every_n_steps, self.prompts = every_n_steps, list(prompts or [])
        self.kw = dict(steps=steps, guidance=guidance, sampler=sampler)
        self.seed, self.fps = seed, fps

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.prompts:
            return
        model = pl_module.full_ema()  # every rank: under FSDP this gathers the EMA's shards to rank 0
        if not trainer.is_global_zero:
            return
        pipe = training_pipeline(trainer, pl_module, model, self.vae, self.text_encoder, self.fps)
        step = trainer.global_step
        out = self.folder / f"step-{step:06d}"
        videos = pipe(self.prompts, seed=self.seed, **self.kw)
        tb = getattr(trainer.logger, "experiment", None)
        for p, v in zip(self.prompts, videos):
            save_video(v, out / f"{slug(p)}.mp4", fps=self.fps)
            if tb is not None and hasattr(tb, "add_image"):
                # A strip of frames: TensorBoard's add_video would need moviepy, a heavy extra dependency.
                tb.add_image(f"samples/{slug(p)}", film_strip(v), step, dataformats="HWC")
        self.vae.cpu()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due(trainer, self.every_n_steps):
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._sample(trainer, pl_module)
