"""The Python API: TextToVideoPipeline.from_pretrained, __call__, seeds, export round trip, image-to-video."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_run import build_tiny_run

from minisora import TextToVideoPipeline
from minisora.checkpoint import export_checkpoint
from minisora.io import read_clip, save_video

RED = "a red circle moving left"
BLUE = "a blue square moving up"
FAST = dict(steps=3)


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def run(root) -> Path:
    return root / "runs" / "shapes"


@pytest.fixture(scope="session")
def pipe(run) -> TextToVideoPipeline:
    return TextToVideoPipeline.from_pretrained(run)


@pytest.fixture(scope="session")
def shapes_clip(root) -> np.ndarray:
    """A real 17-frame 32x32 clip of the shapes dataset the run was trained on."""
    return read_clip(next((root / "data" / "shapes").rglob("*.mp4")))


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_one_prompt_gives_uint8_frames_and_a_list_gives_a_list(pipe):
    video = pipe(RED, **FAST)
    assert isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.shape == (17, 32, 32, 3)
    videos = pipe([RED, BLUE], num_frames=9, height=16, width=24, **FAST)
    assert isinstance(videos, list) and [v.shape for v in videos] == [(9, 16, 24, 3)] * 2


def test_same_seed_same_video_and_seeds_are_per_prompt(pipe):
    a = pipe([RED, BLUE], seed=3, **FAST)
    b = pipe([RED, BLUE], seed=3, **FAST)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert diff(pipe(RED, seed=4, **FAST), a[0]) > 10  # another seed, another video
    assert diff(pipe(BLUE, seed=3, **FAST), a[0]) > 10  # another prompt, another video
    # Item i uses seed + i whatever the batching; batched matmuls and convolutions may round differently.
    one_by_one = pipe([RED, BLUE], seed=3, batch_size=1, **FAST)
    assert diff(one_by_one[1], pipe(BLUE, seed=4, **FAST)) <= 1
    assert all(diff(x, y) <= 1 for x, y in zip(a, one_by_one))
    assert diff(pipe([RED, BLUE], seed=[7, 3], **FAST)[1], pipe(BLUE, seed=3, **FAST)) <= 1


def test_a_generator_per_prompt_equals_the_seeds(pipe):
    gens = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    by_generator = pipe([RED, BLUE], generator=gens, **FAST)
    by_seed = pipe([RED, BLUE], seed=[11, 12], **FAST)
    assert all(np.array_equal(x, y) for x, y in zip(by_generator, by_seed))


def test_callback_runs_once_per_step_and_samplers_differ(pipe):
    seen = []
    euler = pipe(RED, steps=4, callback=lambda info: seen.append((info["i"], float(info["t"]), info["batch"])))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][1] == 1.0 and all(s[2] == 0 for s in seen)
    seen.clear()
    pipe([RED, BLUE], steps=2, batch_size=1, callback=lambda info: seen.append((info["i"], info["batch"])))
    assert seen == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert diff(pipe(RED, steps=4, sampler="heun"), euler) > 0
    assert diff(pipe(RED, steps=4, sampler="unipc"), euler) > 0


def test_guidance_batching_does_not_change_the_result(pipe):
    kw = dict(prompts=[RED, BLUE], steps=3, guidance=4.0, seed=0)
    batched = pipe.sample_latents(**kw, batched_cfg=True)
    separate = pipe.sample_latents(**kw, batched_cfg=False)
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=1e-4)
    unguided = pipe.sample_latents(**{**kw, "guidance": 1.0})
    assert (unguided - batched).abs().max() > 1e-3


def test_bf16_and_offload(run, pipe):
    ref = pipe.sample_latents([RED], steps=3, seed=0)
    bf16 = TextToVideoPipeline.from_pretrained(run, dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.vae.encoder.conv_in.conv.weight.dtype == torch.float32
    lat = bf16.sample_latents([RED], steps=3, seed=0)
    assert lat.dtype == torch.float32 and torch.corrcoef(torch.stack([lat.flatten(), ref.flatten()]))[0, 1] > 0.99
    offload = TextToVideoPipeline.from_pretrained(run, offload=True)
    assert np.array_equal(offload(RED, **FAST), pipe(RED, **FAST))


def test_bad_inputs_are_clear_errors(pipe):
    cases = [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(guidance=0.5), "guidance .* must be >= 1"),
        (dict(seed=-1), "seeds must be >= 0"),
        (dict(sampler="ddim"), "sampler must be one of"),
        (dict(num_frames=0), "num_frames must be a positive integer"),
        (dict(seed=[1, 2]), "got 2 seeds for 1 prompts"),
        (dict(batch_size=0), "batch_size must be >= 1"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(RED, **{**FAST, **kw})
    with pytest.raises(ValueError, match="no prompts"):
        pipe([], **FAST)


def test_sizes_that_do_not_fit_are_rounded_with_a_warning_naming_valid_values(pipe):
    with pytest.warns(UserWarning, match=r"16x30x36 rounded to 17x32x40: frames must be 1 \+ 4k \(1, 5, 9, 13"):
        video = pipe(RED, num_frames=16, height=30, width=36, **FAST)
    assert video.shape == (17, 32, 40, 3)


def test_export_round_trip_gives_identical_samples(run, pipe, tmp_path):
    folder = export_checkpoint(run, tmp_path / "export")
    loaded = TextToVideoPipeline.from_pretrained(folder)
    for kw in (dict(seed=5), dict(seed=5, sampler="heun", guidance=2.0)):
        assert all(
            np.array_equal(x, y) for x, y in zip(loaded([RED, BLUE], **FAST, **kw), pipe([RED, BLUE], **FAST, **kw))
        )
    # The pipeline saves the same folder itself.
    again = TextToVideoPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "saved"))
    assert np.array_equal(again(RED, seed=5, **FAST), pipe(RED, seed=5, **FAST))


def test_loading_an_export_needs_neither_lightning_nor_pickle(run, tmp_path):
    folder = export_checkpoint(run, tmp_path / "export")
    code = (
        "import sys, pickle, torch\n"
        "torch.load = pickle.load = pickle.loads = None  # any use of pickle fails\n"
        "from minisora import TextToVideoPipeline\n"
        f"v = TextToVideoPipeline.from_pretrained({str(folder)!r})('a red circle moving left', steps=2)\n"
        "assert v.shape == (17, 32, 32, 3)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_image_to_video_keeps_the_first_frame(pipe, shapes_clip, tmp_path):
    """The kept frame comes back as the autoencoder's reconstruction of the image (exact up to rounding)."""
    image = shapes_clip[0]  # (32, 32, 3)
    reconstruction = pipe.decode(pipe.encode_frames(image[None]))[0][0]
    for sampler in ("euler", "heun", "unipc"):
        videos = pipe([RED, BLUE], image=image, seed=1, sampler=sampler, **FAST)
        for v in videos:
            assert diff(v[0], reconstruction) <= 1
    free = pipe(RED, seed=1, **FAST)
    assert diff(free[0], reconstruction) > 10  # without the image the first frame is something else
    # A file path works as well, and a larger image is scaled and centre-cropped to the video size.
    path = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(np.kron(image, np.ones((2, 3, 1), np.uint8))).save(path)  # 64x96: wider than tall
    v = pipe(RED, image=path, seed=1, **FAST)
    assert v.shape == (17, 32, 32, 3) and diff(v[0], reconstruction) > 0


def test_continuation_keeps_1_plus_4k_frames(pipe, shapes_clip, tmp_path):
    clip_path = save_video(shapes_clip, tmp_path / "clip.mp4")
    reconstruction = pipe.decode(pipe.encode_frames(shapes_clip[:5]))[0]  # (5, 32, 32, 3)
    video = pipe(RED, video=shapes_clip, keep_frames=5, seed=2, **FAST)
    assert video.shape == (17, 32, 32, 3) and diff(video[:5], reconstruction) <= 1
    with pytest.warns(UserWarning, match="keep_frames=7 rounded down to 5"):
        rounded = pipe(RED, video=shapes_clip, keep_frames=7, seed=2, **FAST)
    assert np.array_equal(rounded, video)
    from_file = pipe(RED, video=clip_path, keep_frames=5, seed=2, **FAST)
    assert from_file.shape == (17, 32, 32, 3)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        pipe(RED, video=shapes_clip, keep_frames=17, **FAST)
    with pytest.raises(ValueError, match="has 5 frames, 9 are to be kept"):
        pipe(RED, video=shapes_clip[:5], keep_frames=9, **FAST)
    with pytest.raises(ValueError, match="not both"):
        pipe(RED, image=shapes_clip[0], video=shapes_clip, **FAST)


def test_continuing_a_real_video_fits_it_to_the_sample_size(pipe, shared_videos):
    """A 640x360 H.264 clip is scaled to cover 32x32 and centre-cropped; its first 5 frames come back."""
    from minisora.conditioning import load_frames

    path = shared_videos / "lagos.mp4"
    kept = load_frames(path, 5, 32, 32)
    assert kept.shape == (5, 32, 32, 3)
    video = pipe(RED, video=path, keep_frames=5, seed=0, **FAST)
    assert diff(video[:5], pipe.decode(pipe.encode_frames(kept))[0]) <= 1


def test_extend_to_conditions_each_window_on_the_last_frames_so_far(pipe, shapes_clip, monkeypatch):
    """extend_to=41 from 17 frames: two windows of 12 new frames, cut to 41; window w is conditioned on the last
    5 frames (2 latent frames) of the video so far, encoded as a clip of their own; each prompt may continue its
    own clip, and a prompt's video does not depend on the batch (up to rounding)."""
    seen = []
    encode = pipe.encode_frames
    monkeypatch.setattr(pipe, "encode_frames", lambda frames: seen.append(frames.copy()) or encode(frames))
    other = shapes_clip[::-1].copy()
    a, b = pipe([RED, BLUE], video=[shapes_clip, other], extend_to=41, seed=3, **FAST)
    assert a.shape == b.shape == (41, 32, 32, 3)
    assert np.array_equal(a[:17], shapes_clip) and np.array_equal(b[:17], other)
    assert len(seen) == 4  # 2 windows x 2 prompts
    for (first, second), v in zip(((seen[0], seen[2]), (seen[1], seen[3])), (a, b)):
        assert np.array_equal(first, v[12:17]) and np.array_equal(second, v[24:29])
    alone = pipe(BLUE, video=other, extend_to=41, seed=4, **FAST)
    assert diff(alone[:29], b[:29]) <= 1
    for mode in ("trained", "replace"):
        assert pipe(RED, video=shapes_clip, extend_to=21, condition=mode, **FAST).shape == (21, 32, 32, 3)
    with pytest.raises(ValueError, match="give video="):
        pipe(RED, image=shapes_clip[0], extend_to=41, **FAST)
    with pytest.raises(ValueError, match="needed as context"):
        pipe(RED, video=shapes_clip[:3], extend_to=41, **FAST)
    with pytest.raises(ValueError, match="condition must be one of"):
        pipe(RED, image=shapes_clip[0], condition="hold", **FAST)


def test_sampling_grid_shift_is_the_run_default_and_a_keyword(pipe, monkeypatch):
    """shift moves the grid's steps towards noise (diffusion.timesteps); default sample.shift, else dit_train.t_shift."""
    from minisora import diffusion

    grids = []
    real = diffusion.timesteps
    monkeypatch.setattr(diffusion, "timesteps", lambda steps, shift=1.0, device=None: grids.append(shift) or real(steps, shift, device))  # fmt: skip
    base = pipe.sample_latents([RED], steps=3, seed=0)
    shifted = pipe.sample_latents([RED], steps=3, seed=0, shift=7.0)  # not the run's (its t_shift)
    assert grids == [pipe.t_shift if pipe.shift is None else pipe.shift, 7.0] and (shifted - base).abs().max() > 1e-3
    monkeypatch.setattr(pipe, "shift", 7.0)  # what a run's sample.shift sets (from_pretrained)
    torch.testing.assert_close(pipe.sample_latents([RED], steps=3, seed=0), shifted, atol=0, rtol=0)
    with pytest.raises(ValueError, match="shift .* must be a number > 0, got 0"):
        pipe.sample_latents([RED], steps=3, shift=0)
