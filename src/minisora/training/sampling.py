"""SampleVideos: sample fixed prompts from the EMA model during and after training; score them (shapes, CLIP)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch

from minisora.io import film_strip, gif_bytes, save_video
from minisora.pipeline import TextToVideoPipeline
from minisora.sample import slug


def shapes_eval(pipe: TextToVideoPipeline, out: Path, *, samples_per_prompt: int, fps: float, **kw) -> dict:
    """Sample every shapes prompt (train and held-out), score them, write mp4s and eval.json; return metrics."""
    from minisora.data.shapes import heldout_prompts, train_prompts
    from minisora.eval.shapes import evaluate

    prompts = [p for p in train_prompts() + heldout_prompts() for _ in range(samples_per_prompt)]
    seeds = [kw.pop("seed", 0) + i for i in range(len(prompts))]
    videos: list[np.ndarray] = []
    for i in range(0, len(prompts), 64):
        videos += pipe(prompts[i : i + 64], seed=seeds[i : i + 64], **kw)
    report = evaluate(videos, prompts)
    out.mkdir(parents=True, exist_ok=True)
    for j, (p, v) in enumerate(zip(prompts, videos)):
        if j % samples_per_prompt == 0:
            save_video(v, out / f"{slug(p)}.mp4", fps=fps)
    held, train = report.split(heldout=True), report.split(heldout=False)
    metrics = {
        "train/color_accuracy": train.color_accuracy,
        "train/direction_accuracy": train.direction_accuracy,
        "heldout/color_accuracy": held.color_accuracy,
        "heldout/direction_accuracy": held.direction_accuracy,
        "all/color_accuracy": report.color_accuracy,
        "all/direction_accuracy": report.direction_accuracy,
        "samples": len(prompts),
    }
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    (out / "eval.txt").write_text(report.format() + "\n")
    return metrics


def video_summary(tag: str, video: np.ndarray, fps: float):
    """A TensorBoard summary that plays uint8 (T, H, W, 3) frames: an Image holding GIF bytes.

    What tensorboard's summary.video (SummaryWriter.add_video) writes, without the moviepy it needs for the GIF.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    T, H, W, C = video.shape
    image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=gif_bytes(video, fps))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class SampleVideos(L.Callback):
    """Every `every_n_steps` and at the end: sample `prompts` with the EMA weights and a fixed seed.

    Videos go to `<folder>/step-XXXXXX/*.mp4` and to TensorBoard (a playable GIF and a strip of frames each).
    With `shapes_eval`, every sampling also samples every shapes prompt (train and held-out) and logs the
    evaluator's accuracies; with `clip_model` (an open_clip name, `clip_pretrained` its tag or local file, as
    `minisora eval --clip-model` takes), the CLIP score of the `prompts`' videos. Each sampling's scores are
    also appended to `<folder>/scores.jsonl` with its step (the step of the checkpoint it scores).
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
        shapes_eval: bool = False,
        samples_per_prompt: int = 1,
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        clip_tag: str | None = None,
    ):
        self.vae, self.text_encoder, self.folder = vae, text_encoder, Path(folder)
        self.every_n_steps, self.prompts = every_n_steps, list(prompts or [])
        self.kw = dict(steps=steps, guidance=guidance, sampler=sampler)
        self.seed, self.fps = seed, fps
        self.shapes_eval, self.samples_per_prompt = shapes_eval, samples_per_prompt
        self.metrics: dict | None = None
        if clip_model is not None and (not prompts or clip_pretrained is None):
            raise ValueError(f"sample.clip_model={clip_model!r} needs sample.prompts (their videos are scored) and "
                             "sample.clip_pretrained (an open_clip tag or a local checkpoint file: a CLIP with random "
                             "weights scores nothing)")  # fmt: skip
        self.clip = dict(model_name=clip_model, pretrained=clip_pretrained, preprocess_tag=clip_tag)
        self.clip_scorer = None  # built at the first sampling (loading CLIP is slow; runs without it never do)

    def pipeline(self, trainer: L.Trainer, pl_module: L.LightningModule, model: torch.nn.Module) -> TextToVideoPipeline:
        clip = trainer.datamodule.video.clip_args  # sample at the training clip size
        T, H, W = clip["num_frames"], clip["height"], clip["width"]
        self.vae.to(pl_module.device)
        if self.text_encoder is not None:
            self.text_encoder.to(pl_module.device)
        return TextToVideoPipeline(
            model, self.vae, self.text_encoder, prediction=pl_module.prediction,
            t_shift=pl_module.t_shift, num_frames=T, height=H, width=W, fps=self.fps,
        )  # fmt: skip

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        model = pl_module.full_ema()  # every rank: under FSDP this gathers the EMA's shards to rank 0
        if not trainer.is_global_zero:
            return
        pipe = self.pipeline(trainer, pl_module, model)
        step = trainer.global_step
        out = self.folder / f"step-{step:06d}"
        scores: dict[str, float] = {}
        if self.prompts:
            videos = pipe(self.prompts, seed=self.seed, **self.kw)
            tb = getattr(trainer.logger, "experiment", None)
            for i, (p, v) in enumerate(zip(self.prompts, videos)):
                save_video(v, out / f"{slug(p)}.mp4", fps=self.fps)
                if tb is not None and hasattr(tb, "add_image"):  # TensorBoard's SummaryWriter
                    # add_video's own path (SummaryWriter.add_video writes through _get_file_writer() too)
                    tb._get_file_writer().add_summary(video_summary(f"videos/{slug(p)}", v, self.fps), step)
                    tb.add_image(f"samples/{slug(p)}", film_strip(v), step, dataformats="HWC")
            if self.clip["model_name"] is not None:
                scores["samples/clip_score"] = self._clip_score(videos, pl_module.device)
        if self.shapes_eval:  # the accuracy curve shows in TensorBoard; the final one is the run's score
            where = self.folder / "final" if final else out / "shapes"
            self.metrics = shapes_eval(pipe, where, samples_per_prompt=self.samples_per_prompt,
                                       fps=self.fps, seed=self.seed, **self.kw)  # fmt: skip
            pl_module.print(
                f"step {step}: shapes colour accuracy {self.metrics['train/color_accuracy']:.2f} train / "
                f"{self.metrics['heldout/color_accuracy']:.2f} held-out, direction "
                f"{self.metrics['train/direction_accuracy']:.2f} / {self.metrics['heldout/direction_accuracy']:.2f}"
            )
            scores.update({f"shapes/{k}": v for k, v in self.metrics.items()})
        if scores:
            if trainer.logger is not None:
                trainer.logger.log_metrics(scores, step=step)
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / "scores.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scores}) + "\n")
        self.vae.cpu()

    def _clip_score(self, videos: list[np.ndarray], device: torch.device) -> float:
        from minisora.eval.clip_score import CLIPScore

        if self.clip_scorer is None:
            self.clip_scorer = CLIPScore(**self.clip, device=device)
        return float(self.clip_scorer(videos, self.prompts).mean())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step < trainer.max_steps:
            self._sample(trainer, pl_module, final=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._sample(trainer, pl_module, final=True)
