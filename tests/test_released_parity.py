"""Sampling parity with diffusers: minisora's samplers over a released model give the pipeline's own latents.

Tiny random-weight Wan2.1 T2V, Wan2.2 TI2V and LTX-Video folders (tests/released_folders.py) are sampled
by diffusers' pipeline (output_type="latent") and by minisora (load_released + sample_released) with the
same prompt, negative prompt, seed, steps and guidance: (a) Euler over minisora's sigma grid against the
pipeline with FlowMatchEulerDiscreteScheduler, (b) the folder's own scheduler (UniPC for Wan) through
diffusion.sample_scheduler. LTX's pipeline returns packed (B, tokens, C) normalised latents: they are
unpacked with the pipeline's _unpack_latents and compared as (B, C, t, h, w), normalised, like ours.
Run with -s to see the relative errors.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
pytest.importorskip("transformers", reason="needs transformers: pip install -e .[diffusers]")

import released_folders as rf  # noqa: E402

from minisora import diffusion as D  # noqa: E402

TOLERANCE = 1e-4  # max |diff| / max |ref|
STEPS, GUIDANCE, SEED = 3, 3.0, 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {family: rf.build_folder(root, family) for family in rf.FAMILIES}


def pipeline_latents(folder, family: str, sampler: str, prompt: str = rf.PROMPT, lora=None, **kw) -> torch.Tensor:
    """The diffusers pipeline's latents (B, C, t, h, w), normalised; for "euler", with FlowMatchEuler at the folder's
    shift; with the LoRA file `lora` loaded by the pipeline's load_lora_weights."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    if sampler == "euler" and family != "ltx":  # Wan folders ship UniPC: its flow_shift is the model's shift
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    F, H, W = rf.CLIPS[family]
    out = pipe(prompt=prompt, negative_prompt=rf.NEGATIVE, num_frames=F, height=H, width=W, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
               **kw).frames  # fmt: skip
    if family == "ltx":  # packed (B, t*h*w, C) -> (B, C, t, h, w)
        t, h, w = (F - 1) // 8 + 1, H // 32, W // 32
        out = pipe._unpack_latents(out, t, h, w)
    return out


def minisora_latents(model, family: str, sampler: str, prompt: str = rf.PROMPT) -> torch.Tensor:
    from minisora.models.released import sample_released

    F, H, W = rf.CLIPS[family]
    return sample_released(model, [prompt], rf.NEGATIVE, num_frames=F, height=H, width=W, steps=STEPS,
                           guidance=GUIDANCE, seed=SEED, sampler=sampler)  # fmt: skip


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family", rf.FAMILIES)
def test_sampling_parity(folders, family):
    """(a) Euler on minisora's grid and (b) the folder's own scheduler equal diffusers' pipeline; a changed
    prompt moves the latents far more than the tolerance (the check can fail)."""
    from minisora.models.released import load_released

    model = load_released(folders[family])
    errors = {}
    for sampler in ("euler", "default"):
        ref = pipeline_latents(folders[family], family, sampler)
        ours = minisora_latents(model, family, sampler)
        errors[sampler] = relative_error(ours, ref)
        print(f"parity {family} {sampler}: max|diff|/max|ref| = {errors[sampler]:.2e}")
        assert torch.isfinite(ours).all() and ref.abs().max() > 1
    assert max(errors.values()) <= TOLERANCE, errors
    other = minisora_latents(model, family, "default", prompt="a blue square moving up")
    assert relative_error(other, ref) > 20 * TOLERANCE


def test_ltx_rope_scale_follows_the_frame_rate(folders):
    """LTX-Video's RoPE time scale is 8 / frame_rate: the adapter matches the pipeline at 24 fps, and 24 != 25."""
    from minisora.models.released import load_released

    ref = pipeline_latents(folders["ltx"], "ltx", "default", frame_rate=24)
    at_24 = minisora_latents(load_released(folders["ltx"], frame_rate=24, vae=False), "ltx", "default")
    at_25 = minisora_latents(load_released(folders["ltx"], vae=False), "ltx", "default")
    assert relative_error(at_24, ref) <= TOLERANCE
    assert relative_error(at_25, ref) > 10 * TOLERANCE


@pytest.mark.parametrize("shift, steps", [(1.0, 4), (3.0, 4), (5.0, 7), (12.0, 30)])
def test_flow_match_sigmas_equal_the_scheduler(shift, steps):
    """The grid of FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps): sigma_min shifted twice, 0 last."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = D.flow_match_sigmas(steps, shift)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
    assert ours[-1] == 0 and ours[0] == 1
    if shift > 1:  # the naive grid (sigma_min shifted once) is not it
        once = D.shift_t(torch.linspace(1.0, 1e-3, steps, dtype=torch.float64), shift).float()
        assert (once - scheduler.sigmas[:-1]).abs().max() > 1e-5


@pytest.mark.parametrize("tokens, time_shift_type", [(12, "exponential"), (2048, "exponential"), (6000, "linear")])
def test_ltx_grid_equals_the_scheduler(tokens, time_shift_type):
    """LTX-Video 0.9.1: mu = calculate_shift(tokens) (extrapolated below 1024 and above 4096 tokens), a dynamic
    shift by mu (exponential or linear), shift_terminal 0.1."""
    import diffusers
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    from minisora.models.released import dynamic_shift, ltx_mu

    cfg = dict(rf.ltx_parts()["scheduler"].config, time_shift_type=time_shift_type)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    mu = calculate_shift(tokens, *(cfg[k] for k in keys))
    assert ltx_mu(scheduler.config, tokens) == pytest.approx(mu, abs=1e-12)
    steps = 5
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    scheduler.set_timesteps(sigmas=base.tolist(), mu=mu)
    shift = dynamic_shift(scheduler.config, mu)
    ours = D.flow_match_sigmas(steps, shift, base=base, shift_terminal=cfg["shift_terminal"])
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)
    assert ours[-2].item() == pytest.approx(0.1, abs=1e-6)


def test_flow_unipc_on_minisora_models():
    """flow_unipc + sample_scheduler on the exact velocity of Gaussian data: second order beats Euler at 6 steps,
    and it drives minisora's own VideoDiT (t in [0, 1]) like any velocity model."""
    from test_diffusion import MU, S, gaussian_velocity

    from minisora.models.dit import VideoDiT

    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    exact = MU + S * z
    unipc = (D.sample_scheduler(gaussian_velocity, z.clone(), D.flow_unipc(shift=1.0), 6) - exact).abs().max().item()
    euler = (D.sample_euler(gaussian_velocity, z.clone(), D.flow_match_sigmas(6)) - exact).abs().max().item()
    assert unipc < 0.5 * euler, (unipc, euler)  # measured 0.15 vs 0.60

    torch.manual_seed(0)
    dit = VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, condition="none").eval()
    seen = []
    x = D.sample_scheduler(dit, torch.randn(1, 4, 2, 4, 4), D.flow_unipc(shift=3.0), 4,
                           callback=lambda info: seen.append(float(info["t"])))  # fmt: skip
    assert x.shape == (1, 4, 2, 4, 4) and torch.isfinite(x).all()
    assert len(seen) == 4 and 0.99 <= seen[0] <= 1 and all(a > b for a, b in zip(seen, seen[1:]))


def test_ti2v_image_to_video_parity(folders):
    """Wan2.2-TI2V image-to-video through minisora's per-token path (conditioning.clean_known: frame 0 the image's
    latent at t = 0, pinned at the end) equals WanImageToVideoPipeline(expand_timesteps=True), with Euler and with
    the folder's UniPC; text-to-video from the same noise is far from it (the image is what moves it)."""
    import diffusers
    import numpy as np
    from PIL import Image

    from minisora.models.released import load_released, sample_released

    F, H, W = rf.CLIPS["wan22"]
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)  # (H, W, 3)
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(folders["wan22"], expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    model = load_released(folders["wan22"])
    args = dict(num_frames=F, height=H, width=W, steps=STEPS, guidance=GUIDANCE, seed=SEED)
    for sampler in ("euler", "default"):
        scheduler = model.scheduler  # UniPC; Euler at its flow_shift
        if sampler == "euler":
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=scheduler.config.flow_shift)
        pipe.scheduler = scheduler.__class__.from_config(scheduler.config)
        ref = pipe(image=Image.fromarray(image), prompt=rf.PROMPT, negative_prompt=rf.NEGATIVE, num_frames=F,
                   height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").frames  # fmt: skip
        ours = sample_released(model, [rf.PROMPT], rf.NEGATIVE, sampler=sampler, image=image, **args)
        error = relative_error(ours, ref)
        print(f"parity wan22 image-to-video {sampler}: max|diff|/max|ref| = {error:.2e}")  # measured 9e-7, 5e-7
        assert error <= TOLERANCE and ref.abs().max() > 1
        t2v = sample_released(model, [rf.PROMPT], rf.NEGATIVE, sampler=sampler, **args)
        assert relative_error(t2v, ref) > 100 * TOLERANCE
    with pytest.raises(ValueError, match="Wan2.2-TI2V"):
        sample_released(load_released(folders["wan21"], vae=False), [rf.PROMPT], image=image,
                        **{**args, "num_frames": rf.CLIPS["wan21"][0]})  # fmt: skip


@pytest.mark.parametrize("family", ["wan22", "ltx"])
def test_per_frame_t_is_the_per_token_t_of_each_frame(family):
    """A per-latent-frame t (B, T) (what training with conditioning frames gives) equals its per-token expansion, and
    equal frames equal the (B,) t; a clean frame 0 changes the output."""
    from minisora.models.released import LTXDenoiser, WanDenoiser

    if family == "ltx":
        denoiser, C, per_frame_tokens = LTXDenoiser(rf.ltx_parts()["transformer"], 8, 32), 8, 4
    else:
        denoiser, C, per_frame_tokens = WanDenoiser(rf.wan_parts(True)["transformer"], expand_timesteps=True), 48, 1
    x, context = torch.randn(2, C, 3, 2, 2), torch.randn(2, 5, rf.TEXT_DIM)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        same = denoiser(x, t, context)
        torch.testing.assert_close(denoiser(x, t[:, None].expand(2, 3).clone(), context), same, atol=1e-5, rtol=0)
        tf = torch.tensor([[0.0, 0.3, 0.3], [0.0, 0.8, 0.8]])
        per_frame = denoiser(x, tf, context)
        torch.testing.assert_close(per_frame, denoiser(x, tf.repeat_interleave(per_frame_tokens, 1), context))
    assert (per_frame - same).abs().max() > 0.01
