"""TextEncoder with the tiny random open_clip tower: frozen, deterministic, per-token, masked."""

import warnings

import pytest
import torch

from minisora.models.text import TextEncoder

PROMPTS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(context_length=16, width=64, layers=2, heads=2, seed=0)


def test_frozen_and_always_eval(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    emb, _ = encoder(PROMPTS)
    assert not emb.requires_grad


def test_shapes_dim_and_mask_lengths(encoder):
    emb, mask = encoder(PROMPTS + [""])
    assert emb.shape == (3, 16, 64) and emb.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    assert encoder.dim == 64 and encoder.context_length == 16
    for prompt, m in zip(PROMPTS + [""], mask):
        n = len(encoder.tokenizer.encode(prompt)) + 2  # start and end tokens
        assert m.sum() == n and m[:n].all()  # a prefix of True
    assert mask[2].sum() == 2  # the empty prompt: start and end tokens


def test_deterministic_across_instances_and_global_rng_untouched(encoder):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    other = TextEncoder(context_length=16, width=64, layers=2, heads=2, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # building does not consume the caller's RNG
    a, b = encoder(PROMPTS)[0], other(PROMPTS)[0]
    assert torch.equal(a, b)
    reseeded = TextEncoder(context_length=16, width=64, layers=2, heads=2, seed=1)
    assert not torch.allclose(reseeded(PROMPTS)[0], a)


def test_different_prompts_differ_per_token(encoder):
    emb, mask = encoder(PROMPTS)
    assert not torch.allclose(emb[0], emb[1])
    # the shared first tokens ("<start> a") give equal embeddings: the tower is causal, per-token output
    assert torch.allclose(emb[0, :2], emb[1, :2], atol=1e-6)
    assert not torch.allclose(emb[0, 2], emb[1, 2])


def test_batch_independence(encoder):
    alone = encoder([PROMPTS[0]])[0][0]
    batched = encoder([PROMPTS[0], "some other much longer prompt about shapes"])[0][0]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_truncation_warns_once(encoder):
    long = "a red circle moving left and then right and then up and then down " * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb, mask = encoder([long, long, "short"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "16-token" in message and "a red circle" in message and "2 prompt(s)" in message
    assert mask[0].all() and mask[2].sum() < 16


def test_empty_and_non_ascii(encoder):
    emb, mask = encoder(["", "un cercle rouge qui bouge à gauche", "赤い円"])
    assert torch.isfinite(emb).all()
    assert mask[1].sum() > 2 and mask[2].sum() > 2
    assert not torch.allclose(emb[1], emb[2])


def test_null_embedding_cached(encoder):
    emb, mask = encoder.null_embedding()
    assert emb.shape == (1, 16, 64) and mask.sum() == 2
    again = encoder.null_embedding()
    assert again[0] is emb and again[1] is mask
    assert torch.equal(emb, encoder([""])[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="not an open_clip model"):
        TextEncoder(model_name="tiny", pretrained="some_tag")
    with pytest.raises(TypeError, match="list of prompts"):
        TextEncoder(context_length=8, width=32, layers=1, heads=2)("a single string")


def test_open_clip_model_from_local_dir(tmp_path):
    # The real-model path (open_clip.create_model + checkpoint loading) without a download: a tiny CLIP config
    # and a CLIP-format checkpoint in a local folder, loaded through open_clip's "local-dir:" schema.
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = {"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    state = open_clip.create_model(f"local-dir:{tmp_path}").state_dict()
    state["ln_final.bias"] = torch.full_like(state["ln_final.bias"], 0.5)  # a marker that must be loaded
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))

    short = TextEncoder(f"local-dir:{tmp_path}", context_length=16)
    assert not hasattr(short, "visual") and short.dim == 32
    assert torch.equal(short.text.ln_final.bias, torch.full((32,), 0.5))
    emb, mask = short(PROMPTS)
    assert emb.shape == (2, 16, 32)
    # a shorter context than the tower's 77 positions gives the same per-token embeddings (causal tower)
    full, _ = TextEncoder(f"local-dir:{tmp_path}", context_length=77)(PROMPTS)
    assert torch.allclose(full[:, :16], emb, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        TextEncoder(f"local-dir:{tmp_path}", context_length=100)


def test_constructor_annotations_fit_the_config_schema():
    import inspect

    scalars = (int, float, bool, str)
    allowed = {*scalars, *(s | None for s in scalars)}
    for name, param in inspect.signature(TextEncoder).parameters.items():
        assert param.annotation in allowed, f"TextEncoder.{name}: {param.annotation}"


def test_unknown_name_warns_and_builds_random_tower():
    with pytest.warns(UserWarning, match="not an open_clip model name"):
        enc = TextEncoder(model_name="ViT-L-41", context_length=8, width=32, layers=1, heads=2)
    assert enc.dim == 32
