"""VideoVAE: shapes, causality, exact temporal chunking, blended tiling, save/load, and bad input."""

import json

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from minisora.eval.metrics import psnr
from minisora.models.autoencoder import VideoVAE, load_autoencoder
from minisora.models.tiling import tile_starts, tiled_spatial


def tiny(**kw) -> VideoVAE:
    """A small random-init VAE; weights perturbed so zero-initialised residual branches matter too."""
    args = dict(latent_channels=4, base_channels=8, temporal_compression=4, spatial_compression=4, norm="rms")
    args.update(kw)
    torch.manual_seed(0)
    vae = VideoVAE(**args).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae


def smooth_video(B: int, T: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """A smooth random video in [-1, 1] (upsampled noise), closer to real footage than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 3, T, max(H // 8, 1), max(W // 8, 1), generator=g) * 2 - 1
    return F.interpolate(coarse, size=(T, H, W), mode="trilinear", align_corners=False)


@pytest.mark.parametrize(
    "kt,s,patch,T,H,W",
    [(4, 4, 1, 1, 8, 12), (4, 4, 2, 17, 32, 32), (4, 8, 1, 9, 16, 24), (8, 32, 4, 17, 64, 32), (1, 4, 1, 3, 8, 8),
     (2, 16, 1, 5, 32, 16), (8, 4, 1, 9, 8, 8)],
)  # fmt: skip
def test_shapes_for_images_and_videos(kt, s, patch, T, H, W):
    vae = tiny(temporal_compression=kt, spatial_compression=s, patch_size=patch, latent_channels=8)
    x = smooth_video(2, T, H, W)
    with torch.no_grad():
        z = vae.encode(x)
        y = vae.decode(z)
        recon, mean, logvar = vae(x)
    expected = (8, 1 + (T - 1) // kt, H // s, W // s)
    assert vae.latent_shape(T, H, W) == expected
    assert z.shape == (2, *expected) and mean.shape == logvar.shape == z.shape
    assert y.shape == x.shape and recon.shape == x.shape
    assert torch.isfinite(y).all()


def test_encoder_and_decoder_are_causal():
    vae = tiny(mid_attention=True)
    x = smooth_video(1, 13, 16, 16)  # latent frames: [0], [1..4], [5..8], [9..12]
    later, first = x.clone(), x.clone()
    later[:, :, 10] += 0.5  # a frame inside latent frame 3
    first[:, :, 0] += 0.5
    with torch.no_grad():
        z, z_later, z_first = vae.encode(x), vae.encode(later), vae.encode(first)
        y = vae.decode(z)
        z_edit = z.clone()
        z_edit[:, :, 2] += 1.0  # latent frame 2 decodes to frames 5..8
        y_edit = vae.decode(z_edit)
    assert torch.equal(z_later[:, :, :3], z[:, :, :3])
    assert (z_later[:, :, 3] - z[:, :, 3]).abs().max() > 1e-3
    assert all((z_first[:, :, i] - z[:, :, i]).abs().max() > 1e-4 for i in range(4))  # frame 0 reaches all
    assert torch.equal(y_edit[:, :, :5], y[:, :, :5])
    assert (y_edit[:, :, 5:] - y[:, :, 5:]).abs().max() > 1e-3


def test_temporal_chunking_is_exact():
    vae = tiny(chunk_frames=4, tile_size=64)
    x = smooth_video(1, 21, 16, 16)
    with torch.no_grad():
        z_full, z_chunked = vae.encode(x, tiled=False), vae.encode(x)  # 21 frames > 1 + 4: chunked
        y_full, y_chunked = vae.decode(z_full, tiled=False), vae.decode(z_full)
        z_again = vae.encode(x, tiled=False)  # streaming state must not leak out of the chunked call
    assert torch.allclose(z_chunked, z_full, atol=1e-5)
    assert torch.allclose(y_chunked, y_full, atol=1e-5)
    assert torch.equal(z_again, z_full)


def test_tile_starts_cover_and_align():
    assert tile_starts(32, 64, 8) == [0]
    starts = tile_starts(100, 32, 8, align=4)
    assert starts[0] == 0 and starts[-1] == 68 and all(s % 4 == 0 for s in starts)
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))


def test_tiled_spatial_blending_is_exact_for_local_functions():
    x = torch.randn(1, 2, 3, 40, 56)
    out = tiled_spatial(lambda v: 2 * v, x, tile=16, overlap=8, scale=1)
    assert torch.allclose(out, 2 * x, atol=1e-6)
    pooled = tiled_spatial(lambda v: F.avg_pool3d(v, (1, 4, 4)), x, tile=16, overlap=8, scale=1 / 4, align=4)
    assert torch.allclose(pooled, F.avg_pool3d(x, (1, 4, 4)), atol=1e-6)


def test_tiled_matches_untiled_within_tolerance():
    # Tiles see zero padding where the full frame has neighbours; blending over the overlap hides most of it.
    # Measured on this random-init model, a worst case (trained models have a smaller effective receptive
    # field): with 64 px tiles and 32 px overlap, mean |diff| is 3-4% of the mean magnitude, decoded video
    # agrees to ~42 dB PSNR; with 16 px overlap 6%, 37 dB. Bounds: 8% and 35 dB.
    vae = tiny(tile_size=64, tile_overlap=32, chunk_frames=4)
    x = smooth_video(1, 5, 96, 96)
    with torch.no_grad():
        z, z_tiled = vae.encode(x, tiled=False), vae.encode(x, tiled=True)
        y, y_tiled = vae.decode(z, tiled=False), vae.decode(z, tiled=True)
    for full, tiled in ((z, z_tiled), (y, y_tiled)):
        rel = (tiled - full).abs().mean() / full.abs().mean()
        assert rel < 0.08, f"tiled differs from untiled by {rel:.3f} of the mean magnitude"
    assert psnr(y_tiled, y).item() > 35.0


def test_real_video_encode_decode_tiled(shared_videos):
    # 4 s (121 frames) of a real 640x360 clip at its native size, cropped to 640x352 (multiples of 16): 256 px
    # tiles and 16-frame causal chunks are engaged automatically; a small random model keeps it to seconds.
    with av.open(str(shared_videos / "lagos.mp4")) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == 121:
                break
    video = torch.from_numpy(np.stack(frames)[:, 4:356]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    assert video.shape == (1, 3, 121, 352, 640)
    vae = tiny(spatial_compression=16, patch_size=4, tile_size=256, tile_overlap=64, chunk_frames=16)
    with torch.no_grad():
        z = vae.encode(video)
        y = vae.decode(z)
    assert z.shape == (1, 4, 31, 22, 40)
    assert y.shape == video.shape and torch.isfinite(y).all()
    # Tiled vs untiled on a small crop of the same footage (an untiled 121x352x640 pass is what tiling avoids).
    crop = video[:, :, :17, :160, :288]
    with torch.no_grad():
        small = tiny(spatial_compression=16, patch_size=4, tile_size=128, tile_overlap=64, chunk_frames=16)
        z_full, z_tiled = small.encode(crop, tiled=False), small.encode(crop, tiled=True)
    assert ((z_tiled - z_full).abs().mean() / z_full.abs().mean()).item() < 0.08  # the bound used above
    # Chunking alone (tiles larger than the frame) is exact on real footage too.
    same = tiny(spatial_compression=16, patch_size=4, tile_size=1024, chunk_frames=16)
    with torch.no_grad():
        assert torch.allclose(same.encode(video[:, :, :49, :128, :128]),
                              small.encode(video[:, :, :49, :128, :128], tiled=False), atol=1e-4)  # fmt: skip


def test_save_load_round_trip(tmp_path):
    vae = tiny(spatial_compression=8, patch_size=2, mid_attention=True)
    vae.set_latent_stats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.5, 0.5, 2.0, 1.0]))
    path = vae.save_pretrained(tmp_path / "vae.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "VideoVAE" and json.loads(meta["config"]) == vae.config
    loaded = VideoVAE.from_pretrained(path)
    x = smooth_video(1, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), vae.encode(x))
        assert torch.equal(loaded.decode(vae.encode(x)), vae.decode(vae.encode(x)))
    assert torch.equal(loaded.scale, vae.scale) and torch.equal(loaded.shift, vae.shift)
    assert type(load_autoencoder(path)) is VideoVAE


def test_load_reports_config_weight_mismatch(tmp_path):
    path = tiny().save_pretrained(tmp_path / "vae.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "config": json.dumps({**config, "latent_channels": 8})})
    with pytest.raises(ValueError, match="shape mismatch") as err:
        load_autoencoder(bad)
    assert "bad.safetensors" in str(err.value) and "encoder.conv_out.conv.weight" in str(err.value)
    tensors.pop("decoder.conv_in.conv.bias")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"missing in file \(1\): decoder.conv_in.conv.bias") as err:
        load_autoencoder(bad)
    assert "unexpected (1): extra.weight" in str(err.value)
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not a minisora autoencoder"):
        load_autoencoder(bad)


@pytest.mark.parametrize(
    "shape,dtype,message",
    [((1, 3, 16, 16, 16), torch.float32, r"expected T = 1 \+ 4k frames \(1, 5, 9, 13, 17, ...\), got 16"),
     ((1, 4, 5, 16, 16), torch.float32, r"got shape \(1, 4, 5, 16, 16\)"),
     ((3, 5, 16, 16), torch.float32, r"\(B, 3, T, H, W\)"),
     ((1, 3, 5, 18, 16), torch.float32, "multiples of 4.*got 18x16"),
     ((1, 3, 5, 16, 16), torch.uint8, "dtype torch.uint8")],
)  # fmt: skip
def test_bad_input_raises_clear_errors(shape, dtype, message):
    vae = tiny()
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape, dtype=dtype))
    with pytest.raises(ValueError, match=r"latents \(B, 4, t, h, w\)"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))


@pytest.mark.parametrize(
    "kwargs,message",
    [({"temporal_compression": 3}, "temporal_compression must be one of 1, 2, 4, 8, got 3"),
     ({"spatial_compression": 2}, "spatial_compression must be one of 4, 8, 16, 32, got 2"),
     ({"latent_channels": 256}, "latent_channels must be in 4..128, got 256"),
     ({"norm": "batch"}, "norm must be one of"),
     ({"patch_size": 8}, "patch_size must be one of 1, 2, 4"),
     ({"channel_multipliers": [1, 2]}, r"channel_multipliers needs 3 entries \(one per resolution: 2 down"),
     ({"tile_size": 102}, "multiples of spatial_compression"),
     ({"chunk_frames": 6}, "chunk_frames must be a positive multiple of temporal_compression"),
     ({"base_channels": 12, "channel_multipliers": [1, 1, 3]}, "choose base_channels/channel_multipliers")],
)  # fmt: skip
def test_bad_constructor_arguments_raise(kwargs, message):
    args = dict(latent_channels=4, base_channels=8, spatial_compression=4)
    with pytest.raises(ValueError, match=message):
        VideoVAE(**{**args, **kwargs})
