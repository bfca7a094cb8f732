"""Pretrained diffusers autoencoders (LTX-Video, Wan2.1, SD per frame) behind the Autoencoder interface.

Every model is a tiny random-weight instance of the real diffusers class, written with save_pretrained to a
local folder and loaded back through the same from_pretrained path a hub id takes: nothing is downloaded.
The tests that need diffusers skip when it is not installed (`pip install -e .[diffusers]`); the first one
proves the core never needs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minisora.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# kind -> (temporal, spatial) compression the configs' clip sizes must fit; checked against the real models below.
RULES = {"ltx": (8, 32), "wan": (4, 8), "sd": (1, 8)}
# Distinctive latent statistics written into the tiny models: they must land in the adapter's shift/scale.
LTX_MEAN, LTX_STD, LTX_SF = [0.1 * i for i in range(8)], [3.0 - 0.25 * i for i in range(8)], 2.0
WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, -0.4], [1.5, 2.5, 3.5, 4.5]
SD_SHIFT, SD_SF = 0.25, 0.5
# (kind, frames, side) per tiny model: LTX keeps its real 8x32x32 compression (tiny widths), so 64 px clips.
CLIPS = {"ltx": (17, 64), "wan": (9, 32), "sd": (5, 32)}


def test_core_never_imports_diffusers(tmp_path):
    """With `import diffusers` made to fail: minisora, its config schema and load_config work; asking for a
    pretrained autoencoder (Python or CLI) names the install command."""
    code = f"""
import sys
sys.modules["diffusers"] = None  # any `import diffusers` now raises ImportError
import minisora
from minisora.config import load_config, schema
schema()
assert load_config({str(ROOT / 'configs/shapes.yaml')!r}).pretrained_vae is None
assert load_config({str(ROOT / 'configs/vae/ltx.yaml')!r}).pretrained_vae.kind == "ltx"
from minisora.models.diffusers_vae import import_pretrained_vae
try:
    import_pretrained_vae("ltx", "Lightricks/LTX-Video", subfolder="vae")
except ImportError as e:
    assert "pip install -e .[diffusers]" in str(e), e
else:
    raise SystemExit("no ImportError")
from minisora.cli import main
assert main(["import-vae", "--config", {str(ROOT / 'configs/vae/wan.yaml')!r}, "--out", {str(tmp_path / 'v.safetensors')!r}]) == 2
print("core-ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "core-ok" in out.stdout, out.stdout + out.stderr
    assert "pip install -e .[diffusers]" in out.stderr  # the CLI's one-line error
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("kind", ["ltx", "wan", "sd"])
def test_configs_fit_the_vae_rules(kind):
    cfg = load_config(ROOT / f"configs/vae/{kind}.yaml")
    kt, s = RULES[kind]
    assert cfg.pretrained_vae.kind == kind and cfg.pretrained_vae.path
    assert (cfg.data.num_frames - 1) % kt == 0
    assert cfg.data.height % s == 0 and cfg.data.width % s == 0


# ---- with diffusers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[str, str | None]]:
    """kind -> (folder, subfolder) of a tiny random model of each diffusers class, as save_pretrained writes it."""
    diffusers = pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    ltx = diffusers.AutoencoderKLLTXVideo(
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), latent_channels=8, scaling_factor=LTX_SF,
    )  # fmt: skip
    ltx.latents_mean.copy_(torch.tensor(LTX_MEAN))  # LTX keeps its statistics as buffers (saved with the weights)
    ltx.latents_std.copy_(torch.tensor(LTX_STD))
    wan = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     latents_mean=WAN_MEAN, latents_std=WAN_STD)  # fmt: skip
    sd = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        scaling_factor=SD_SF, shift_factor=SD_SHIFT, sample_size=32,
    )  # fmt: skip
    ltx.save_pretrained(root / "ltx" / "vae")  # a pipeline-style repo: the VAE in its subfolder
    wan.save_pretrained(root / "wan")
    sd.save_pretrained(root / "sd")
    return {"ltx": (str(root / "ltx"), "vae"), "wan": (str(root / "wan"), None), "sd": (str(root / "sd"), None)}


def load(folders, kind: str, **kw):
    from minisora.models.diffusers_vae import import_pretrained_vae

    path, sub = folders[kind]
    return import_pretrained_vae(kind, path, subfolder=sub, dtype=kw.pop("dtype", "float32"), **kw)


def video(T: int, S: int, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, T, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "kind, compression, channels, latent",
    [("ltx", (8, 32), 8, (8, 3, 2, 2)), ("wan", (4, 8), 4, (4, 3, 4, 4)), ("sd", (1, 8), 4, (4, 5, 4, 4))],
)
def test_encode_decode_shapes(folders, kind, compression, channels, latent):
    vae = load(folders, kind)
    T, S = CLIPS[kind]
    assert (vae.temporal_compression, vae.spatial_compression, vae.latent_channels) == (*compression, channels)
    assert vae.latent_shape(T, S, S) == latent
    with torch.no_grad():
        z = vae.encode(video(T, S))
        x = vae.decode(z)
        recon, mean, logvar = vae(video(T, S), sample=False)
    assert z.shape == (2, *latent) and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert x.shape == (2, 3, T, S, S) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert recon.shape == (2, 3, T, S, S) and mean.shape == logvar.shape == (2, *latent)
    assert vae.config["source"].startswith(folders[kind][0])


@pytest.mark.parametrize("kind", ["ltx", "wan", "sd"])
def test_latent_stats_come_from_the_model(folders, kind):
    vae = load(folders, kind)
    C = vae.latent_channels
    expected = {
        "ltx": (LTX_MEAN, [s / LTX_SF for s in LTX_STD]),  # LTXPipeline: (z - mean) * scaling_factor / std
        "wan": (WAN_MEAN, WAN_STD),  # WanPipeline: (z - mean) / std
        "sd": ([SD_SHIFT] * C, [1 / SD_SF] * C),  # (z - shift_factor) * scaling_factor
    }[kind]
    torch.testing.assert_close(vae.shift, torch.tensor(expected[0]))
    torch.testing.assert_close(vae.scale, torch.tensor(expected[1]))
    T, S = CLIPS[kind]
    with torch.no_grad():
        raw = vae.encode_raw(video(T, S, B=1))
        z = vae.encode(video(T, S, B=1))
    torch.testing.assert_close(z, (raw - vae.shift[:, None, None, None]) / vae.scale[:, None, None, None])


@pytest.mark.parametrize("kind, T, H, message", [("ltx", 16, 64, "1 + 8k"), ("ltx", 17, 48, "multiples of 32"),
                                                 ("wan", 8, 32, "1 + 4k"), ("sd", 5, 36, "multiples of 8")])
def test_check_video_states_the_frame_rules(folders, kind, T, H, message):
    vae = load(folders, kind)
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        vae.encode(video(T, H, B=1))


def test_real_configs_have_the_published_compression():
    """The default constructors of AutoencoderKLLTXVideo/Wan are the released models (built on the meta device)."""
    diffusers = pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
    from minisora.models.diffusers_vae import DiffusersVAE, latent_stats

    sd_ema = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=256)  # fmt: skip
    for kind, cfg, channels in (("ltx", {}, 128), ("wan", {}, 16), ("sd", sd_ema, 4)):
        with torch.device("meta"):
            vae = DiffusersVAE(kind, cfg, dtype="float32")
        assert (vae.temporal_compression, vae.spatial_compression) == RULES[kind]
        assert vae.latent_channels == channels
    shift, scale = latent_stats("wan", diffusers.AutoencoderKLWan.from_config({}))  # Wan2.1's published statistics
    assert shift[0].item() == pytest.approx(-0.7571) and scale[0].item() == pytest.approx(2.8184)


def test_a_missing_local_folder_is_named_not_reported_as_a_failed_download(tmp_path):
    pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
    from minisora.models.diffusers_vae import DiffusersVAE

    missing = tmp_path / "no-such-vae"
    with pytest.raises(FileNotFoundError, match=f"pretrained_vae.path {missing}: no such folder .*vae/config.json"):
        DiffusersVAE.from_pretrained("wan", str(missing), subfolder="vae")


@pytest.mark.parametrize("kind, dtype", [("ltx", "float32"), ("wan", "bfloat16"), ("sd", "float32")])
def test_save_load_round_trip(folders, kind, dtype, tmp_path):
    from minisora.models.autoencoder import load_autoencoder, save_autoencoder
    from minisora.models.diffusers_vae import DiffusersVAE

    vae = load(folders, kind, dtype=dtype)
    assert vae.dtype == getattr(torch, dtype)
    path = save_autoencoder(vae, tmp_path / "vae.safetensors")
    back = load_autoencoder(path)
    assert type(back) is DiffusersVAE and back.config == vae.config and back.dtype == vae.dtype
    torch.testing.assert_close(back.shift, vae.shift)
    torch.testing.assert_close(back.scale, vae.scale)
    T, S = CLIPS[kind]
    with torch.no_grad():
        torch.testing.assert_close(back.encode(video(T, S, B=1)), vae.encode(video(T, S, B=1)), rtol=0, atol=0)


def test_timestep_conditioned_ltx_decoder(tmp_path):
    """LTX-Video 0.9.1+ decoders need a timestep: the adapter passes 0 (clean latents)."""
    diffusers = pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
    from minisora.models.diffusers_vae import import_pretrained_vae

    diffusers.AutoencoderKLLTXVideo(
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), latent_channels=8, timestep_conditioning=True,
    ).save_pretrained(tmp_path)  # fmt: skip
    vae = import_pretrained_vae("ltx", str(tmp_path), dtype="float32")
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, 8, 2, 1, 1)).shape == (1, 3, 9, 32, 32)


@pytest.mark.parametrize("kind", ["ltx", "wan", "sd"])
def test_dit_trains_on_the_latents(folders, kind):
    """A tiny VideoDiT overfits one batch of each autoencoder's latents: the rectified-flow loss falls."""
    from minisora import diffusion
    from minisora.models.dit import VideoDiT

    vae = load(folders, kind)
    T, S = CLIPS[kind]
    with torch.no_grad():
        x0 = vae.encode(video(T, S, B=4, seed=1))  # (4, C, t, h, w), normalised
    C, t, h, w = x0.shape[1:]
    torch.manual_seed(0)
    model = VideoDiT(in_channels=C, patch_size=[1, 1, 1] if h < 4 else [1, 2, 2], hidden_size=32, depth=1,
                     num_heads=2, condition="none")  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    noise, tt = torch.randn_like(x0), torch.full((4,), 0.5)
    losses = []
    for _ in range(15):
        loss = diffusion.flow_loss(model, x0, tt, noise, prediction="v").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_run_pipeline_on_a_pretrained_vae(folders, tmp_path, monkeypatch):
    """pretrained_vae in a config: imported once as the run's autoencoder file, then cache, DiT training,
    checkpoints, TextToVideoPipeline.from_pretrained and export work unchanged."""
    from minisora.config import load_config
    from minisora.models.autoencoder import load_autoencoder
    from minisora.models.diffusers_vae import DiffusersVAE
    from minisora.pipeline import TextToVideoPipeline
    from minisora.training.run import run_pipeline

    path, sub = folders["ltx"]
    monkeypatch.chdir(tmp_path)  # runs/ and data/ land here
    overrides = [
        "name=ltx", "shapes.num=8", "shapes.size=64", "data.height=64", "data.width=64", "data.vae_batch_size=4",
        "data.num_workers=0", f"pretrained_vae={{kind: ltx, path: {path}, subfolder: {sub}, dtype: float32}}",
        "text.width=32", "text.layers=1", "text.heads=1", "model.hidden_size=32", "model.depth=1",
        "model.num_heads=2", "model.patch_size=[1,1,1]", "latents.dit_batch_size=4", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.checkpoint_every=2", "trainer.enable_progress_bar=false",
        "sample.every_n_steps=0", "sample.steps=2", "shapes_eval=null",
    ]  # fmt: skip
    run_pipeline(load_config(ROOT / "configs/shapes.yaml", overrides))
    vae_file = tmp_path / "runs/ltx/vae/vae.safetensors"
    vae = load_autoencoder(vae_file)
    assert type(vae) is DiffusersVAE and vae.config["kind"] == "ltx"
    assert not (tmp_path / "runs/ltx/vae/checkpoints").exists()  # imported, not trained
    assert list((tmp_path / "runs/ltx/checkpoints").glob("*.ckpt"))

    pipe = TextToVideoPipeline.from_pretrained(tmp_path / "runs/ltx")
    assert isinstance(pipe.vae, DiffusersVAE) and pipe.latent_shape(17, 64, 64) == (8, 3, 2, 2)
    frames = pipe("a red circle moving left", num_frames=17, height=64, width=64, steps=2, seed=0)
    assert frames.shape == (17, 64, 64, 3) and frames.dtype.name == "uint8"
    exported = pipe.save_pretrained(tmp_path / "export")
    again = TextToVideoPipeline.from_pretrained(exported)
    assert isinstance(again.vae, DiffusersVAE) and again.vae.config == vae.config
