"""LoRA on released models in the ecosystem's files: minisora's adapter, saved as diffusers or ComfyUI keys, loads
in diffusers' pipeline and gives minisora's latents; minisora reads both formats back; other bases are refused."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
pytest.importorskip("transformers", reason="needs transformers: pip install -e .[diffusers]")

import released_folders as rf  # noqa: E402
from test_released_parity import TOLERANCE, pipeline_latents, relative_error  # noqa: E402

from minisora.models.lora import LoraError  # noqa: E402
from minisora.models.lora_formats import add_released_lora, load_released_lora, save_released_lora  # noqa: E402

RANK, ALPHA = 4, 12.0  # alpha != rank: the file must carry it
# Wan: also layers outside the blocks (their ComfyUI keys carry no alpha: it is folded into lora_up)
TARGETS = {"wan21": ["self_attn", "cross_attn", "mlp", r"condition_embedder\.time_proj", "proj_out"],
           "ltx": ["self_attn", "cross_attn", "mlp"]}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released-lora")
    return {family: rf.build_folder(root, family) for family in ("wan21", "ltx")}


def lora_model(folder, family: str, seed: int = 0):
    """A released model with a LoRA whose update is large (peft starts lora_B at zero: redrawn here)."""
    from minisora.models.released import load_released

    model = load_released(folder, vae=False)
    add_released_lora(model.denoiser, RANK, ALPHA, targets=TARGETS[family])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def sample(model, family: str) -> torch.Tensor:
    from test_released_parity import minisora_latents

    return minisora_latents(model, family, "default")


def diffusers_with_lora(folder, family: str, lora_file) -> torch.Tensor:
    return pipeline_latents(folder, family, "default", lora=lora_file)


@pytest.mark.parametrize("family", ["wan21", "ltx"])
def test_lora_round_trips_through_diffusers_and_comfyui_keys(folders, family, tmp_path):
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    from minisora.models.released import load_released

    model = lora_model(folders[family], family)
    ours = sample(model, family)
    base = pipeline_latents(folders[family], family, "default")
    assert relative_error(ours, base) > 100 * TOLERANCE  # the LoRA changes the samples a lot

    files = {fmt: save_released_lora(tmp_path / fmt, model.denoiser, format=fmt, source=str(folders[family]))
             for fmt in ("diffusers", "comfyui")}  # fmt: skip
    with safe_open(str(files["diffusers"]), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    block = "blocks.0" if family == "wan21" else "transformer_blocks.0"
    assert files["diffusers"].name == "pytorch_lora_weights.safetensors"
    assert f"transformer.{block}.attn1.to_q.lora_A.weight" in keys
    adapter = json.loads(meta[LORA_ADAPTER_METADATA_KEY])
    assert adapter["transformer.r"] == RANK and adapter["transformer.lora_alpha"] == ALPHA
    with safe_open(str(files["comfyui"]), "pt") as f:
        comfy = set(f.keys())
    if family == "wan21":
        original = ("blocks.0.self_attn.q.lora_down.weight", "blocks.1.ffn.2.lora_up.weight",
                    "blocks.0.cross_attn.o.alpha", "head.head.lora_down.weight")  # fmt: skip
        assert {f"diffusion_model.{k}" for k in original} <= comfy
    else:
        assert "diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight" in comfy

    errors = {}
    for fmt, file in files.items():  # diffusers loads both (it converts ComfyUI keys)
        errors[f"diffusers loads {fmt}"] = relative_error(diffusers_with_lora(folders[family], family, file), ours)
        fresh = load_released(folders[family], vae=False)  # minisora reads both back
        settings = load_released_lora(file, fresh.denoiser)
        assert settings["format"] == fmt and settings["rank"] == RANK
        errors[f"minisora reads {fmt}"] = relative_error(sample(fresh, family), ours)
    print(f"LoRA {family}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCE, errors


def test_without_the_metadata_diffusers_would_assume_alpha_rank(folders, tmp_path):
    """The adapter metadata is what makes alpha != rank load right: stripped, diffusers' latents differ."""
    from safetensors.torch import load_file, save_file

    model = lora_model(folders["wan21"], "wan21")
    ours = sample(model, "wan21")
    file = save_released_lora(tmp_path / "a.safetensors", model.denoiser)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(file)), str(bare))
    assert relative_error(diffusers_with_lora(folders["wan21"], "wan21", bare), ours) > 100 * TOLERANCE


def test_a_lora_for_another_base_is_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    from minisora.models.released import load_released

    wan, ltx = lora_model(folders["wan21"], "wan21"), lora_model(folders["ltx"], "ltx")
    wan_file = save_released_lora(tmp_path / "wan.safetensors", wan.denoiser)
    ltx_comfy = save_released_lora(tmp_path / "ltx.safetensors", ltx.denoiser, format="comfyui")
    fresh_ltx, fresh_wan = (load_released(folders[f], vae=False, text=False).denoiser for f in ("ltx", "wan21"))
    with pytest.raises(LoraError, match="made for another base \\(WanTransformer3DModel.*LTXVideoTransformer3DModel"):
        load_released_lora(wan_file, fresh_ltx)
    with pytest.raises(LoraError, match="not a LoRA for WanTransformer3DModel|made for another base"):
        load_released_lora(ltx_comfy, fresh_wan)
    # no minisora header (an ecosystem file) and keys of the other family: named by its layers
    tensors = load_file(str(wan_file))
    save_file(tensors, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(LoraError, match=r"made for another base: \d+ of its \d+ layers are not in this "
                                        r"LTXVideoTransformer3DModel \(e.g. blocks\.0\.attn1\.to_k"):  # fmt: skip
        load_released_lora(tmp_path / "foreign.safetensors", fresh_ltx)
    # same family, shapes that do not fit (a wider model's layer)
    key = "transformer.blocks.0.attn1.to_q.lora_A.weight"
    tensors[key] = torch.zeros(RANK, tensors[key].shape[1] + 8)
    save_file(tensors, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoraError, match=r"layer blocks.0.attn1.to_q does not fit this base: lora_A \(4, 32\)"):
        load_released_lora(tmp_path / "wide.safetensors", fresh_wan)
    with pytest.raises(LoraError, match="no such adapter file"):
        load_released_lora(tmp_path / "none.safetensors", fresh_wan)
