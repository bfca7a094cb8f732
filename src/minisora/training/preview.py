"""PreviewSamples: sample fixed prompts from the EMA model during and after training (mp4, TensorBoard videos and
strips, an optional CLIP score); log_scores: the one place in-run scores go (TensorBoard and scores.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch

from minisora.files import slug
from minisora.io import film_strip, gif_bytes, save_video
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


def video_summary(tag: str, video: np.ndarray, fps: float):
    """A TensorBoard summary that plays uint8 (T, H, W, 3) frames: an Image holding GIF bytes.

    What tensorboard's summary.video (SummaryWriter.add_video) writes, without the moviepy it needs for the GIF.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    T, H, W, C = video.shape
    image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=gif_bytes(video, fps))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def log_scores(trainer: L.Trainer, folder: Path, scores: dict[str, float]) -> None:
    """Scores of the checkpoint at this step: to the logger and appended to `<folder>/scores.jsonl` with the step."""
    if trainer.logger is not None:
        trainer.logger.log_metrics(scores, step=trainer.global_step)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "scores.jsonl", "a") as f:
        f.write(json.dumps({"step": trainer.global_step, **scores}) + "\n")


def due(trainer: L.Trainer, every_n_steps: int) -> bool:
    """True at every `every_n_steps`-th step before the last one (the end of training samples anyway)."""
    step = trainer.global_step
    return every_n_steps > 0 and step > 0 and step % every_n_steps == 0 and step < trainer.max_steps


class PreviewSamples(L.Callback):
    """Every `every_n_steps` and at the end: sample `prompts` with the EMA weights and a fixed seed.

    Videos go to `<folder>/step-XXXXXX/*.mp4` and to TensorBoard (a playable GIF and a strip of frames each).
    steps, guidance, sampler, seed and fps are also the defaults of `minisora sample` for the run (the checkpoint
    stores this section). With `clip_model` (an open_clip name, `clip_pretrained` its tag or local file, as
    `minisora eval --clip-model` takes), the CLIP score of the `prompts`' videos is logged (log_scores).
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
        shift: float | None = None,  # the sampling grid's timestep shift; None: the training t_shift
        seed: int = 0,
        fps: float = 8,
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        clip_tag: str | None = None,
    ):
        self.vae, self.text_encoder, self.folder = vae, text_encoder, Path(folder)
        self.every_n_steps, self.prompts = every_n_steps, list(prompts or [])
        self.kw = dict(steps=steps, guidance=guidance, sampler=sampler, shift=shift)
        self.seed, self.fps = seed, fps
        if clip_model is not None and (not prompts or clip_pretrained is None):
            raise ValueError(f"sample.clip_model={clip_model!r} needs sample.prompts (their videos are scored) and "
                             "sample.clip_pretrained (an open_clip tag or a local checkpoint file: a CLIP with random "
                             "weights scores nothing)")  # fmt: skip
        self.clip = dict(model_name=clip_model, pretrained=clip_pretrained, preprocess_tag=clip_tag)
        self.clip_scorer = None  # built at the first sampling (loading CLIP is slow; runs without it never do)

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
            if tb is not None and hasattr(tb, "add_image"):  # TensorBoard's SummaryWriter
                # add_video's own path (SummaryWriter.add_video writes through _get_file_writer() too)
                tb._get_file_writer().add_summary(video_summary(f"videos/{slug(p)}", v, self.fps), step)
                tb.add_image(f"samples/{slug(p)}", film_strip(v), step, dataformats="HWC")
        if self.clip["model_name"] is not None:
            log_scores(trainer, self.folder, {"samples/clip_score": self._clip_score(videos, pl_module.device)})
        self.vae.cpu()

    def _clip_score(self, videos: list[np.ndarray], device: torch.device) -> float:
        from minisora.eval.clip_score import CLIPScore

        if self.clip_scorer is None:
            self.clip_scorer = CLIPScore(**self.clip, device=device)
        return float(self.clip_scorer(videos, self.prompts).mean())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due(trainer, self.every_n_steps):
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._sample(trainer, pl_module)
