"""Pretrained open_clip text towers from local files, through the config a user writes; nothing is downloaded.

A tiny CLIP architecture is registered with open_clip (as `open_clip.add_model_config` would), a randomly
initialised model of it is saved the way released checkpoints are (the standard CLIP class's state dict),
and `text.pretrained=<file>` on the command line must give exactly that model's per-token embeddings.
"""

from __future__ import annotations

import socket
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from minisora.config import kwargs, load_config
from minisora.models.text import TextEncoder

ROOT = Path(__file__).resolve().parents[1]
NAME = "minisora-test-clip"  # registered for the duration of each test only
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}
PROMPTS = ["a red circle moving left", "a blue square moving up", ""]


def _refuse(*args, **kw):
    raise AssertionError("a download was attempted")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Register the tiny architecture; make every download path and every socket connection fail loudly."""
    import huggingface_hub

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, NAME, TINY_CLIP)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module, names in [
        (open_clip.factory, ["download_pretrained", "download_pretrained_from_hf"]),
        (open_clip.pretrained, ["download_pretrained", "download_pretrained_from_url", "download_pretrained_from_hf"]),
        (huggingface_hub, ["hf_hub_download"]),
    ]:
        for name in names:
            monkeypatch.setattr(module, name, _refuse)
    monkeypatch.setattr(socket.socket, "connect", _refuse)


def released_checkpoint(path: Path, seed: int = 123, arch: dict | None = None) -> torch.nn.Module:
    """A random CLIP of the tiny architecture, saved as its plain state dict (.safetensors, .pt or .bin)."""
    cfg = arch or TINY_CLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # not TextEncoder's seed 0: equal embeddings must come from the file
        model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():  # non-default LayerNorm values, which random init alone never gives
        model.ln_final.bias.normal_()
        model.ln_final.weight.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return model


def per_token(model: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """(B, 77, D) final-LayerNorm output of a standard open_clip CLIP, written out from its modules."""
    tokens = open_clip.tokenize(prompts)  # (B, 77)
    x = model.token_embedding(tokens) + model.positional_embedding  # (B, 77, D)
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def encoder_from_config(*overrides: str) -> TextEncoder:
    """What `minisora train --config configs/shapes.yaml text.model_name=... text.pretrained=...` builds."""
    cfg = load_config(ROOT / "configs/shapes.yaml", [f"text.model_name={NAME}", "text.context_length=16", *overrides])
    return TextEncoder(**kwargs(cfg.text))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_local_checkpoint_through_the_config_gives_the_saved_models_embeddings(tmp_path, suffix):
    file = tmp_path / f"clip{suffix}"
    saved = released_checkpoint(file)
    encoder = encoder_from_config(f"text.pretrained={file}")
    emb, mask = encoder(PROMPTS)
    with torch.no_grad():
        expected = per_token(saved, PROMPTS)[:, :16]  # (B, 16, 48)
    assert emb.shape == (3, 16, 48) and encoder.dim == 48
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)
    assert mask.sum(1).tolist() == [7, 7, 2]
    # the vision tower was dropped, the weights are frozen; without the file the tower is another one
    assert not any(n.startswith("visual") for n, _ in encoder.named_parameters())
    assert not any(p.requires_grad for p in encoder.parameters())
    random_tower, _ = encoder_from_config()(PROMPTS)
    assert (random_tower - expected).abs().max() > 0.1


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    saved = released_checkpoint(tmp_path / "clip.safetensors")
    emb, _ = encoder_from_config("text.pretrained=~/clip.safetensors")(PROMPTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(emb, per_token(saved, PROMPTS[:1])[:, :16], rtol=1e-5, atol=1e-5)


def test_a_missing_file_names_the_file_and_the_model(tmp_path):
    missing = tmp_path / "nowhere" / "clip.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"pretrained file {missing} for open_clip model '{NAME}' not found"):
        encoder_from_config(f"text.pretrained={missing}")


def test_a_file_of_another_architecture_is_refused_naming_both(tmp_path):
    deeper = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "layers": 3}}
    file = tmp_path / "other.safetensors"
    released_checkpoint(file, arch=deeper)
    expected = rf"{file} does not fit open_clip model '{NAME}': .*Unexpected key.*resblocks\.2"
    with pytest.raises(ValueError, match=expected):
        encoder_from_config(f"text.pretrained={file}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match=rf"{junk} does not fit open_clip model '{NAME}'"):
        encoder_from_config(f"text.pretrained={junk}")


def test_a_tag_goes_to_open_clips_download_and_an_unknown_one_lists_the_tags():
    # ViT-B-32's real tag reaches open_clip's downloader (refused here), and the error says what to do offline.
    with pytest.raises(RuntimeError, match="laion2b_s34b_b79k.*set pretrained to its local path"):
        TextEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="neither an open_clip tag of 'ViT-B-32' .*laion2b_s34b_b79k"):
        TextEncoder("ViT-B-32", pretrained="laion5b_typo")


def test_a_schema_name_with_pretrained_is_refused(tmp_path):
    with pytest.raises(ValueError, match="would be ignored"):
        TextEncoder(f"local-dir:{tmp_path}", pretrained=str(tmp_path / "clip.pt"))
