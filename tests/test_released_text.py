"""T5-family text encoders: Wan's umT5 and LTX-Video's T5 exactly as their pipelines encode, and any local
T5 folder as the text encoder of minisora's own VideoDiT through the text config."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
pytest.importorskip("transformers", reason="needs transformers: pip install -e .[diffusers]")

import released_folders as rf  # noqa: E402

from minisora.models.released import TEXT_STYLE  # noqa: E402
from minisora.models.t5_text import T5TextEncoder  # noqa: E402

PROMPTS = [rf.PROMPT, "  a   blue square &amp; moving up  "]  # Wan cleans whitespace and HTML entities


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released-text")
    return {family: rf.build_folder(root, family) for family in ("wan21", "ltx")}


def test_wan_umt5_equals_the_pipeline(folders):
    """512 tokens, masked encoder, embeddings zero past each prompt: WanPipeline.encode_prompt, bit for bit."""
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(folders["wan21"])
    with torch.no_grad():  # as in the pipeline's __call__ (with gradients, attention takes another kernel)
        ref, neg = pipe.encode_prompt(PROMPTS, negative_prompt=rf.NEGATIVE, max_sequence_length=512)
    enc = T5TextEncoder(folders["wan21"], context_length=512, **TEXT_STYLE["wan"])
    emb, mask = enc(PROMPTS)
    assert emb.shape == (2, 512, rf.TEXT_DIM) and mask.shape == (2, 512) and enc.dim == rf.TEXT_DIM
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    torch.testing.assert_close(enc([rf.NEGATIVE] * 2)[0], neg, rtol=0, atol=0)
    lengths = mask.sum(1)
    assert lengths.tolist() == [len(rf.PROMPT.split()) + 1, 7]  # words + </s>; cleaned: "a blue square & moving up"
    assert (emb[0, lengths[0]:] == 0).all() and (emb[0, : lengths[0]].abs().sum(-1) > 0).all()


def test_ltx_t5_equals_the_pipeline(folders):
    """128 tokens, the encoder sees the padding (no mask), the mask goes to the transformer: LTXPipeline's encoding."""
    import diffusers

    pipe = diffusers.LTXPipeline.from_pretrained(folders["ltx"])
    with torch.no_grad():
        ref, ref_mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, negative_prompt=rf.NEGATIVE, max_sequence_length=128)
    enc = T5TextEncoder(folders["ltx"], context_length=128, **TEXT_STYLE["ltx"])
    emb, mask = enc(PROMPTS)
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    assert torch.equal(mask, ref_mask)
    null, null_mask = enc.null_embedding()
    assert null.shape == (1, 128, rf.TEXT_DIM) and null_mask.sum() == 1  # "" is </s> alone
    torch.testing.assert_close(enc([rf.NEGATIVE])[0], neg[:1], rtol=0, atol=0)
    assert torch.equal(enc([rf.NEGATIVE])[1], neg_mask[:1])
    assert emb[0, -1].abs().sum() > 0  # padding positions carry the encoder's output (LTX does not zero them)


def test_long_prompt_warns_with_its_length_then_truncates(folders):
    enc = T5TextEncoder(folders["ltx"], context_length=8)
    long = " ".join(rf.WORDS[:20])
    with pytest.warns(UserWarning, match=r"longer than the 8-token context.*\(21 tokens\)"):
        emb, mask = enc([long, "a cat"])
    assert emb.shape == (2, 8, rf.TEXT_DIM) and mask[0].all() and mask[1].sum() == 3
    with pytest.raises(TypeError, match="list of prompts"):
        enc("a cat")


def test_t5_folder_as_videodit_text_encoder_from_the_config(folders, tmp_path):
    """text.model_name t5 + text.pretrained <folder>: TextEncoder loads the folder's T5 (pipeline folder, its
    text_encoder/, or a transformers folder holding both), and VideoDiT trains on its embeddings."""
    from minisora import diffusion
    from minisora.config import load_config
    from minisora.models.dit import VideoDiT
    from minisora.models.text import TextEncoder

    cfg = load_config(rf.ROOT / "configs/shapes.yaml", ["text.model_name=t5", f"text.pretrained={folders['ltx']}",
                                                     "text.context_length=16"])  # fmt: skip
    text = TextEncoder(**cfg.text)
    emb, mask = text(["a red circle", "a blue square moving up"])
    assert text.dim == rf.TEXT_DIM and emb.shape == (2, 16, rf.TEXT_DIM) and mask.sum(1).tolist() == [4, 6]
    assert (emb[0, 4:] == 0).all() and not any(p.requires_grad for p in text.parameters())
    single = tmp_path / "t5"  # a transformers-style folder: weights and tokenizer together
    shutil.copytree(folders["ltx"] / "text_encoder", single)
    for f in (folders["ltx"] / "tokenizer").iterdir():
        shutil.copy(f, single)
    for source in (folders["ltx"] / "text_encoder", single):
        torch.testing.assert_close(TextEncoder("t5", pretrained=str(source), context_length=16)(["a red circle"])[0],
                                   emb[:1], rtol=0, atol=0)  # fmt: skip

    torch.manual_seed(0)
    dit = VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=text.dim)
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    x0, noise, t = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4), torch.full((2,), 0.5)
    losses = []
    for _ in range(10):
        loss = diffusion.flow_loss(dit, x0, t, noise, context=emb, context_mask=mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_t5_folders_are_named(folders, tmp_path):
    from minisora.models.text import TextEncoder

    with pytest.raises(ValueError, match="model_name 't5' needs pretrained=<folder>"):
        TextEncoder("t5")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} is not a folder"):
        T5TextEncoder(tmp_path / "nowhere")
    lonely = tmp_path / "lonely"
    shutil.copytree(folders["ltx"] / "text_encoder", lonely)
    with pytest.raises(FileNotFoundError, match="no tokenizer for .*lonely.*tokenizer.json"):
        T5TextEncoder(lonely)
    clip = tmp_path / "clip"
    shutil.copytree(folders["ltx"] / "tokenizer", clip)
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'clip_text_model' is not a T5-family encoder"):
        T5TextEncoder(clip)
