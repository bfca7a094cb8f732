"""CLIP score with a tiny open_clip model loaded from a local file: definition, preprocessing, determinism,
and that a CLIP trained (here, for a few seconds) to pair colours with their names scores matching pairs higher."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from minisora.eval.clip_score import CLIPScore

NAME = "minisora-test-clip-score"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1},
}
COLOURS = {"a red video": (220, 30, 30), "a blue video": (30, 30, 220)}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, NAME, TINY_CLIP)


def coloured_video(rgb: tuple[int, int, int], seed: int, T: int = 4, H: int = 40, W: int = 56) -> np.ndarray:
    """uint8 (T, H, W, 3): one colour plus noise, not square (resize and centre crop are exercised)."""
    noise = np.random.default_rng(seed).integers(-25, 26, (T, H, W, 3))
    return np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)


def trained_colour_clip(path: Path) -> Path:
    """Train the tiny CLIP contrastively on red/blue frames vs their captions (~2 s), save it as safetensors."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    tokens = open_clip.tokenize(list(COLOURS))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(40):
        frames = [coloured_video(rgb, seed=step, T=1, H=32, W=32)[0] for rgb in COLOURS.values()]
        images = (torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255 - mean) / std
        image, text = F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(tokens), dim=-1)
        logits = 10 * image @ text.T  # (2, 2)
        labels = torch.arange(2)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def colour_clip(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(open_clip.factory._MODEL_CONFIGS, NAME, TINY_CLIP)
        return trained_colour_clip(tmp_path_factory.mktemp("clip") / "colour_clip.safetensors")


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("clip") / "random_clip.pt"
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), path)
    return path


def test_scores_have_one_value_per_video_in_range_and_are_deterministic(random_clip):
    scorer = CLIPScore(NAME, str(random_clip))
    videos = [coloured_video(rgb, seed=i) for i, rgb in enumerate(COLOURS.values())] * 2
    prompts = list(COLOURS) * 2
    scores = scorer(videos, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float64
    assert ((scores >= 0) & (scores <= 100)).all()
    torch.testing.assert_close(scores[:2], scores[2:], rtol=0, atol=1e-9)  # same inputs, same scores
    again = CLIPScore(NAME, str(random_clip))(videos, prompts)
    torch.testing.assert_close(again, scores, rtol=0, atol=1e-9)
    # batching does not change a score; videos of another size are scored on their own
    small = CLIPScore(NAME, str(random_clip), batch_size=3)(videos, prompts)
    torch.testing.assert_close(small, scores, rtol=1e-5, atol=1e-4)
    mixed = scorer([videos[0], coloured_video((220, 30, 30), seed=0, H=64, W=64)], prompts[:1] * 2)
    assert mixed.shape == (2,) and abs(float(mixed[0] - scores[0])) < 1e-4  # batched differently: rounding


def test_score_is_the_mean_over_frames_of_the_clamped_cosine(random_clip):
    scorer = CLIPScore(NAME, str(random_clip))
    video = coloured_video((220, 30, 30), seed=3, T=5)
    frames = torch.from_numpy(video).permute(0, 3, 1, 2)  # (5, 3, H, W)
    with torch.no_grad():
        image = F.normalize(scorer.model.encode_image(scorer.preprocess(frames)), dim=-1)  # (5, 32)
        text = F.normalize(scorer.model.encode_text(open_clip.tokenize(["a red video"])), dim=-1)  # (1, 32)
    cos = (image @ text.T).squeeze(1).double()  # (5,)
    expected = (100 * cos.clamp(min=0)).mean()
    assert float(scorer([video], ["a red video"])[0]) == pytest.approx(float(expected), abs=1e-4)
    negated = scorer.text_embeddings(["a red video"])
    assert torch.allclose(negated, text, atol=1e-6)


def test_frames_are_prepared_like_open_clips_own_eval_transform(random_clip):
    scorer = CLIPScore(NAME, str(random_clip))
    y, x = np.mgrid[0:40, 0:56]
    smooth = np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)  # (40, 56, 3)
    ours = scorer.preprocess(torch.from_numpy(smooth).permute(2, 0, 1)[None])[0]  # (3, 32, 32)
    cfg = open_clip.get_model_preprocess_cfg(scorer.model)
    reference = open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"], resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
    )
    theirs = reference(Image.fromarray(smooth))  # PIL resize + centre crop + normalise
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().max() < 0.015  # at most one grey level (1/255 / std ~0.27); 0 when measured


def test_a_clip_trained_on_colours_scores_matching_prompts_higher(colour_clip):
    scorer = CLIPScore(NAME, str(colour_clip))
    red, blue = (coloured_video(rgb, seed=100 + i) for i, rgb in enumerate(COLOURS.values()))  # unseen noise
    matching = scorer([red, blue], ["a red video", "a blue video"])
    swapped = scorer([red, blue], ["a blue video", "a red video"])
    assert (matching > swapped + 10).all(), (matching, swapped)


def test_bad_inputs_are_named(random_clip, tmp_path):
    scorer = CLIPScore(NAME, str(random_clip))
    with pytest.raises(ValueError, match="2 videos and 1 prompts"):
        scorer([coloured_video((0, 0, 0), 0)] * 2, ["one"])
    with pytest.raises(ValueError, match=r"video 0: expected uint8 \(T, H, W, 3\)"):
        scorer([np.zeros((4, 8, 8, 3), np.float32)], ["x"])
    with pytest.raises(FileNotFoundError, match=f"CLIP score: pretrained file {tmp_path}/none.pt for open_clip model"):
        CLIPScore(NAME, str(tmp_path / "none.pt"))


def test_a_local_file_takes_the_preprocessing_of_the_tag_it_was_downloaded_for(tmp_path, random_clip):
    # ViT-L-14's laion2b_s32b_b82k normalises with mean = std = 0.5; a file carries no such values.
    file = tmp_path / "open_clip_pytorch_model.bin"
    file.write_bytes(b"")
    assert CLIPScore._tag_preprocess("ViT-L-14", str(file), "laion2b_s32b_b82k")["mean"] == (0.5, 0.5, 0.5)
    with pytest.warns(UserWarning, match="OpenAI mean/std; if it holds the weights of laion2b_s32b_b82k"):
        assert CLIPScore._tag_preprocess("ViT-L-14", str(file), None) == {}
    with pytest.raises(ValueError, match="preprocess_tag 'laion9b' is not an open_clip tag of 'ViT-L-14'"):
        CLIPScore._tag_preprocess("ViT-L-14", str(file), "laion9b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model without tags: nothing to warn about
        plain = CLIPScore(NAME, str(random_clip))
    assert torch.allclose(plain.mean.flatten(), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
