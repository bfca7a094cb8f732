"""TextToVideoPipeline: prompt -> text embedding -> guided ODE sampling over the DiT -> VAE decode -> frames.

    pipe = TextToVideoPipeline.from_pretrained("runs/shapes", device="cuda", dtype="bf16")
    video = pipe("a red circle moving left", num_frames=17, steps=25, guidance=4.0, seed=0)  # uint8 (T, H, W, 3)
    save_video(video, "out.mp4", fps=pipe.fps)

Image-to-video and continuation: see minisora.conditioning; videos longer than the training window:
minisora.extend (extend_to=).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from minisora import diffusion
from minisora.conditioning import MODES, clean_known, conditioning_frames, keep_known
from minisora.device import resolve_dtype
from minisora.io import to_uint8_frames
from minisora.sizes import valid_size

# Output pixels per VAE decode call: one 17x256x256 clip, or 64 shapes clips (17x32x32) at once.
DECODE_PIXELS = 17 * 256 * 256
# Heun calls the model twice per step, Euler and UniPC once; which scores best in few steps: docs/benchmarks.md.
SAMPLERS = {"euler": diffusion.sample_euler, "heun": diffusion.sample_heun, "unipc": diffusion.sample_unipc}


class TextToVideoPipeline:
    """Everything needed to sample: the (EMA) DiT, the autoencoder and the text encoder.

    With `offload`, the text encoder and the autoencoder stay on the CPU and visit the DiT's device only
    while they run, so at peak the GPU holds the DiT and either the sampling activations or the decoder.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module | None,
        *,
        prediction: str = "v",
        t_shift: float | None = None,
        shift: float | None = None,
        num_frames: int = 17,
        height: int = 32,
        width: int = 32,
        fps: float = 8,
        offload: bool = False,
        config: dict[str, Any] | None = None,
        condition: str = "replace",
    ):
        if condition not in MODES:
            raise ValueError(f"condition must be one of {MODES}, got {condition!r}")
        self.model, self.vae, self.text_encoder = model.eval(), vae.eval(), text_encoder
        # How known frames condition sampling: "trained" (clean, t = 0) for a model trained with p_image / p_extend.
        self.condition = condition
        self.prediction, self.t_shift = prediction, t_shift
        # The sampling grid's shift (the run's sample.shift); None: the training t_shift. A model trained at shift 1
        # decides a shape's direction in the first, noisiest steps: a shift-3 grid gives those steps more of a short
        # schedule (8 UniPC steps: direction 0.93 / 0.88 at shift 1, 0.98 / 1.00 at shift 3; docs/benchmarks.md).
        self.shift = diffusion.check_shift(shift)
        self.defaults = dict(num_frames=num_frames, height=height, width=width)
        self.fps, self.offload = fps, offload
        self.config = config or {}  # the run config when loaded from a checkpoint
        self.checkpoint: Path | None = None  # the file the weights came from (from_pretrained)
        self.weights = "ema"  # which weights the DiT holds: "ema" or "raw"

    # ---- loading and saving ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        ema: bool = True,
        offload: bool = False,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
    ) -> TextToVideoPipeline:
        """Load a Lightning checkpoint, a run folder (its newest checkpoint) or an exported folder; a released
        model's diffusers folder or a run that fine-tuned one gives a ReleasedPipeline (same API).

        dtype applies to the DiT (default float32; "bf16" halves its memory); the autoencoder and text
        encoder run in float32. ema=False takes the raw training weights of a Lightning checkpoint.
        lora: an adapter file (<LoRA run>/lora/adapter.safetensors) merged into the weights at lora_scale
        (1 = as trained); it must have been trained on a base of this architecture.
        """
        from minisora.checkpoint import check_state_dict, dit_args, load_checkpoint
        from minisora.models.autoencoder import load_autoencoder
        from minisora.models.dit import VideoDiT
        from minisora.models.text import TextEncoder
        from minisora.released_pipeline import ReleasedPipeline, is_released

        if is_released(path):  # a diffusers folder, or a run that fine-tuned one (released_pipeline.py)
            return ReleasedPipeline.load(path, device, dtype, offload=offload, lora=lora, lora_scale=lora_scale)
        ckpt = load_checkpoint(path, ema=ema)
        cfg = ckpt.config
        vae = load_autoencoder(ckpt.vae_path)
        condition = cfg["model"].get("condition", "text")
        text = TextEncoder(**cfg.get("text", {})) if condition == "text" else None
        args = dit_args(cfg, vae.latent_channels, text.dim if text is not None else None)
        model = VideoDiT(**args)
        check_state_dict(ckpt.state_dict, model, ckpt.source)
        model.load_state_dict(ckpt.state_dict)
        if lora is not None:
            from minisora.models.lora import load_adapter, merge_lora

            load_adapter(lora, model, args, text=text, scale=lora_scale)
            merge_lora(model)  # plain layers again: sampling runs at the base model's speed
            if text is not None:
                merge_lora(text)
        model.to(device=device, dtype=resolve_dtype(dtype))
        if not offload:
            vae.to(device)
            if text is not None:
                text.to(device)
        data, train, sample = cfg.get("data", {}), cfg.get("dit_train", {}), cfg.get("sample", {})
        trained = (train.get("p_image") or 0) + (train.get("p_extend") or 0) > 0  # runs before them lack both keys
        pipe = cls(
            model, vae, text, prediction=train.get("prediction", "v"), t_shift=train.get("t_shift"), shift=sample.get("shift"),
            num_frames=data.get("num_frames", 17), height=data.get("height", 32), width=data.get("width", 32),
            fps=sample.get("fps", 8), offload=offload, config=cfg, condition="trained" if trained else "replace",
        )  # fmt: skip
        pipe.checkpoint, pipe.weights = ckpt.source, ckpt.weights
        return pipe

    def save_pretrained(self, folder: str | Path, dtype: str = "fp32") -> Path:
        """Write the folder `from_pretrained` reads: config.yaml, model.safetensors (these weights), vae.safetensors."""
        from minisora.checkpoint import write_export
        from minisora.models.autoencoder import save_autoencoder

        if not self.config:
            raise ValueError("save_pretrained needs the run config; build the pipeline with from_pretrained")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vae_file = save_autoencoder(self.vae, folder / "vae.safetensors")
        cfg = dict(self.config)
        cfg["model"] = {**cfg["model"], "in_channels": self.model.in_channels}
        if self.text_encoder is not None:
            cfg["model"]["text_dim"] = self.text_encoder.dim
        return write_export(folder, cfg, self.model.state_dict(), vae_file, self.weights, dtype, None)

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return tuple(self.vae.latent_shape(num_frames, height, width))

    def valid_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The nearest (T, H, W) the autoencoder and patch sizes accept, with a warning naming what changed."""
        return valid_size(self.vae, self.model.patch_size, num_frames, height, width, stacklevel=3)

    def _size(self, num_frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
        """The requested size, the training clip's size where not given."""
        d = self.defaults
        return tuple(
            d[k] if v is None else v for k, v in zip(("num_frames", "height", "width"), (num_frames, height, width))
        )

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module | None) -> Iterator[None]:
        """With offload, move `module` to the DiT's device for the block and back to the CPU after it."""
        if module is None or not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.cpu()

    # ---- pieces ----------------------------------------------------------------------------------
    def _condition(self, prompts: list[str] | None, labels: list[int] | None) -> tuple[dict, dict]:
        condition, device = self.model.condition, self.device
        if condition == "text":
            with self._on_device(self.text_encoder):
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

    def _network(self) -> Callable:
        """The DiT as a float32-in, float32-out callable, whatever dtype its weights are in."""
        dtype = self.dtype
        if dtype == torch.float32:
            return self.model
        return lambda x, t, **cond: self.model(x.to(dtype), t, **cond).float()

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (K, H, W, 3), K = 1 + kt*m -> normalised latents (1, C, 1 + m, h, w) on the DiT's device."""
        video = rearrange(torch.from_numpy(np.ascontiguousarray(frames)), "t h w c -> 1 c t h w").float() / 127.5 - 1
        with self._on_device(self.vae):
            vae_device = next(self.vae.parameters()).device
            return self.vae.encode(video.to(vae_device)).to(self.device)

    def _noise(self, shape: tuple, seeds: list[int] | None, generators: list[torch.Generator] | None) -> torch.Tensor:
        """(B, *shape) noise; item i comes from its own seed or generator, so batching never changes it."""
        if generators is not None:
            return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(self.device)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
            self.device
        )

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
        shift: float | None = None,
        seed: int | Sequence[int] = 0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        known: torch.Tensor | None = None,
        condition: str | None = None,
        batched_cfg: bool = True,
        callback: Callable[[dict], None] | None = None,
    ) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w); `known` (1 or B, C, k, h, w) latents are kept as the first k frames.

        shift: the sampling grid's timestep shift (diffusion.timesteps); default the pipeline's `shift`, else the
        training t_shift, else the resolution shift of the sample's token count.

        condition: how the known frames condition the rest, "trained" (given clean, t = 0: clean_known) or
        "replace" (held on their noise path: keep_known); default the pipeline's (from the checkpoint).
        """
        condition = self.condition if condition is None else condition
        if condition not in MODES:
            raise ValueError(f"condition must be one of {MODES}, got {condition!r}")
        diffusion.check_sampling(steps, guidance, sampler, sorted(SAMPLERS))
        B = len(prompts) if prompts is not None else len(labels) if labels is not None else (num or 1)
        generators = None
        if generator is not None:
            generators = [generator] * B if isinstance(generator, torch.Generator) else list(generator)
            if len(generators) != B:
                raise ValueError(f"got {len(generators)} generators for {B} prompts")
        seeds = [seed + i for i in range(B)] if isinstance(seed, (int, np.integer)) else list(seed)
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} prompts")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be >= 0, got {seeds}")
        T, H, W = self.valid_size(*self._size(num_frames, height, width))
        shape = self.latent_shape(T, H, W)
        noise = self._noise(shape, seeds, generators)  # (B, C, t, h, w)
        cond, uncond = self._condition(list(prompts) if prompts is not None else None,
                                       list(labels) if labels is not None else None)  # fmt: skip
        v_model = diffusion.velocity_model(self._network(), self.prediction)
        guided = diffusion.cfg_model(v_model, guidance, cond, uncond, batched=batched_cfg) if cond else v_model
        if known is not None:
            if known.shape[1] != shape[0] or known.shape[3:] != noise.shape[3:] or known.shape[2] >= shape[1]:
                raise ValueError(f"known latents {tuple(known.shape)} do not fit the sample's latents {shape} "
                                 f"(same channels and size, fewer frames)")  # fmt: skip
            guided = clean_known(guided, known.to(noise)) if condition == "trained" else keep_known(guided, known.to(noise), noise)
        shift = next((s for s in (diffusion.check_shift(shift), self.shift, self.t_shift) if s is not None), None)
        if shift is None:
            shift = diffusion.resolution_shift(self.model.tokens(*shape[1:]))
        ts = diffusion.timesteps(steps, shift, device=self.device)
        x = SAMPLERS[sampler](guided, noise, ts, callback=callback)
        if known is not None:  # exact, not merely within float rounding of the path's end
            x[:, :, : known.shape[2]] = known
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Normalised latents -> list of uint8 (T, H, W, 3).

        Videos are decoded a few at a time (at most DECODE_PIXELS output pixels per call, so memory stays
        bounded), and the VAE tiles space and chunks time above its own limits.
        """
        B, _, t, h, w = latents.shape
        T, H, W = (
            (t - 1) * self.vae.temporal_compression + 1,
            h * self.vae.spatial_compression,
            w * self.vae.spatial_compression,
        )
        per_call = max(1, DECODE_PIXELS // (T * H * W))
        videos = []
        with self._on_device(self.vae):
            vae_device = next(self.vae.parameters()).device
            for i in range(0, B, per_call):
                decoded = self.vae.decode(latents[i : i + per_call].to(vae_device).float())  # (b, 3, T, H, W)
                videos += [to_uint8_frames(v.cpu()) for v in decoded]
        return videos

    # ---- the call --------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] = 0,
        batch_size: int | None = None,
        image: Any = None,
        video: Any = None,
        keep_frames: int | None = None,
        extend_to: int | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        **kwargs: Any,
    ) -> np.ndarray | list[np.ndarray]:
        """Generate uint8 (T, H, W, 3) frames for a prompt (a list of them for a list of prompts).

        Other keywords: steps, guidance, sampler ("euler" | "heun" | "unipc"), shift (the grid's), generator (one per prompt), batched_cfg,
        labels (class-conditioned models). `image` (a path or uint8 (H, W, 3)) animates an image; `video`
        (a path or uint8 (T, H, W, 3)) with `keep_frames` continues a clip inside one window; with `extend_to` the
        whole clip (or a list of clips, one per prompt) is continued to extend_to frames, window after window
        (minisora.extend; `overlap` latent frames of context per window). `condition`: "trained" | "replace" (see
        sample_latents). `callback(info)` runs after every step with info["i"], ["t"], ["x"], ["denoised"] and ["batch"] (the batch's first prompt index).
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("no prompts given")
        T, H, W = self.valid_size(*self._size(num_frames, height, width))
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, (int, np.integer)) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        gens = kwargs.pop("generator", None)
        if isinstance(gens, torch.Generator):
            gens = [gens] * len(prompts)
        labels = kwargs.pop("labels", None)
        if labels is None and self.model.condition == "class":
            try:
                labels = [int(p) for p in prompts]
            except ValueError:
                raise ValueError(
                    f"this model is class-conditioned: prompts must be class indices, got {prompts}"
                ) from None
        if extend_to is not None:
            if video is None or image is not None or keep_frames is not None:
                raise ValueError("extend_to continues a video: give video= (all its frames are kept), not image= "
                                 "or keep_frames=")  # fmt: skip
            from minisora.extend import extend_video

            videos = extend_video(self, prompts, video, extend_to, num_frames=T, height=H, width=W, seed=seeds,
                                  labels=labels, callback=callback, **kwargs)  # fmt: skip
            return videos[0] if single else videos
        frames = conditioning_frames(self.vae.temporal_compression, image, video, keep_frames, T, H, W)
        known = self.encode_frames(frames) if frames is not None else None
        bs = len(prompts) if batch_size is None else batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=kwargs.get("steps", 25) * -(-len(prompts) // bs), desc="sampling", unit="step")
        latents = []  # all batches are sampled before any is decoded: with offload the VAE visits the GPU once
        for i in range(0, len(prompts), bs):

            def step(info: dict, first: int = i) -> None:
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback({**info, "batch": first})

            latents.append(self.sample_latents(
                prompts[i : i + bs], labels=labels[i : i + bs] if labels is not None else None, num_frames=T,
                height=H, width=W, seed=seeds[i : i + bs], generator=gens[i : i + bs] if gens else None,
                known=known, callback=step, **kwargs,
            ))  # fmt: skip
        if bar is not None:
            bar.close()
        videos = self.decode(torch.cat(latents))
        return videos[0] if single else videos
