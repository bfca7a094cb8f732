"""TextToVideoPipeline: prompt -> text embedding -> guided ODE sampling over the DiT -> VAE decode -> frames."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from minisora import diffusion
from minisora.io import to_uint8_frames

SAMPLERS = {"euler": diffusion.sample_euler, "heun": diffusion.sample_heun}


class TextToVideoPipeline:
    """Everything needed to sample: the (EMA) DiT, the autoencoder and the text encoder."""

    def __init__(
        self,
        model: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module | None,
        *,
        prediction: str = "v",
        t_shift: float | None = None,
        num_frames: int = 17,
        height: int = 32,
        width: int = 32,
        fps: float = 8,
    ):
        self.model, self.vae, self.text_encoder = model.eval(), vae.eval(), text_encoder
        self.prediction, self.t_shift = prediction, t_shift
        self.defaults = dict(num_frames=num_frames, height=height, width=width)
        self.fps = fps

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return tuple(self.vae.latent_shape(num_frames, height, width))

    def _condition(self, prompts: list[str] | None, labels: list[int] | None) -> tuple[dict, dict]:
        condition = self.model.condition
        device = self.device
        if condition == "text":
            emb, mask = self.text_encoder(prompts)  # (B, L, D), (B, L)
            null, null_mask = self.text_encoder.null_embedding()  # (1, L, D), (1, L)
            return (
                {"context": emb.to(device), "context_mask": mask.to(device)},
                {"context": null.to(device), "context_mask": null_mask.to(device)},
            )
        if condition == "class":
            y = torch.as_tensor(labels, dtype=torch.long, device=device)
            return {"labels": y}, {"labels": torch.full_like(y, self.model.num_classes)}
        return {}, {}

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: Sequence[str] | None = None,
        *,
        labels: Sequence[int] | None = None,
        num: int | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 25,
        guidance: float = 4.0,
        sampler: str = "euler",
        seed: int | Sequence[int] = 0,
        batched_cfg: bool = True,
        callback: Callable[[dict], None] | None = None,
    ) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w); noise for item i comes from its own seed, so a batch never changes it."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if guidance < 1:
            raise ValueError(f"guidance (cfg scale) must be >= 1, got {guidance}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        B = len(prompts) if prompts is not None else len(labels) if labels is not None else (num or 1)
        seeds = [seed + i for i in range(B)] if isinstance(seed, int) else list(seed)
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be >= 0, got {seeds}")
        T = num_frames or self.defaults["num_frames"]
        H = height or self.defaults["height"]
        W = width or self.defaults["width"]
        shape = self.latent_shape(T, H, W)
        device = self.device
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device)  # (B, C, t, h, w)
        cond, uncond = self._condition(list(prompts) if prompts is not None else None, list(labels) if labels else None)
        v_model = diffusion.velocity_model(self.model, self.prediction)
        guided = diffusion.cfg_model(v_model, guidance, cond, uncond, batched=batched_cfg) if cond else v_model
        shift = self.t_shift if self.t_shift is not None else diffusion.resolution_shift(self.model.tokens(*shape[1:]))
        ts = diffusion.timesteps(steps, shift, device=device)
        return SAMPLERS[sampler](guided, noise, ts, callback=callback)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Normalised latents -> list of uint8 (T, H, W, 3) frames."""
        vae_device = next(self.vae.parameters()).device
        videos = self.vae.decode(latents.to(vae_device).float())  # (B, 3, T, H, W)
        return [to_uint8_frames(v.cpu()) for v in videos]

    def __call__(self, prompt: str | Sequence[str], **kwargs) -> np.ndarray | list[np.ndarray]:
        """Generate uint8 (T, H, W, 3) frames for a prompt (a list of them for a list of prompts)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        videos = self.decode(self.sample_latents(prompts, **kwargs))
        return videos[0] if single else videos
