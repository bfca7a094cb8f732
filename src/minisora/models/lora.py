"""LoRA adapters on the DiT (and optionally the text tower) through peft: add, save, load onto a base, merge.

peft's LoRA layers wrap the chosen nn.Linear modules in place (inject_adapter_in_model), so the model
keeps its class and forward; the base weights are frozen and only lora_A / lora_B train. An adapter file
is a small safetensors file of those tensors whose metadata records the LoRA settings and the identity of
the base it was trained on: a hash of the base's architecture (which must match) and a fingerprint of
its weights (which should).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "minisora-lora-1"
ADAPTER = "default"  # peft's adapter name; one adapter per model here
# Target groups of VideoDiT (regexes over module names); anything else is taken as a regex itself.
GROUPS = {
    "self_attn": r"blocks\.\d+\.attn\.(qkv|proj)",
    "cross_attn": r"blocks\.\d+\.cross_attn\.(q|kv|proj)",
    "mlp": r"blocks\.\d+\.mlp\.fc[12]",
    "adaln": r"t_block\.1",
    "pooled_text": r"text_pool\.[02]",  # the prompt-wide path into adaLN (model.pooled_text)
}
# open_clip's MLPs; not attn.out_proj: nn.MultiheadAttention reads out_proj.weight directly, bypassing a LoRA.
TEXT_TARGETS = r"text\.transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)"
NOT_ARCHITECTURE = ("grad_checkpointing", "recompute")  # runtime switches: an adapter fits a base with either setting


class LoraError(ValueError):
    """An adapter that is not one, does not fit its base, or a target pattern that matches nothing."""


def target_regex(model: nn.Module, targets: list[str], where: str = "model") -> str:
    """One regex (peft's full-match form) over `model`'s Linear layers; each target must match at least one."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    patterns = []
    for target in targets:
        pattern = GROUPS.get(target, target)
        try:
            hits = [n for n in linears if re.fullmatch(pattern, n)]
        except re.error as e:
            raise LoraError(f"lora target '{target}' is not a valid regex ({e})") from None
        if not hits:
            shown = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
            raise LoraError(
                f"lora target '{target}' matches no Linear layer of the {where}; use a group "
                f"({', '.join(GROUPS)}) or a regex over names such as: {shown}"
            )
        patterns.append(pattern)
    return "|".join(f"(?:{p})" for p in patterns)


def add_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], where: str = "model"
) -> nn.Module:
    """Wrap the target layers of `model` in LoRA (in place), freeze everything else; returns `model`."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise LoraError(f"need lora rank >= 1, alpha > 0 and 0 <= dropout < 1; got {rank}, {alpha}, {dropout}")
    if not targets:
        raise LoraError(f"lora targets is empty; choose from {', '.join(GROUPS)} or module-name regexes")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(model, targets, where))
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # lora_A/lora_B are trainable, the rest frozen
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `model` (peft's names without the adapter name), on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def set_scale(model: nn.Module, scale: float) -> None:
    """Multiply every LoRA update by `scale` (1 = as trained; 0 = the base model)."""
    for _, layer in lora_layers(model):
        layer.set_scale(ADAPTER, scale)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each LoRA update into its base weight (peft's merge) and put the plain layer back; returns `model`."""
    from minisora.models.quantized import check_mergeable

    check_mergeable(model)  # an 8-bit base cannot take a float update
    for name, layer in lora_layers(model):
        layer.merge(safe_merge=True)  # raises if the merged weight is not finite
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model


# ---- identity of a base ----------------------------------------------------------------------
def architecture(model_config: dict[str, Any]) -> dict[str, Any]:
    """The VideoDiT arguments that shape its weights (patch_size's default filled in, runtime switches dropped)."""
    arch = {k: v for k, v in model_config.items() if k not in NOT_ARCHITECTURE}
    arch["patch_size"] = list(arch.get("patch_size") or [1, 2, 2])
    return arch


def config_hash(model_config: dict[str, Any]) -> str:
    """A hash of the architecture: an adapter only fits a base with the same one."""
    return hashlib.sha256(json.dumps(architecture(model_config), sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of the base weights (LoRA tensors excluded), so an adapter knows which checkpoint it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")  # the same weights before and after wrapping
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- files -----------------------------------------------------------------------------------
def save_adapter(
    path: str | Path, dit: nn.Module, settings: dict[str, Any], base: dict[str, Any], text: nn.Module | None = None
) -> Path:
    """Write the LoRA tensors of `dit` (and `text`, prefixed "text.") with their settings and base identity."""
    from safetensors.torch import save_file

    tensors = adapter_state(dit)
    if text is not None and has_lora(text):
        tensors.update({f"text.{k}": v for k, v in adapter_state(text).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "lora": json.dumps(settings), **{k: str(v) for k, v in base.items()}}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors LoRA file; LoraError naming the file if missing or not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{path}: not a LoRA adapter (not a safetensors file: {e})") from None
    return tensors, meta


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata with `lora` settings parsed) of an adapter file; LoraError for anything else."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise LoraError(
            f"{path}: not a minisora LoRA adapter (format {meta.get('format')!r}, expected {FORMAT!r}); adapters are "
            f"written by LoRA fine-tuning runs to <run>/lora/adapter.safetensors"
        )
    meta["lora"] = json.loads(meta["lora"])
    return tensors, meta


def load_adapter(
    path: str | Path, dit: nn.Module, model_config: dict[str, Any], text: nn.Module | None = None, scale: float = 1.0
) -> dict[str, Any]:
    """Put the adapter at `path` onto a base DiT (and text tower) built from `model_config`; returns its metadata.

    A base whose architecture differs raises LoraError; base weights that differ from the ones the adapter
    was trained on only warn (a LoRA on a further-trained base is legitimate, if not guaranteed to work).
    """
    tensors, meta = read_adapter(path)
    want, have = meta.get("base_config_hash"), config_hash(model_config)
    if want != have:
        theirs, ours = json.loads(meta.get("base_model", "{}")), architecture(model_config)
        diff = [f"{k}: adapter's base {theirs.get(k)!r}, this model {ours.get(k)!r}"
                for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]  # fmt: skip
        raise LoraError(f"{path}: this adapter was trained on a different base architecture: {'; '.join(diff) or want}")
    if meta.get("base_fingerprint") and meta["base_fingerprint"] != weights_fingerprint(dit):
        warnings.warn(
            f"{path}: the base weights differ from those the adapter was trained on "
            f"({meta.get('base_source', 'unknown')}); the result may be off",
            stacklevel=2,
        )
    s = meta["lora"]
    add_lora(dit, s["rank"], s["alpha"], 0.0, s["targets"])
    text_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("text.")}
    _set_state(dit, {k: v for k, v in tensors.items() if not k.startswith("text.")}, path)
    if text_tensors:
        if text is None:
            raise LoraError(f"{path}: holds text-encoder LoRA weights but the model has no text encoder")
        add_lora(text, s["rank"], s["alpha"], 0.0, [TEXT_TARGETS], where="text encoder")
        _set_state(text, text_tensors, path)
    for m in (dit, text):
        if m is not None and has_lora(m):
            set_scale(m, scale)
    return meta


def _set_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)
    except RuntimeError as e:  # wrongly shaped tensors
        raise LoraError(f"{path}: adapter tensors do not fit the model: {str(e).splitlines()[-1].strip()}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = set(adapter_state(model))
    missing = sorted(expected - set(tensors))
    if unexpected or missing:
        raise LoraError(f"{path}: adapter tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def lora_settings(
    rank: int = 16,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    text_encoder: bool = False,
) -> dict[str, Any]:
    """The `lora` config section: LoRA rank, alpha (update scale alpha/rank), dropout, DiT targets, text tower too.

    targets: groups (self_attn, cross_attn, mlp, adaln, pooled_text) or regexes over module names; default
    self_attn + cross_attn + mlp. text_encoder: also LoRA the text tower's MLPs (then captions are
    encoded at every step instead of read from the latent cache).
    """
    targets = list(targets) if targets else ["self_attn", "cross_attn", "mlp"]
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise LoraError(f"need lora.rank >= 1, lora.alpha > 0 and 0 <= lora.dropout < 1; got {rank}, {alpha}, {dropout}")
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets, "text_encoder": text_encoder}


def base_identity(dit: nn.Module, model_config: dict[str, Any], source: str) -> dict[str, str]:
    """What an adapter records of the base it is trained on (call before add_lora or after: LoRA is ignored)."""
    return {
        "base_config_hash": config_hash(model_config),
        "base_model": json.dumps(architecture(model_config), sort_keys=True),
        "base_fingerprint": weights_fingerprint(dit),
        "base_source": source,
    }


def merged_state(state: dict[str, torch.Tensor], model_args: dict[str, Any], settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A plain VideoDiT state dict from the state of a LoRA-wrapped one (a LoRA run's checkpoint), via peft's merge."""
    from minisora.models.dit import VideoDiT

    model = VideoDiT(**model_args)
    add_lora(model, settings["rank"], settings["alpha"], 0.0, settings["targets"])
    model.load_state_dict(state)
    return merge_lora(model).state_dict()


def is_lora_state(state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in k for k in state)
