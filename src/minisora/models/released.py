"""Released video models (Wan2.1 T2V, Wan2.2 TI2V, LTX-Video) behind minisora's denoiser interface.

A released transformer becomes the callable every minisora sampler and loss takes, `model(x_t, t, **cond) -> v`:
x_t (B, C, T, H, W) normalised latents, t in [0, 1] as (B,), per latent frame (B, T) or per token (B, tokens),
cond `context` (B, L, D)
and `context_mask` (B, L), v = noise - x0. That is diffusers' own convention with sigma = t and
timestep = 1000 t, so nothing is converted but the layout (checked against diffusers 0.42: DESIGN.md). Each
adapter keeps its family's quirks inside: Wan's per-token timesteps for TI2V, LTX-Video's token packing,
RoPE interpolation scale and text mask. `load_released(folder)` builds denoiser, autoencoder (DiffusersVAE),
text encoder (T5TextEncoder) and the folder's scheduler; `sample_released` samples latents with minisora's
samplers exactly as the family's diffusers pipeline does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from einops import rearrange
from torch import nn

from minisora import diffusion
from minisora.conditioning import clean_known, load_frames
from minisora.models.diffusers_folder import LTX, WAN22, FolderInfo, describe
from minisora.device import resolve_dtype
from minisora.models.diffusers_vae import DiffusersVAE, compression, require_diffusers
from minisora.models.t5_text import T5TextEncoder

# How each pipeline encodes prompts (see t5_text.py): Wan masks the encoder and zero-pads, LTX-Video does neither.
TEXT_STYLE = {"wan": dict(mask_encoder=True, zero_pad=True, clean=True),
              "ltx": dict(mask_encoder=False, zero_pad=False, clean=False)}  # fmt: skip
# Scheduler options flow_match_sigmas does not reproduce (the folder's scheduler still runs them: sampler "default").
EULER_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling", "use_dynamic_shifting")  # fmt: skip


def diffusers_timestep(t: torch.Tensor) -> torch.Tensor:
    """1000 t rounded once to float32: gives back the integer timesteps UniPC hands its model (1000 < 2^10)."""
    return (t.double() * 1000).float()


def _check_t(t: torch.Tensor, B: int, tokens: int, frames: int | None = None) -> None:
    shapes = ((B,), (B, tokens)) if frames is None else ((B,), (B, tokens), (B, frames))
    if t.shape not in shapes:
        per_frame = "" if frames is None else f", per latent frame (B, T) = ({B}, {frames})"
        raise ValueError(f"t must be (B,) = ({B},){per_frame} or per token (B, tokens) = ({B}, {tokens}), "
                         f"got {tuple(t.shape)}")  # fmt: skip


class WanDenoiser(nn.Module):
    """WanTransformer3DModel as model(x (B, C, T, H, W), t, context (B, L, D)) -> v (B, C, T, H, W).

    Tokens are the 1x2x2 patches (T * H/2 * W/2). Wan's cross-attention has no mask: the zero-padded
    embeddings are its input, so `context_mask` is accepted (minisora's CFG wrapper passes one) and unused.
    expand_timesteps (Wan2.2 TI2V): a (B,) t is given to every token, as WanPipeline does. A per-latent-frame t
    (B, T) is given to every token of its frame: t = 0 on frame 0 is Wan2.2-TI2V's image-to-video.
    """

    condition = "text"  # what minisora's trainer and pipeline ask of a denoiser: it takes context (+ mask)

    def __init__(self, transformer: nn.Module, expand_timesteps: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        self.expand_timesteps = expand_timesteps

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    def tokens(self, T: int, H: int, W: int) -> int:
        """Tokens of a (T, H, W) latent: one per patch."""
        pt, ph, pw = self.patch_size
        return (T // pt) * (H // ph) * (W // pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        B, C, T, H, W = x.shape
        tokens = self.tokens(T, H, W)
        _check_t(t, B, tokens, T if self.patch_size[0] == 1 else None)
        timestep = diffusers_timestep(t)  # (B,), (B, T) or (B, tokens)
        if timestep.ndim == 2 and timestep.shape[1] != tokens:  # per latent frame -> per token, frame-major order
            timestep = timestep.repeat_interleave(tokens // T, dim=1)  # (B, tokens)
        if timestep.ndim == 1 and self.expand_timesteps:
            timestep = timestep[:, None].expand(B, tokens)  # (B, tokens)
        dtype = self.transformer.dtype
        v = self.transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=context.to(dtype),
                             return_dict=False)[0]  # fmt: skip
        return v.to(x.dtype)  # (B, C, T, H, W)


class LTXDenoiser(nn.Module):
    """LTXVideoTransformer3DModel as model(x (B, C, T, H, W), t, context (B, L, D), context_mask (B, L)) -> v.

    Inside: the latents are packed to tokens (B, T*H*W, C) as LTXPipeline._pack_latents does (patch 1), the RoPE
    positions are scaled by (temporal compression / frame_rate, spatial, spatial) of the VAE (8/25, 32, 32 for
    the released model at 25 fps), and the text mask goes to the cross-attention.
    """

    condition = "text"

    def __init__(self, transformer: nn.Module, temporal_compression: int, spatial_compression: int,
                 frame_rate: float = 25) -> None:  # fmt: skip
        super().__init__()
        self.transformer = transformer
        self.compression = (temporal_compression, spatial_compression)
        self.frame_rate = frame_rate

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return (1, 1, 1)

    def tokens(self, T: int, H: int, W: int) -> int:
        return T * H * W

    def rope_interpolation_scale(self) -> tuple[float, int, int]:
        kt, s = self.compression
        return (kt / self.frame_rate, s, s)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        B, C, T, H, W = x.shape
        _check_t(t, B, self.tokens(T, H, W), T)
        if t.ndim == 2 and t.shape[1] != self.tokens(T, H, W):  # per latent frame -> per token, (t h w) order
            t = t.repeat_interleave(H * W, dim=1)  # (B, tokens)
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)  # (B, L)
        dtype = self.transformer.dtype
        tokens = rearrange(x, "b c t h w -> b (t h w) c").to(dtype)  # (B, N, C)
        out = self.transformer(
            hidden_states=tokens, encoder_hidden_states=context.to(dtype), timestep=diffusers_timestep(t),
            encoder_attention_mask=context_mask, num_frames=T, height=H, width=W,
            rope_interpolation_scale=self.rope_interpolation_scale(), return_dict=False,
        )[0]  # (B, N, C)  # fmt: skip
        return rearrange(out, "b (t h w) c -> b c t h w", t=T, h=H, w=W).to(x.dtype)  # (B, C, T, H, W)


@dataclass
class ReleasedModel:
    """A released model's parts as minisora uses them, and the sampling settings of its diffusers pipeline."""

    info: FolderInfo
    denoiser: nn.Module | None  # model(x_t, t, **cond) -> v
    vae: DiffusersVAE | None
    text: T5TextEncoder | None
    scheduler: object  # the folder's own diffusers scheduler: the default sampler

    @property
    def family(self) -> str:
        return self.info.family.name

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The transformer's patch (t, h, w), from its config (also when the transformer is not loaded)."""
        return (1, 1, 1) if self.info.family is LTX else tuple(self.info.configs["transformer"]["patch_size"])

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of a num_frames x height x width video, as the family's pipeline computes it."""
        kt, s = compression(self.info.family.vae_kind, self.info.configs["vae"])
        return (self.info.latent_channels, (num_frames - 1) // kt + 1, height // s, width // s)

    def schedule(self, steps: int, tokens: int) -> dict:
        """set_timesteps arguments the family's pipeline gives its scheduler (for sample_scheduler)."""
        if self.info.family is not LTX:
            return {}
        # LTXPipeline: sigmas linspace(1, 1/N, N) and mu = calculate_shift(tokens) (used when shifting dynamically)
        return dict(sigmas=torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist(),
                    mu=ltx_mu(self.scheduler.config, tokens))  # fmt: skip

    def euler_sigmas(self, steps: int, tokens: int) -> torch.Tensor:
        """The sigma grid (steps + 1,) of FlowMatchEulerDiscreteScheduler as the family's pipeline sets it.

        LTX-Video: its own scheduler's grid (token-dependent shift for 0.9.0/0.9.1, shift_terminal). Wan: the
        Euler scheduler at the folder's shift (UniPC's flow_shift), set_timesteps(steps).
        """
        cfg, ltx = self.scheduler.config, self.info.family is LTX
        bad = [k for k in EULER_UNSUPPORTED if cfg.get(k) and not (ltx and k == "use_dynamic_shifting")]
        if bad:
            raise ValueError(f"{self.info.path / 'scheduler/scheduler_config.json'}: {', '.join(bad)} has no Euler "
                             "grid here; use the folder's own scheduler (sampler 'default')")  # fmt: skip
        if ltx:
            base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
            dynamic = cfg.get("use_dynamic_shifting")
            shift = dynamic_shift(cfg, ltx_mu(cfg, tokens)) if dynamic else cfg.get("shift", 1.0)
            return diffusion.flow_match_sigmas(steps, shift, base=base, shift_terminal=cfg.get("shift_terminal"))
        shift = cfg.get("flow_shift") if "flow_shift" in cfg else cfg.get("shift", 1.0)
        return diffusion.flow_match_sigmas(steps, shift, shift_terminal=cfg.get("shift_terminal"))


def ltx_mu(scheduler_config, tokens: int) -> float:
    """LTXPipeline's calculate_shift(tokens): mu linear in the token count, extrapolated beyond either end.

    LTX-Video 0.9.0/0.9.1: mu 0.95 at 1024 tokens to 2.05 at 4096. mu is the log of a resolution_shift.
    """
    cfg = scheduler_config
    return math.log(diffusion.resolution_shift(
        tokens, base_tokens=cfg.get("base_image_seq_len", 256), base_shift=math.exp(cfg.get("base_shift", 0.5)),
        max_tokens=cfg.get("max_image_seq_len", 4096), max_shift=math.exp(cfg.get("max_shift", 1.15)), floor=False,
    ))  # fmt: skip


def dynamic_shift(scheduler_config, mu: float) -> float:
    """The shift_t shift equal to diffusers' dynamic time_shift(mu): exp(mu) ("exponential") or mu ("linear")."""
    return mu if scheduler_config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def load_released(folder: str | Path, dtype: str = "float32", frame_rate: float = 25, vae: bool = True,
                  text: bool = True, transformer: bool = True) -> ReleasedModel:  # fmt: skip
    """A diffusers folder of a supported family as minisora parts (weights in `dtype`: auto, float32, bfloat16).

    vae/text/transformer False skip those parts (training from a latent cache needs neither encoder; filling the
    cache needs no transformer: denoiser None). frame_rate: LTX-Video's RoPE time scale (its pipeline's frame_rate,
    default 25).
    """
    diffusers = require_diffusers()
    info = describe(folder)
    family, path = info.family, info.path
    autoencoder = None
    if vae:
        autoencoder = DiffusersVAE.from_pretrained(family.vae_kind, str(path), subfolder="vae", dtype=dtype)
    denoiser = None
    if transformer:
        net = getattr(diffusers, info.classes["transformer"]).from_pretrained(
            path, subfolder="transformer", torch_dtype=resolve_dtype(dtype)
        ).eval()
        if family is LTX:
            denoiser = LTXDenoiser(net, *compression("ltx", info.configs["vae"]), frame_rate)
        else:
            denoiser = WanDenoiser(net, expand_timesteps=family is WAN22)
    encoder = T5TextEncoder(path, context_length=family.context_length, dtype=dtype,
                            **TEXT_STYLE[family.vae_kind]) if text else None  # fmt: skip
    scheduler = getattr(diffusers, info.classes["scheduler"]).from_pretrained(path, subfolder="scheduler")
    return ReleasedModel(info, denoiser, autoencoder, encoder, scheduler)


SAMPLERS = ("default", "euler")


@torch.no_grad()
def sample_released(model: ReleasedModel, prompts: list[str], negative: str | list[str] = "", *, num_frames: int,
                    height: int, width: int, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                    sampler: str = "default", batched: bool = True, callback: Callable | None = None,
                    image=None) -> torch.Tensor:  # fmt: skip
    """Normalised latents (B, C, t, h, w) for `prompts`, as the family's diffusers pipeline samples them.

    Noise: torch.randn of the latent shape from a CPU generator seeded with `seed` (diffusers' draw). CFG:
    uncond + guidance (cond - uncond) with the `negative` prompt (default ""). sampler "default": the folder's
    scheduler (UniPC for Wan) through diffusion.sample_scheduler; "euler": diffusion.sample_euler on
    euler_sigmas. steps/guidance default to the pipeline's (50; 5.0 for Wan, 3.0 for LTX-Video).
    image (a path or uint8 (H, W, 3); Wan2.2-TI2V only): image-to-video as WanImageToVideoPipeline(expand_timesteps=
    True) does it, through minisora's conditioning.clean_known: frame 0 is the image's posterior mean, normalised,
    given with t = 0 on its tokens, and pinned at the end.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if model.text is None:
        raise ValueError("sample_released needs the text encoder: load_released(..., text=True)")
    family = model.info.family
    steps, guidance = steps or family.steps, family.guidance if guidance is None else guidance
    negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    C, T, H, W = model.latent_shape(num_frames, height, width)
    device = next(model.denoiser.parameters()).device
    noise = torch.randn((len(prompts), C, T, H, W), generator=torch.Generator("cpu").manual_seed(seed)).to(device)
    context, mask = model.text(prompts)  # (B, L, D), (B, L)
    null, null_mask = model.text(negative)
    velocity = diffusion.cfg_model(model.denoiser, guidance, dict(context=context, context_mask=mask),
                                   dict(context=null, context_mask=null_mask), batched=batched)  # fmt: skip
    known = None
    if image is not None:
        known = _first_frame(model, image, height, width).to(device)  # (1, C, 1, h, w)
        velocity = clean_known(velocity, known)
    x = sample_from_noise(model, velocity, noise, steps, sampler, callback)
    if known is not None:  # frame 0 is the image's latent exactly (the pipeline's last step does the same)
        x[:, :, :1] = known
    return x


def sample_from_noise(model: ReleasedModel, velocity: Callable, noise: torch.Tensor, steps: int,
                      sampler: str = "default", callback: Callable | None = None) -> torch.Tensor:  # fmt: skip
    """Integrate a (guided) velocity callable from `noise` (B, C, t, h, w) on the family's grid: "default" the
    folder's scheduler, "euler" diffusion.sample_euler on euler_sigmas (what sample_released and the pipeline run)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} for a released model, got {sampler!r}")
    tokens = model.denoiser.tokens(*noise.shape[2:])
    if sampler == "euler":
        sigmas = model.euler_sigmas(steps, tokens).to(noise.device)
        return diffusion.sample_euler(velocity, noise, sigmas, callback=callback)
    return diffusion.sample_scheduler(velocity, noise, model.scheduler, steps, callback=callback,
                                      **model.schedule(steps, tokens))  # fmt: skip


def _first_frame(model: ReleasedModel, image, height: int, width: int) -> torch.Tensor:
    """An image as Wan2.2-TI2V's first latent frame (1, C, 1, h, w): fitted, scaled to [-1, 1], posterior mean."""
    if model.info.family is not WAN22:
        raise ValueError(f"{model.info.path}: image-to-video through per-token timesteps is Wan2.2-TI2V's; this is "
                         f"{model.info.family.name}")  # fmt: skip
    if model.vae is None:
        raise ValueError("image-to-video needs the autoencoder: load_released(..., vae=True)")
    frames = load_frames(image, 1, height, width)  # (1, H, W, 3) uint8
    video = rearrange(torch.from_numpy(frames), "t h w c -> 1 c t h w").float() / 127.5 - 1  # (1, 3, 1, H, W)
    return model.vae.encode(video.to(next(model.vae.parameters()).device))  # normalised, as the pipeline does
