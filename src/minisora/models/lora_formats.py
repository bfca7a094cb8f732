"""LoRA on a released transformer, written and read in the files the ecosystem loads.

The adapters are peft LoRA layers on the diffusers transformer inside a released denoiser (models/lora.py's
add_lora, target groups per family). Two file formats, both read back here:
- "diffusers": pytorch_lora_weights.safetensors, keys `transformer.<module>.lora_A.weight` / `lora_B.weight`,
  the LoraConfig in the header under `lora_adapter_metadata` (keys prefixed `transformer.`), as
  WanPipeline/LTXPipeline.save_lora_weights(transformer_lora_adapter_metadata=...) writes it; without it
  diffusers' load_lora_weights assumes alpha = rank, so an alpha != rank adapter would load wrong.
- "comfyui": original-Wan keys `diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up.weight` and a
  per-module `alpha` (ComfyUI's and the Wan repository's naming); diffusers converts them on load. Its
  converter ignores alpha outside the blocks, and its LTX-Video converter only strips `diffusion_model.`, so
  there (and for LTX) alpha/rank is folded into lora_up/lora_B and no alpha is written: every reader gets
  the same update.
Reading goes through the family pipeline's own lora_state_dict (diffusers' conversions), then checks that
every layer exists in this transformer with the file's shapes: a LoRA for another base is refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minisora.models.lora import (LoraError, adapter_state, add_lora, has_lora, lora_layers, read_safetensors,
                                  set_scale)

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
FORMATS = ("diffusers", "comfyui")
# transformer class -> (pipeline class whose LoRA loader reads its files, target groups over its module names)
FAMILIES = {
    "WanTransformer3DModel": ("WanPipeline", {
        "self_attn": r"blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
        "cross_attn": r"blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)",
        "mlp": r"blocks\.\d+\.ffn\.net\.(0\.proj|2)",
    }),
    "LTXVideoTransformer3DModel": ("LTXPipeline", {
        "self_attn": r"transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
        "cross_attn": r"transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)",
        "mlp": r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    }),
}  # fmt: skip
# WanTransformer3DModel's module names -> the original Wan repository's (what diffusers' converter maps back).
WAN_ORIGINAL = [
    (r"blocks\.(\d+)\.attn1\.to_([qkv])", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"), (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"), (r"proj_out", "head.head"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
]  # fmt: skip
BASE_KEY = "minisora_base"  # our own header entry: the family and source the adapter was trained on


def _family(denoiser: nn.Module) -> tuple[str, str, dict[str, str]]:
    """(transformer class, pipeline class, target groups) of a released denoiser."""
    transformer = getattr(denoiser, "transformer", None)
    name = type(transformer).__name__
    if name not in FAMILIES:
        raise LoraError(f"released LoRA needs a released denoiser (Wan or LTX-Video adapter), got "
                        f"{type(denoiser).__name__} holding {name}")  # fmt: skip
    return (name, *FAMILIES[name])


def add_released_lora(denoiser: nn.Module, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
                      targets: list[str] | None = None) -> nn.Module:  # fmt: skip
    """LoRA (peft) on the denoiser's transformer, the rest frozen; targets: groups (self_attn, cross_attn, mlp;
    default all three) or regexes over the transformer's module names. Returns the denoiser."""
    _, _, groups = _family(denoiser)
    targets = list(targets) if targets else list(groups)
    patterns = [groups.get(t, t) for t in targets]
    add_lora(denoiser.transformer, rank, alpha, dropout, patterns, where="released transformer")
    return denoiser


def _pairs(denoiser: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name -> (lora_A (r, in), lora_B (out, r), alpha) of the denoiser's LoRA layers."""
    if not has_lora(denoiser.transformer):
        raise LoraError("the denoiser has no LoRA layers to save (add_released_lora or load_released_lora first)")
    state = adapter_state(denoiser.transformer)
    out = {}
    for name, layer in lora_layers(denoiser.transformer):
        r = layer.r["default"]
        out[name] = (state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], float(layer.lora_alpha["default"]))
        if r != out[name][0].shape[0]:
            raise LoraError(f"{name}: rank {r} does not match its lora_A {tuple(out[name][0].shape)}")
    return out


def _original_wan(name: str) -> str:
    for pattern, repl in WAN_ORIGINAL:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise LoraError(f"LoRA layer {name} has no original-Wan / ComfyUI name; export it in the diffusers format")


def save_released_lora(path: str | Path, denoiser: nn.Module, format: str = "diffusers",
                       source: str | None = None) -> Path:  # fmt: skip
    """Write the denoiser's LoRA as `format` (diffusers or comfyui) to `path` (a .safetensors file, or a folder
    that gets pytorch_lora_weights.safetensors); returns the file. The header records the base family."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise LoraError(f"LoRA format must be one of {', '.join(FORMATS)}, got {format!r}")
    transformer, pipeline, _ = _family(denoiser)
    pairs = _pairs(denoiser)
    ranks = {a.shape[0] for a, _, _ in pairs.values()}
    alphas = {alpha for _, _, alpha in pairs.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise LoraError(f"one rank and alpha for all layers expected, got ranks {sorted(ranks)}, "
                        f"alphas {sorted(alphas)}")
    (rank,), (alpha,) = ranks, alphas
    meta = {"format": "pt", BASE_KEY: json.dumps({"transformer": transformer, "source": source})}
    tensors = {}
    if format == "diffusers":
        for name, (a, b, _) in pairs.items():
            tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = a, b
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(pairs), "lora_dropout": 0.0}
        meta[LORA_ADAPTER_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in config.items()}, indent=2,
                                                     sort_keys=True)  # fmt: skip
    elif transformer == "WanTransformer3DModel":
        for name, (a, b, _) in pairs.items():
            key = f"diffusion_model.{_original_wan(name)}"
            if name.startswith("blocks."):  # diffusers' converter honours alpha here (and ComfyUI everywhere)
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = a, b
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
            else:
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = a, b * (alpha / rank)
    else:  # LTX-Video: diffusers' converter only strips the prefix (alpha = rank): fold alpha / rank into lora_B
        for name, (a, b, _) in pairs.items():
            tensors[f"diffusion_model.{name}.lora_A.weight"] = a
            tensors[f"diffusion_model.{name}.lora_B.weight"] = b * (alpha / rank)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def read_released_lora(path: str | Path, denoiser: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(peft state {module.lora_A.weight: ...}, settings {format, rank, alpha, modules, base}) of a LoRA file in
    either format, checked against the denoiser's transformer; LoraError naming the file and what does not fit."""
    import diffusers
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    transformer_cls, pipeline, _ = _family(denoiser)
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    tensors, header = read_safetensors(path)
    base = json.loads(header.get(BASE_KEY, "{}"))
    if base.get("transformer") and base["transformer"] != transformer_cls:
        raise LoraError(f"{path}: this LoRA was made for another base ({base['transformer']}, from "
                        f"{base.get('source')}); this model's transformer is {transformer_cls}")  # fmt: skip
    fmt = "comfyui" if any(k.startswith("diffusion_model.") for k in tensors) else "diffusers"
    try:  # diffusers' own conversion of original-Wan / ComfyUI keys
        state = getattr(diffusers, pipeline).lora_state_dict(tensors)
    except (ValueError, KeyError, IndexError) as e:
        raise LoraError(f"{path}: not a LoRA for {transformer_cls} ({pipeline}.lora_state_dict could not read its "
                        f"keys: {type(e).__name__} {e})") from None  # fmt: skip
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    bad = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise LoraError(f"{path}: keys other than lora_A/lora_B weights are not supported (e.g. {bad[:3]})")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    config = json.loads(header[LORA_ADAPTER_METADATA_KEY]) if LORA_ADAPTER_METADATA_KEY in header else {}
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraError(f"{path}: per-layer ranks or alphas (rank_pattern/alpha_pattern) are not supported")
    rank = _check_fit(path, denoiser.transformer, state, modules)
    alpha = float(config.get("lora_alpha", rank))  # diffusers' rule: no metadata, alpha = rank
    return state, dict(format=fmt, rank=rank, alpha=alpha, modules=modules, base=base)


def _check_fit(path: Path, transformer: nn.Module, state: dict[str, torch.Tensor], modules: list[str]) -> int:
    """Every module is a Linear of `transformer` with the file's shapes and one rank; returns the rank."""
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    missing = [m for m in modules if m not in linears]
    if missing:
        raise LoraError(f"{path}: this LoRA was made for another base: {len(missing)} of its {len(modules)} layers are "
                        f"not in this {type(transformer).__name__} (e.g. {missing[0]}; this model has layers like "
                        f"{next(iter(n for n in linears if '.attn1.' in n), next(iter(linears)))})")  # fmt: skip
    ranks = set()
    for m in modules:
        a, b = state.get(f"{m}.lora_A.weight"), state.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            raise LoraError(f"{path}: layer {m} has only one of lora_A / lora_B")
        lin = linears[m]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            raise LoraError(f"{path}: layer {m} does not fit this base: lora_A {tuple(a.shape)}, lora_B "
                            f"{tuple(b.shape)} for a Linear of {lin.in_features} -> {lin.out_features}")  # fmt: skip
        ranks.add(a.shape[0])
    if len(ranks) != 1:
        raise LoraError(f"{path}: layers of different ranks {sorted(ranks)} are not supported")
    return ranks.pop()


def load_released_lora(path: str | Path, denoiser: nn.Module, scale: float = 1.0) -> dict[str, Any]:
    """Put a LoRA file (diffusers or ComfyUI format) onto a released denoiser without one; returns its settings."""
    from minisora.models.lora import _set_state

    if has_lora(denoiser.transformer):
        raise LoraError(f"{path}: the denoiser already has LoRA layers; load onto a fresh base")
    state, settings = read_released_lora(path, denoiser)
    targets = [re.escape(m) for m in settings["modules"]]
    add_lora(denoiser.transformer, settings["rank"], settings["alpha"], 0.0, targets, where="released transformer")
    _set_state(denoiser.transformer, state, Path(path))
    set_scale(denoiser.transformer, scale)
    return settings
