"""Reading released-model diffusers folders: the family, the parts, the denoiser interface, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
pytest.importorskip("transformers", reason="needs transformers: pip install -e .[diffusers]")

import released_folders as rf  # noqa: E402

from minisora.models.diffusers_folder import FolderError, describe  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released-folders")
    return {family: rf.build_folder(root, family) for family in rf.FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
    from minisora.models.released import load_released

    return {family: load_released(folder) for family, folder in folders.items()}


def copy(folder, tmp_path):
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_families_and_parts(folders, models):
    from minisora.models.diffusers_vae import DiffusersVAE
    from minisora.models.released import LTXDenoiser, WanDenoiser

    expected = {"wan21": ("wan2.1-t2v", WanDenoiser, (16, 3, 4, 4), (4, 8)),
                "wan22": ("wan2.2-ti2v", WanDenoiser, (48, 3, 4, 4), (4, 16)),
                "ltx": ("ltx-video", LTXDenoiser, (8, 3, 2, 2), (8, 32))}  # fmt: skip
    for family, (name, cls, latent, compression) in expected.items():
        model = models[family]
        assert describe(folders[family]).family.name == model.family == name
        assert type(model.denoiser) is cls and isinstance(model.vae, DiffusersVAE)
        assert model.latent_shape(*rf.CLIPS[family]) == model.vae.latent_shape(*rf.CLIPS[family]) == latent
        assert (model.vae.temporal_compression, model.vae.spatial_compression) == compression
        assert model.text.context_length == (128 if family == "ltx" else 512)
    assert models["wan22"].denoiser.expand_timesteps and not models["wan21"].denoiser.expand_timesteps
    assert type(models["wan21"].scheduler).__name__ == "UniPCMultistepScheduler"
    assert models["ltx"].denoiser.rope_interpolation_scale() == (8 / 25, 32, 32)


def test_wan22_vae_normalises_48_channels_per_channel(models):
    """Wan2.2's 48-channel VAE (patchified, 16x spatial) through DiffusersVAE: (z - latents_mean) / latents_std."""
    vae = models["wan22"].vae
    cfg = vae.vae.config
    torch.testing.assert_close(vae.shift, torch.tensor(cfg.latents_mean))
    torch.testing.assert_close(vae.scale, torch.tensor(cfg.latents_std))
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        raw, z = vae.encode_raw(video), vae.encode(video)
        back = vae.decode(z)
    assert z.shape == (1, 48, 2, 2, 2) and back.shape == video.shape
    torch.testing.assert_close(z, (raw - vae.shift[:, None, None, None]) / vae.scale[:, None, None, None])


@pytest.mark.parametrize("family", rf.FAMILIES)
def test_denoiser_interface_and_per_token_timesteps(models, family):
    """model(x_t, t, context=, context_mask=) -> v like VideoDiT's; a (B, tokens) t passes through: equal to (B,)
    when constant, different when not; a wrong t shape is named."""
    from minisora import diffusion

    model = models[family]
    C, T, H, W = model.latent_shape(*rf.CLIPS[family])
    tokens = model.denoiser.tokens(T, H, W)
    x = torch.randn(2, C, T, H, W, generator=torch.Generator().manual_seed(0))
    context, mask = model.text(["a red circle", "a cat"])
    with torch.no_grad():
        v = model.denoiser(x, torch.tensor([0.7, 0.7]), context=context, context_mask=mask)
        v_tok = model.denoiser(x, torch.full((2, tokens), 0.7), context=context, context_mask=mask)
        ramp = torch.linspace(0.2, 0.9, tokens).expand(2, tokens)
        v_ramp = model.denoiser(x, ramp, context=context, context_mask=mask)
        null, null_mask = model.text.null_embedding()
        guided = diffusion.cfg_model(model.denoiser, 4.0, dict(context=context, context_mask=mask),
                                     dict(context=null, context_mask=null_mask))  # fmt: skip
        v_guided = guided(x, torch.tensor([0.7, 0.7]))
    assert v.shape == x.shape and v.dtype == torch.float32
    torch.testing.assert_close(v_tok, v, rtol=1e-5, atol=1e-5)
    assert (v_ramp - v).abs().max() > 1e-2
    assert (v_guided - v).abs().max() > 1e-2
    with pytest.raises(ValueError, match=rf"t must be \(B,\) = \(2,\), per latent frame \(B, T\) = \(2, {T}\) or "
                       rf"per token \(B, tokens\) = \(2, {tokens}\)"):  # fmt: skip
        model.denoiser(x, torch.zeros(2, tokens + 1), context=context)


def test_flow_loss_trains_the_released_denoiser(models):
    """minisora's flow_loss runs on the adapter (gradients reach the diffusers transformer) and falls."""
    from minisora import diffusion

    model = models["wan21"]
    denoiser = model.denoiser
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    C, T, H, W = model.latent_shape(*rf.CLIPS["wan21"])
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, C, T, H, W, generator=g), torch.randn(2, C, T, H, W, generator=g)
    context, mask = model.text(["a red circle", "a cat"])
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = diffusion.flow_loss(denoiser, x0, torch.tensor([0.3, 0.8]), noise, context=context,
                                   context_mask=mask).mean()  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    denoiser.load_state_dict(before)  # the module-scoped model stays as built
    assert losses[-1] < 0.8 * losses[0], losses


def test_missing_folder_index_and_component(folders, tmp_path):
    with pytest.raises(FolderError, match=f"{tmp_path / 'nope'}: no such folder .*model_index.json"):
        describe(tmp_path / "nope")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FolderError, match=r"model_index.json: missing \(every diffusers pipeline folder has one\)"):
        describe(bare)
    folder = copy(folders["wan21"], tmp_path)
    shutil.rmtree(folder / "vae")
    with pytest.raises(FolderError, match=r"folder vae/ is missing \(model_index.json lists vae: AutoencoderKLWan\)"):
        describe(folder)
    folder = copy(folders["ltx"], tmp_path / "b")
    index = json.loads((folder / "model_index.json").read_text())
    del index["scheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FolderError, match="no component 'scheduler'"):
        describe(folder)
    folder = copy(folders["ltx"], tmp_path / "c")
    (folder / "transformer" / "config.json").unlink()
    with pytest.raises(FolderError, match=r"transformer/config.json: missing \(the transformer's configuration\)"):
        describe(folder)


def test_unsupported_classes_are_named(folders, tmp_path):
    folder = copy(folders["wan21"], tmp_path)
    edit(folder / "model_index.json", transformer=["diffusers", "CogVideoXTransformer3DModel"])
    with pytest.raises(FolderError, match="transformer class 'CogVideoXTransformer3DModel' is not supported by this "
                                          "version; expected WanTransformer3DModel"):  # fmt: skip
        describe(folder)
    edit(folder / "model_index.json", _class_name="WanImageToVideoPipeline")
    with pytest.raises(FolderError, match="'WanImageToVideoPipeline' is not supported; expected WanPipeline"):
        describe(folder)
    edit(folder / "model_index.json", _class_name="WanPipeline", transformer_2=["diffusers", "WanTransformer3DModel"],
         boundary_ratio=0.875)  # fmt: skip
    with pytest.raises(FolderError, match="two-expert Wan2.2 model"):
        describe(folder)
    folder = copy(folders["ltx"], tmp_path / "b")
    edit(folder / "model_index.json", scheduler=["diffusers", "DDIMScheduler"])
    with pytest.raises(FolderError, match="scheduler class 'DDIMScheduler' is not supported"):
        describe(folder)


def test_mismatched_shapes_are_named(folders, tmp_path):
    folder = copy(folders["wan21"], tmp_path)
    edit(folder / "vae" / "config.json", z_dim=8)
    with pytest.raises(FolderError, match=r"transformer/config.json: in_channels 16 / out_channels 16 do not match the "
                                          r"VAE's 8 latent channels \(.*vae/config.json\)"):  # fmt: skip
        describe(folder)
    folder = copy(folders["ltx"], tmp_path / "b")
    edit(folder / "text_encoder" / "config.json", d_model=64)
    with pytest.raises(FolderError, match="caption_channels 32 does not match the text encoder's width d_model 64"):
        describe(folder)
    folder = copy(folders["wan22"], tmp_path / "c")
    edit(folder / "scheduler" / "scheduler_config.json", use_flow_sigmas=False, prediction_type="epsilon")
    with pytest.raises(FolderError, match="a UniPC scheduler must be in flow form"):
        describe(folder)
    folder = copy(folders["ltx"], tmp_path / "d")
    edit(folder / "transformer" / "config.json", patch_size=2)
    with pytest.raises(FolderError, match="patches other than 1 are not supported"):
        describe(folder)


def test_sampler_options_without_an_euler_grid_are_refused(folders, tmp_path):
    from minisora.models.released import load_released, sample_released

    folder = copy(folders["wan21"], tmp_path)
    edit(folder / "scheduler" / "scheduler_config.json", use_karras_sigmas=True)
    model = load_released(folder, vae=False)
    with pytest.raises(ValueError, match="scheduler_config.json: use_karras_sigmas has no Euler grid here"):
        model.euler_sigmas(4, tokens=12)
    with pytest.raises(ValueError, match="sampler must be one of default, euler, got 'heun'"):
        sample_released(model, ["a cat"], num_frames=9, height=32, width=32, steps=2, sampler="heun")
