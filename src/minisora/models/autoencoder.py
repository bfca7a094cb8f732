"""Video autoencoders: the `Autoencoder` interface, the causal 3D `VideoVAE`, and self-describing save/load.

Later stages only see the interface: `encode` returns latents normalised to ~N(0, 1) per channel with the
`shift`/`scale` buffers (measured after training, see training.lit_autoencoder.estimate_latent_stats),
`decode` takes them back to video in [-1, 1].
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch
from einops import reduce
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minisora.models.state_dict import mismatch_report
from minisora.models.tiling import chunked_causal, tiled_spatial
from minisora.models.vae_blocks import (
    NORMS,
    CausalConv3d,
    Downsample,
    FrameAttention,
    ResBlock,
    Upsample,
    channel_to_space_time,
    make_norm,
    space_time_to_channel,
)


class Autoencoder(nn.Module):
    """Interface: video (B, 3, T, H, W) in [-1, 1] <-> normalised latents (B, C, t, h, w).

    Subclasses implement encode_raw/decode_raw/forward and the compression properties, and keep their
    JSON-able constructor arguments in `self.config` so save_autoencoder can describe the file.
    """

    config: dict

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(latent_channels))
        self.register_buffer("scale", torch.ones(latent_channels))

    @property
    def latent_channels(self) -> int:
        return self.shift.numel()

    @property
    def temporal_compression(self) -> int:
        raise NotImplementedError

    @property
    def spatial_compression(self) -> int:
        raise NotImplementedError

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of the latents of a T x H x W video (causal: the first frame is encoded alone)."""
        kt, s = self.temporal_compression, self.spatial_compression
        return self.latent_channels, 1 + (T - 1) // kt, H // s, W // s

    def check_video(self, video: torch.Tensor) -> None:
        """Raise a ValueError naming the expected shape unless `video` is (B, 3, 1 + k*kt, s*m, s*n) float."""
        kt, s = self.temporal_compression, self.spatial_compression
        expected = f"(B, 3, T, H, W) float video with T = 1 + {kt}k frames and H, W multiples of {s}"
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected {expected}, got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"expected {expected} in [-1, 1], got dtype {video.dtype}")
        B, C, T, H, W = video.shape
        if (T - 1) % kt:
            frames = ", ".join(str(1 + kt * k) for k in range(5))
            raise ValueError(f"expected T = 1 + {kt}k frames ({frames}, ...), got {T}")
        if H % s or W % s or H == 0 or W == 0:
            raise ValueError(f"expected H and W to be multiples of {s} (the spatial compression), got {H}x{W}")

    def check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels or not latents.is_floating_point():
            raise ValueError(
                f"expected float latents (B, {self.latent_channels}, t, h, w), got {tuple(latents.shape)} {latents.dtype}"
            )

    def encode_raw(self, video: torch.Tensor, sample: bool = False, tiled: bool | None = None) -> torch.Tensor:
        """Un-normalised latents: the posterior mean, or a sample of the posterior if `sample`."""
        raise NotImplementedError

    def decode_raw(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, video: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, posterior mean, posterior log-variance), all un-normalised."""
        raise NotImplementedError

    def last_layer(self) -> torch.Tensor | None:
        """The weight that produces the output pixels (for the adaptive GAN weight), if there is one."""
        return None

    def _stat(self, name: str, latents: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).to(latents.dtype)[None, :, None, None, None]

    def encode(self, video: torch.Tensor, sample: bool = False, tiled: bool | None = None) -> torch.Tensor:
        """Normalised latents (z - shift) / scale; `tiled=None` tiles/chunks only inputs above the limits."""
        z = self.encode_raw(video, sample=sample, tiled=tiled)
        return (z - self._stat("shift", z)) / self._stat("scale", z)

    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Video in ~[-1, 1] from normalised latents."""
        self.check_latents(latents)
        return self.decode_raw(latents * self._stat("scale", latents) + self._stat("shift", latents), tiled=tiled)

    def set_latent_stats(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        self.shift.copy_(shift)
        self.scale.copy_(scale)


def _log2(value: int) -> int:
    return int(math.log2(value))


class Encoder(nn.Module):
    """Causal conv in, [ResBlocks, Downsample] per level, mid blocks, conv to posterior mean and log-variance."""

    def __init__(
        self,
        channels: list[int],
        factors: list[tuple[int, int]],
        latent: int,
        blocks: int,
        attention: bool,
        norm: str,
        patch: int,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.conv_in = CausalConv3d(3 * patch * patch, channels[0])
        layers: list[nn.Module] = []
        for (c_in, c_out), (ft, fs) in zip(zip(channels[:-1], channels[1:]), factors):
            layers += [ResBlock(c_in, norm) for _ in range(blocks)] + [Downsample(c_in, c_out, ft, fs)]
        c = channels[-1]
        layers += [ResBlock(c, norm)] + ([FrameAttention(c, norm), ResBlock(c, norm)] if attention else [])
        self.body = nn.Sequential(*layers)
        self.norm_out = make_norm(norm, c)
        self.conv_out = CausalConv3d(c, 2 * latent)
        # The log-variance starts at -8 (std 0.02): with the KL weight small, sampling noise of std 1 at init
        # drowned the signal and slowed early training (PSNR 14 dB after 200 steps on shapes).
        with torch.no_grad():
            self.conv_out.conv.weight[latent:].zero_()
            self.conv_out.conv.bias[latent:].fill_(-8.0)
        # DC-AE's output shortcut: the mean starts as channel-group averages of the features.
        self.group = c // latent if c % latent == 0 else 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = space_time_to_channel(x, 1, self.patch)  # (B, 3*p*p, T, H/p, W/p)
        h = self.body(self.conv_in(x))  # (B, C_last, t, h, w)
        mean, logvar = self.conv_out(torch.nn.functional.silu(self.norm_out(h))).chunk(2, dim=1)
        if self.group:
            mean = mean + reduce(h, "b (c g) t h w -> b c t h w", "mean", g=self.group)
        return mean, logvar.clamp(-30.0, 20.0)  # (B, C, t, h, w) each


class Decoder(nn.Module):
    """Mirror of Encoder: conv in (+ channel-repeat shortcut), mid blocks, [Upsample, ResBlocks] per level, conv out."""

    def __init__(
        self,
        channels: list[int],
        factors: list[tuple[int, int]],
        latent: int,
        blocks: int,
        attention: bool,
        norm: str,
        patch: int,
    ) -> None:
        super().__init__()
        self.patch = patch
        c = channels[-1]
        self.conv_in = CausalConv3d(latent, c)
        self.repeats = c // latent if c % latent == 0 else 0
        layers: list[nn.Module] = [ResBlock(c, norm)] + ([FrameAttention(c, norm), ResBlock(c, norm)] if attention else [])
        for (c_out, c_in), (ft, fs) in reversed(list(zip(zip(channels[:-1], channels[1:]), factors))):
            layers += [Upsample(c_in, c_out, ft, fs)] + [ResBlock(c_out, norm) for _ in range(blocks)]
        self.body = nn.Sequential(*layers)
        self.norm_out = make_norm(norm, channels[0])
        self.conv_out = CausalConv3d(channels[0], 3 * patch * patch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.repeats:
            h = h + z.repeat_interleave(self.repeats, dim=1)
        h = self.body(h)  # (B, C_0, T, H, W)
        h = self.conv_out(torch.nn.functional.silu(self.norm_out(h)))  # (B, 3*p*p, T, H/p, W/p)
        return channel_to_space_time(h, 1, self.patch)  # (B, 3, T, H, W)


class VideoVAE(Autoencoder):
    """Causal 3D-convolution VAE: T x H x W -> (1 + (T-1)/kt) x H/s x W/s latents; an image is a 1-frame video.

    Inputs must have T = 1 + k*kt frames and H, W divisible by s (a ValueError says so; nothing is padded
    silently). Inputs larger than `tile_size` px or `chunk_frames` frames are encoded/decoded in blended
    spatial tiles and exact causal temporal chunks unless `tiled=False`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        base_channels: int = 64,
        channel_multipliers: list[int] | None = None,
        num_res_blocks: int = 1,
        temporal_compression: int = 4,
        spatial_compression: int = 8,
        patch_size: int = 1,
        mid_attention: bool = False,
        norm: str = "rms",
        tile_size: int = 256,
        tile_overlap: int = 32,
        chunk_frames: int = 16,
    ) -> None:
        super().__init__(latent_channels)
        if in_channels != 3:
            raise ValueError(f"in_channels must be 3 (RGB video), got {in_channels}")
        if temporal_compression not in (1, 2, 4, 8):
            raise ValueError(f"temporal_compression must be one of 1, 2, 4, 8, got {temporal_compression}")
        if spatial_compression not in (4, 8, 16, 32):
            raise ValueError(f"spatial_compression must be one of 4, 8, 16, 32, got {spatial_compression}")
        if not 4 <= latent_channels <= 128:
            raise ValueError(f"latent_channels must be in 4..128, got {latent_channels}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if num_res_blocks < 0 or base_channels < 1:
            raise ValueError(f"num_res_blocks must be >= 0 and base_channels >= 1, got {num_res_blocks}, {base_channels}")
        s, kt = spatial_compression, temporal_compression
        if patch_size not in (1, 2, 4) or patch_size > s:
            raise ValueError(f"patch_size must be one of 1, 2, 4 and at most spatial_compression ({s}), got {patch_size}")
        if tile_size % s or tile_overlap % s or not 0 <= tile_overlap < tile_size:
            raise ValueError(
                f"tile_size ({tile_size}) and tile_overlap ({tile_overlap}) must be multiples of spatial_compression "
                f"({s}) with 0 <= tile_overlap < tile_size"
            )
        if chunk_frames < kt or chunk_frames % kt:
            raise ValueError(f"chunk_frames must be a positive multiple of temporal_compression ({kt}), got {chunk_frames}")
        # Spatial halvings on the first levels, temporal halvings on the last (deepest, cheapest) ones.
        ns, nt = _log2(s // patch_size), _log2(kt)
        levels = max(ns, nt)
        factors = [(2 if i >= levels - nt else 1, 2 if i < ns else 1) for i in range(levels)]
        mults = channel_multipliers if channel_multipliers is not None else [min(2**i, 4) for i in range(levels + 1)]
        if len(mults) != levels + 1:
            raise ValueError(
                f"channel_multipliers needs {levels + 1} entries (one per resolution: {levels} downsamplings for "
                f"{kt}x temporal, {s}x spatial), got {len(mults)}: {mults}"
            )
        channels = [base_channels * m for m in mults]
        self.config = dict(
            in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels,
            channel_multipliers=list(mults), num_res_blocks=num_res_blocks, temporal_compression=kt,
            spatial_compression=s, patch_size=patch_size, mid_attention=mid_attention, norm=norm, tile_size=tile_size,
            tile_overlap=tile_overlap, chunk_frames=chunk_frames,
        )  # fmt: skip
        args = (channels, factors, latent_channels, num_res_blocks, mid_attention, norm, patch_size)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)

    @property
    def temporal_compression(self) -> int:
        return self.config["temporal_compression"]

    @property
    def spatial_compression(self) -> int:
        return self.config["spatial_compression"]

    def _auto(self, tiled: bool | None, T: int, H: int, W: int, tile: int, chunk: int) -> tuple[bool, bool]:
        """Whether to tile space and chunk time: forced by `tiled`, else only above the limits."""
        if tiled is not None:
            return tiled, tiled
        return max(H, W) > tile, T > 1 + chunk

    def encode_raw(self, video: torch.Tensor, sample: bool = False, tiled: bool | None = None) -> torch.Tensor:
        self.check_video(video)
        cfg, s = self.config, self.spatial_compression
        _, _, T, H, W = video.shape
        spatial, temporal = self._auto(tiled, T, H, W, cfg["tile_size"], cfg["chunk_frames"])

        def run(x: torch.Tensor) -> torch.Tensor:
            if temporal:
                return chunked_causal(self._posterior_mean, self.encoder, x, 1 + cfg["chunk_frames"], cfg["chunk_frames"])
            return self._posterior_mean(x)

        if sample:  # sampling needs the log-variance too; it is only used in training-sized calls
            mean, logvar = self.encoder(video)
            return mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        if spatial:
            return tiled_spatial(run, video, cfg["tile_size"], cfg["tile_overlap"], 1 / s, align=s)
        return run(video)  # (B, C, t, h, w)

    def _posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]

    def decode_raw(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        self.check_latents(latents)
        cfg, s, kt = self.config, self.spatial_compression, self.temporal_compression
        _, _, t, h, w = latents.shape
        tile, chunk = cfg["tile_size"] // s, cfg["chunk_frames"] // kt
        spatial, temporal = self._auto(tiled, t, h, w, tile, chunk)

        def run(z: torch.Tensor) -> torch.Tensor:
            if temporal:
                return chunked_causal(self.decoder, self.decoder, z, 1 + chunk, chunk)
            return self.decoder(z)

        if spatial:
            return tiled_spatial(run, latents, tile, cfg["tile_overlap"] // s, s)
        return run(latents)  # (B, 3, T, H, W)

    def forward(self, video: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_video(video)
        mean, logvar = self.encoder(video)  # (B, C, t, h, w) each
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decoder(z), mean, logvar

    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, for the adaptive GAN weight of the training loss."""
        return self.decoder.conv_out.conv.weight

    def save_pretrained(self, path: str | Path) -> Path:
        """Write weights, latent shift/scale and the constructor config to one safetensors file."""
        return save_autoencoder(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VideoVAE:
        vae = load_autoencoder(path)
        if not isinstance(vae, cls):
            raise ValueError(f"{path} holds a {type(vae).__name__}, not a {cls.__name__}")
        return vae


KINDS: dict[str, type[Autoencoder]] = {"VideoVAE": VideoVAE}
# Kinds defined over an optional package, added to KINDS when a file of theirs is loaded: their module subclasses
# Autoencoder (so this file cannot import it) and imports the package itself only when it builds a model.
OPTIONAL_KINDS = {"DiffusersVAE": "minisora.models.diffusers_vae"}


def save_autoencoder(model: Autoencoder, path: str | Path) -> Path:
    """Save an autoencoder as one safetensors file whose metadata holds its kind and constructor config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"kind": type(model).__name__, "config": json.dumps(model.config), "format": "minisora-autoencoder-1"}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """Rebuild an autoencoder saved by save_autoencoder; a config/weights mismatch raises listing the tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no autoencoder file at {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "kind" not in meta or "config" not in meta:
        raise ValueError(f"{path} is not a minisora autoencoder file (metadata lacks 'kind'/'config': {sorted(meta)})")
    if meta["kind"] in OPTIONAL_KINDS and meta["kind"] not in KINDS:
        KINDS[meta["kind"]] = getattr(importlib.import_module(OPTIONAL_KINDS[meta["kind"]]), meta["kind"])
    if meta["kind"] not in KINDS:
        raise ValueError(f"{path}: unknown autoencoder kind {meta['kind']!r}; known: {', '.join(KINDS)}")
    config = json.loads(meta["config"])
    try:
        model = KINDS[meta["kind"]](**config)
    except TypeError as e:
        raise ValueError(f"{path}: config does not fit {meta['kind']}: {e}") from None
    report = mismatch_report(tensors, model)
    if report:
        raise ValueError("\n".join([f"{path}: weights do not match its config {config}", *report]))
    model.load_state_dict(tensors)
    return model.to(device).eval()
