"""CLIP score of videos against their prompts with an open_clip model the user names (tag or local file).

Per frame, 100 * max(cos(image embedding, text embedding), 0) (Hessel et al. 2021 with w = 100, as the
formula in torchmetrics' CLIPScore documentation); a video scores the mean over its frames (the CLIPSIM of
text-to-video papers, here clamped per frame), and a set of videos the mean over videos. Scores lie in
[0, 100] and only compare between runs scored with the same model, weights and prompts; `minisora eval`
scores the real clips too, as the reference. torchmetrics' implementation clamps the mean rather than
each pair; the two agree whenever no cosine is negative.

Frames are prepared with the model's own preprocessing values (open_clip's preprocess_cfg: size, mean,
std, interpolation, resize mode), on tensors and in batches instead of per PIL image. open_clip takes those
values from the pretrained tag; a local checkpoint file carries none, so `preprocess_tag` names the tag the
file was downloaded for (ViT-L-14's laion2b_s32b_b82k uses mean = std = 0.5, not the OpenAI defaults).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from einops import rearrange
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from minisora.models.text import create_open_clip

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"  # downloaded by open_clip on first use; or a local checkpoint file


class CLIPScore:
    """CLIP score per video: scorer(videos, prompts) -> float64 (B,), videos uint8 (T, H, W, 3) each."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        preprocess_tag: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name, self.pretrained, self.batch_size = model_name, pretrained, batch_size
        self.preprocess_tag, self.device = preprocess_tag, torch.device(device)
        tag_cfg = self._tag_preprocess(model_name, pretrained, preprocess_tag)  # checked before the slow load
        model = create_open_clip(model_name, pretrained, who="CLIP score")
        if not hasattr(model, "encode_image") or getattr(model, "visual", None) is None:
            raise ValueError(f"CLIP score: open_clip model {model_name!r} has no image tower")
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = {**open_clip.get_model_preprocess_cfg(model), **tag_cfg}
        size = cfg.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
        self.interpolation = (
            InterpolationMode.BILINEAR if cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
        )
        self.resize_mode = cfg.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"CLIP score: {model_name!r} has an unknown resize_mode {self.resize_mode!r}")
        self.fill = int(cfg.get("fill_color", 0))

    @staticmethod
    def _tag_preprocess(model_name: str, pretrained: str | None, tag: str | None) -> dict:
        """Preprocessing values of `tag` (for weights from a local file); a warning where the file's tag matters."""
        keys = ("mean", "std", "interpolation", "resize_mode")
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if tag is not None:
            cfg = open_clip.get_pretrained_cfg(model_name, tag)
            if not cfg:
                raise ValueError(f"CLIP score: preprocess_tag {tag!r} is not an open_clip tag of {model_name!r} "
                                 f"({', '.join(tags) or 'it has none'})")  # fmt: skip
            return {k: cfg[k] for k in keys if k in cfg}
        if pretrained is not None and Path(pretrained).expanduser().is_file():
            default = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
            odd = [t for t in tags if any(open_clip.get_pretrained_cfg(model_name, t).get(k, v) != v
                                          for k, v in default.items())]  # fmt: skip
            if odd:
                warnings.warn(f"CLIP score: {pretrained} is scored with the OpenAI mean/std; if it holds the weights "
                              f"of {', '.join(odd)} (other values), pass that tag as preprocess_tag (--clip-tag)",
                              stacklevel=3)  # fmt: skip
        return {}

    def describe(self) -> str:
        """The model and weights, for reports."""
        tag = f", preprocessing of {self.preprocess_tag}" if self.preprocess_tag else ""
        return f"open_clip {self.model_name} ({self.pretrained or 'random init'}{tag})"

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised float (N, 3, h, w) as open_clip's eval transform for this model."""
        N, _, H, W = frames.shape
        h, w = self.size
        if self.resize_mode == "squash":
            frames = TF.resize(frames, [h, w], interpolation=self.interpolation, antialias=True)
        elif self.resize_mode == "shortest" and h == w:  # open_clip: Resize(size) (torchvision's short-side rule)
            frames = TF.center_crop(TF.resize(frames, [h], interpolation=self.interpolation, antialias=True), [h, w])
        else:  # shortest: cover (h, w) and crop the centre; longest: fit inside (h, w) and pad with fill_color
            scale = max(h / H, w / W) if self.resize_mode == "shortest" else min(h / H, w / W)
            size = [max(1, round(H * scale)), max(1, round(W * scale))]
            if size != [H, W]:
                frames = TF.resize(frames, size, interpolation=self.interpolation, antialias=True)
            if self.resize_mode == "longest":
                top, left = (h - size[0]) // 2, (w - size[1]) // 2
                frames = F.pad(frames, (left, w - size[1] - left, top, h - size[0] - top), value=self.fill)
            frames = TF.center_crop(frames, [h, w])
        x = frames.float() / 255  # (N, 3, h, w) in [0, 1]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings (B, D), float32."""
        tokens = self.tokenizer(list(prompts)).to(self.device)  # (B, L)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> unit image embeddings (N, D), float32, in batches of batch_size."""
        out = []
        for i in range(0, len(frames), self.batch_size):
            x = self.preprocess(frames[i : i + self.batch_size].to(self.device))
            out.append(F.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    def __call__(self, videos: Sequence[np.ndarray], prompts: Sequence[str]) -> torch.Tensor:
        """Mean over each video's frames of 100 * max(cos(frame, prompt), 0): float64 (B,) in [0, 100]."""
        if isinstance(prompts, str):
            raise TypeError("CLIPScore expects a list of prompts, one per video")
        if len(videos) != len(prompts):
            raise ValueError(f"got {len(videos)} videos and {len(prompts)} prompts; CLIP score needs one per video")
        if len(videos) == 0:
            return torch.zeros(0, dtype=torch.float64)
        clips = []
        for i, v in enumerate(videos):
            v = np.asarray(v)
            if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
                raise ValueError(f"video {i}: expected uint8 (T, H, W, 3) frames, got {v.dtype} {v.shape}")
            clips.append(torch.from_numpy(np.ascontiguousarray(v)))
        lengths = [len(c) for c in clips]
        if len({c.shape[1:] for c in clips}) == 1:  # one size: all frames in shared batches
            image = self.frame_embeddings(rearrange(torch.cat(clips), "n h w c -> n c h w"))  # (sum T, D)
        else:
            image = torch.cat([self.frame_embeddings(rearrange(c, "t h w c -> t c h w")) for c in clips])
        text = self.text_embeddings(prompts).repeat_interleave(torch.tensor(lengths, device=self.device), dim=0)
        per_frame = 100 * (image * text).sum(dim=-1).clamp(min=0).double()  # (sum T,)
        return torch.stack([f.mean() for f in per_frame.cpu().split(lengths)])  # (B,)
