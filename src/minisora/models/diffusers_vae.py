"""Pretrained autoencoders from `diffusers` behind the `Autoencoder` interface (optional: `pip install -e .[diffusers]`).

Three families, one adapter (`DiffusersVAE`), chosen by `kind`:

| kind | diffusers class | compression t x h x w, channels | frames |
|---|---|---|---|
| "ltx" | AutoencoderKLLTXVideo (LTX-Video) | 8 x 32 x 32, 128 | T = 1 + 8k |
| "wan" | AutoencoderKLWan (Wan2.1) | 4 x 8 x 8, 16 | T = 1 + 4k |
| "sd" | AutoencoderKL, frame by frame (Latte's setting) | 1 x 8 x 8, 4 | any T |

Compression and latent statistics are read from the loaded model (its config, and for LTX its
`latents_mean`/`latents_std` buffers), never hard-coded, and land in the Autoencoder's shift/scale buffers,
so `encode` returns what the model's own diffusers pipeline feeds its transformer: (z - mean) * scaling / std.
Nothing here imports diffusers until a model is built: importing minisora never needs it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from minisora.device import resolve_dtype
from minisora.models.autoencoder import Autoencoder, save_autoencoder

# kind -> the diffusers class it wraps.
DIFFUSERS_CLASSES = {"ltx": "AutoencoderKLLTXVideo", "wan": "AutoencoderKLWan", "sd": "AutoencoderKL"}
# Frames per call of a per-frame image VAE: bounds memory (a 17x256x256 clip is 17 images) without a call per frame.
FRAMES_PER_CALL = 16
INSTALL_HINT = "pip install -e .[diffusers]"


def require_diffusers() -> Any:
    """The diffusers module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f"pretrained autoencoders (pretrained_vae, kind ltx/wan/sd) need the optional package diffusers: "
            f"{INSTALL_HINT}  (or pip install 'diffusers>=0.33'); import failed: {e}"
        ) from None
    return diffusers


def _check_kind(kind: str) -> None:
    if kind not in DIFFUSERS_CLASSES:
        raise ValueError(f"kind must be one of {', '.join(DIFFUSERS_CLASSES)} (pretrained autoencoder family), got {kind!r}")


def compression(kind: str, cfg: dict[str, Any]) -> tuple[int, int]:
    """(temporal, spatial) compression of a diffusers autoencoder, from its config (a model's, or its config.json)."""
    if kind == "ltx":  # the config's ratios when set, else what its patch sizes and scaling blocks imply
        scalings = sum(cfg["spatio_temporal_scaling"])
        t = cfg.get("temporal_compression_ratio") or cfg["patch_size_t"] * 2**scalings
        s = cfg.get("spatial_compression_ratio") or cfg["patch_size"] * 2**scalings
        return int(t), int(s)
    if kind == "wan":  # scale_factor_* exist from diffusers 0.35 (Wan2.2); older configs imply them by their layout
        t = cfg.get("scale_factor_temporal") or 2 ** sum(cfg["temperal_downsample"])
        s = cfg.get("scale_factor_spatial") or 2 ** (len(cfg["dim_mult"]) - 1) * (cfg.get("patch_size") or 1)
        return int(t), int(s)
    return 1, 2 ** (len(cfg["block_out_channels"]) - 1)  # per-frame image VAE: what its pipelines call vae_scale_factor


def latent_stats(kind: str, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (shift, scale) such that (z - shift) / scale is what the model's diffusers pipeline diffuses.

    LTX: (z - latents_mean) * scaling_factor / latents_std, the statistics being buffers of the model.
    Wan: (z - latents_mean) / latents_std from its config. SD-style: (z - shift_factor) * scaling_factor
    (latents_mean/std when the config has them, as SDXL's may).
    """
    cfg, C = model.config, int(model.config.get("latent_channels") or model.config.get("z_dim"))
    sf = 1.0
    if kind == "ltx":
        mean, std, sf = model.latents_mean, model.latents_std, cfg.get("scaling_factor", 1.0)
    elif kind == "wan":
        mean, std = cfg["latents_mean"], cfg["latents_std"]
    else:
        mean = cfg.get("latents_mean") or [cfg.get("shift_factor") or 0.0] * C
        std, sf = cfg.get("latents_std") or [1.0] * C, cfg.get("scaling_factor", 1.0)
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(std, dtype=torch.float32).flatten()
    if mean.numel() != C or std.numel() != C:
        raise ValueError(f"{kind} autoencoder: latents_mean/latents_std have {mean.numel()}/{std.numel()} values, "
                         f"expected one per latent channel ({C})")  # fmt: skip
    return mean, std / float(sf)


class DiffusersVAE(Autoencoder):
    """A diffusers autoencoder as a minisora Autoencoder: video (B, 3, T, H, W) in [-1, 1] <-> normalised latents.

    Built from `diffusers_config` with random weights (what load_autoencoder does before loading the file's
    weights), or around an already loaded `model` (what from_pretrained does). `dtype` sets the weights'
    dtype ("auto": bfloat16 on a CUDA machine, float32 otherwise); inputs are cast to it and outputs returned
    in float32. `tiling` switches on diffusers' own spatial tiling (used above its tile size only).
    """

    def __init__(
        self,
        kind: str,
        diffusers_config: dict[str, Any],
        dtype: str = "auto",
        tiling: bool = True,
        source: str | None = None,
        model: nn.Module | None = None,
    ) -> None:
        _check_kind(kind)
        torch_dtype = resolve_dtype(dtype)
        if model is None:
            cls = getattr(require_diffusers(), DIFFUSERS_CLASSES[kind])
            model = cls.from_config(diffusers_config)
        config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
        C = int(config.get("latent_channels") or config.get("z_dim"))
        super().__init__(C)
        if next(model.parameters()).dtype != torch_dtype:
            model = model.to(torch_dtype)
        self.vae = model.eval()
        if tiling:
            self.vae.enable_tiling()  # every class here has it (AutoencoderMixin); it tiles only above its tile size
        self.set_latent_stats(*latent_stats(kind, self.vae))
        self._kt, self._s = compression(kind, self.vae.config)
        # JSON-able: save_autoencoder writes it, load_autoencoder passes it back to this constructor.
        self.config = dict(kind=kind, diffusers_config=_jsonable(config), dtype=dtype, tiling=tiling, source=source)

    @classmethod
    def from_pretrained(
        cls, kind: str, path: str, subfolder: str | None = None, dtype: str = "auto", tiling: bool = True,
        revision: str | None = None,
    ) -> DiffusersVAE:  # fmt: skip
        """Load `path` (a hub repo id, downloaded once into the HF cache, or a local save_pretrained folder)."""
        _check_kind(kind)
        diffusers = require_diffusers()
        torch_dtype = resolve_dtype(dtype)
        local = Path(path).expanduser()
        # A hub id is "owner/name"; an absolute, home or dot path that is missing is a local folder mistyped,
        # which diffusers would otherwise report as a failed download.
        if str(path).startswith(("/", "~", ".")) and not local.is_dir():
            raise FileNotFoundError(f"pretrained_vae.path {path}: no such folder (expected a diffusers save_pretrained "
                                    f"folder holding {subfolder + '/' if subfolder else ''}config.json, or a hub id like "
                                    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")  # fmt: skip
        model = getattr(diffusers, DIFFUSERS_CLASSES[kind]).from_pretrained(
            path, subfolder=subfolder, revision=revision, torch_dtype=torch_dtype
        )
        source = path if not subfolder else f"{path}/{subfolder}"
        return cls(kind, dict(model.config), dtype=dtype, tiling=tiling, source=source, model=model)

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def temporal_compression(self) -> int:
        return self._kt

    @property
    def spatial_compression(self) -> int:
        return self._s

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @contextmanager
    def _tiling(self, tiled: bool | None):
        """diffusers' tiling as `tiled` says for one call (None: as configured)."""
        before = self.vae.use_tiling
        if tiled is not None:
            self.vae.use_tiling = tiled
        try:
            yield
        finally:
            self.vae.use_tiling = before

    def _moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance (B, C, t, h, w) of a (B, 3, T, H, W) video, in the model's dtype."""
        x = video.to(self.dtype)
        if self.kind != "sd":
            dist = self.vae.encode(x).latent_dist
            return dist.mean, dist.logvar
        B = x.shape[0]
        frames = rearrange(x, "b c t h w -> (b t) c h w")  # an image VAE sees every frame as an image
        dists = [self.vae.encode(f).latent_dist for f in frames.split(FRAMES_PER_CALL)]
        mean, logvar = (torch.cat([getattr(d, k) for d in dists]) for k in ("mean", "logvar"))  # (B*T, C, h, w) each
        return tuple(rearrange(m, "(b t) c h w -> b c t h w", b=B) for m in (mean, logvar))  # (B, C, T, h, w) each

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents (B, C, t, h, w) -> video (B, 3, T, H, W) in the model's dtype."""
        z = z.to(self.dtype)
        if self.kind == "ltx" and self.vae.config.get("timestep_conditioning"):
            # LTX-Video 0.9.1+ decoders take a denoising timestep; 0 decodes clean latents (LTXPipeline's default).
            temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
            return self.vae.decode(z, temb).sample
        if self.kind != "sd":
            return self.vae.decode(z).sample
        B = z.shape[0]
        frames = rearrange(z, "b c t h w -> (b t) c h w")
        out = torch.cat([self.vae.decode(f).sample for f in frames.split(FRAMES_PER_CALL)])
        return rearrange(out, "(b t) c h w -> b c t h w", b=B)  # (B, 3, T, H, W)

    def encode_raw(self, video: torch.Tensor, sample: bool = False, tiled: bool | None = None) -> torch.Tensor:
        self.check_video(video)
        with self._tiling(tiled):
            mean, logvar = self._moments(video)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return z.float()  # (B, C, t, h, w)

    def decode_raw(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        self.check_latents(latents)
        with self._tiling(tiled):
            return self._decode(latents).float().clamp(-1.0, 1.0)  # (B, 3, T, H, W)

    def forward(self, video: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_video(video)
        mean, logvar = self._moments(video)  # (B, C, t, h, w) each
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self._decode(z).float(), mean.float(), logvar.float()


def _jsonable(value: Any) -> Any:
    """A diffusers config as plain JSON types (tuples to lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def import_pretrained_vae(
    kind: str, path: str, subfolder: str | None = None, dtype: str = "auto", tiling: bool = True,
    revision: str | None = None,
) -> DiffusersVAE:  # fmt: skip
    """The `pretrained_vae` config section: a diffusers autoencoder (hub id or local folder) as a minisora Autoencoder.

    kind: "ltx" (AutoencoderKLLTXVideo), "wan" (AutoencoderKLWan) or "sd" (AutoencoderKL, per frame).
    path/subfolder/revision: as diffusers' from_pretrained takes them. dtype: auto, float32, bfloat16, float16.
    """
    return DiffusersVAE.from_pretrained(kind, path, subfolder=subfolder, dtype=dtype, tiling=tiling, revision=revision)


def save_pretrained_vae(out: str | Path, **options: Any) -> Path:
    """import_pretrained_vae(**options) written to `out` as a minisora autoencoder file, unless one is there.

    Processes of one run take turns (a file lock): the first imports, the others find the file. The file is
    written under a temporary name and renamed, so a killed import never leaves a half-written autoencoder.
    """
    from minisora.files import file_lock, partial_path, remove_stale_partials

    out = Path(out)
    with file_lock(out.parent / f".{out.name}.lock"):
        remove_stale_partials(out.parent, out.name)
        if out.is_file():
            return out
        vae = import_pretrained_vae(**options)
        tmp = save_autoencoder(vae, partial_path(out))
        os.replace(tmp, out)
    return out
