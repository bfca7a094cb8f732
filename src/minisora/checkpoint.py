"""Checkpoints describe themselves; one function loads them, everywhere (sampling, export, `init_from`).

Three things name a DiT checkpoint:
  - a Lightning checkpoint file (`runs/<name>/checkpoints/*.ckpt`), read with torch.load(weights_only=True)
    (never without it: a checkpoint from elsewhere must not run code on load);
  - an exported folder (config.yaml + model.safetensors + vae.safetensors, see `export_checkpoint`), which
    needs neither Lightning nor pickle;
  - a run folder (`runs/<name>`), meaning its newest complete checkpoint (newest_checkpoint: the one rule
    resume shares), or with --best its best.ckpt (lowest validation loss, best_checkpoint).
The config travels with the weights (checkpoint["minisora_config"]).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minisora.device import DTYPES
from minisora.models.lora import is_lora_state, merged_state
from minisora.models.state_dict import mismatch_report

FORMAT = "minisora-dit-1"  # the `format` metadata of an exported model.safetensors
HELP = "pass a run folder (runs/<name>), a .ckpt from <run>/checkpoints, or an exported folder (minisora export)"


class CheckpointError(ValueError):
    """A path that is not a usable DiT checkpoint, or weights that do not fit a model; names file and reason."""


@dataclass
class Checkpoint:
    """What a checkpoint holds: the run config, the DiT weights and where the autoencoder is."""

    config: dict[str, Any]  # the resolved run config (plain dict)
    state_dict: dict[str, torch.Tensor]  # VideoDiT weights (EMA unless asked otherwise)
    vae_path: Path  # the run's autoencoder file
    source: Path  # the file the weights came from
    kind: str  # "lightning" | "exported"
    weights: str  # "ema" | "raw"
    step: int | None  # training step, when known


# ---- finding ---------------------------------------------------------------------------------
def _saved_step(path: Path) -> int | None:
    """The global_step a checkpoint records (only its pickle is read; mmap leaves tensors on disk); None if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated zip, not a zip, a folder, a refused pickle: not a checkpoint to use
        return None
    return int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else None


def _passes_crc(path: Path) -> bool:
    """Whether every member of the torch.save zip archive passes its CRC check (bit rot and half copies fail)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
        return False


def checkpoint_step(path: Path) -> int | None:
    """The global step of a complete checkpoint; None when `path` is truncated, corrupt or not a checkpoint."""
    return _saved_step(path) if _passes_crc(path) else None


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`: the highest step that passes its CRC checks, last.ckpt on a tie.

    The one rule for resume, sampling, export and init_from. Usually last.ckpt; but a kill between writing
    step-N.ckpt and replacing last.ckpt leaves step N only in the step file, and a corrupt last.ckpt must not
    cost a run its newest state. Steps come from the files, not their names or times; only the chosen file
    is read whole (for its CRCs). Every file found incomplete or corrupt is named in a warning.
    """
    found: list[tuple[int, bool, Path]] = []
    for path in sorted(folder.glob("*.ckpt")):
        step = _saved_step(path)
        if step is None:
            warnings.warn(f"{path} is incomplete or corrupt (not a readable checkpoint); using another", stacklevel=2)
        else:
            found.append((step, path.name == "last.ckpt", path))
    for _, _, path in sorted(found, reverse=True):
        if _passes_crc(path):
            return path
        warnings.warn(f"{path} is incomplete or corrupt (its CRC check fails); using another", stacklevel=2)
    return None



def best_checkpoint(run: str | Path) -> Path:
    """<run>/checkpoints/best.ckpt: the weights with the lowest fixed-grid val/loss (training.validation), checked whole."""
    run = Path(run)
    folder = run if run.name == "checkpoints" else run / "checkpoints"
    best = folder / "best.ckpt"
    if not best.is_file():
        why = ("its validation has not run yet (trainer.val_check_interval) or it has no validation clips "
               "(latents.val_fraction)") if folder.is_dir() else "it is not a run folder (no checkpoints/)"
        raise CheckpointError(f"{run}: no {best.name} in {folder}: {why}; --best takes a run folder (runs/<name>)")
    if checkpoint_step(best) is None:
        raise CheckpointError(f"{best} is incomplete or corrupt; sample the newest checkpoint instead (drop --best)")
    return best

def find_checkpoint(path: str | Path) -> tuple[str, Path]:
    """("lightning", file) or ("exported", model.safetensors) for a file, exported folder or run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; {HELP}")
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return "exported", path / "model.safetensors"
        for folder in (path / "checkpoints", path):
            if folder.is_dir() and (ckpt := newest_checkpoint(folder)) is not None:
                return "lightning", ckpt
        if broken := [*(path / "checkpoints").glob("*.ckpt"), *path.glob("*.ckpt")]:
            raise CheckpointError(f"{path}: no complete checkpoint; {', '.join(p.name for p in sorted(broken))} "
                                  f"are incomplete or corrupt; {HELP}")  # fmt: skip
        if (path / "config.yaml").is_file() or (path / "vae").is_dir() or (path / "checkpoints").is_dir():
            raise CheckpointError(f"{path}: a run folder without DiT checkpoints yet (train the DiT first); {HELP}")
        raise CheckpointError(f"{path}: a folder without model.safetensors or checkpoints/*.ckpt; {HELP}")
    if path.suffix == ".safetensors":
        return "exported", path
    return "lightning", path


# ---- reading weights -------------------------------------------------------------------------
def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") == "minisora-autoencoder-1" or "kind" in meta:
                raise CheckpointError(f"{path}: an autoencoder (VAE) file, not a DiT checkpoint; {HELP}")
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None


def _torch_load(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); {HELP}")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's default format since 1.6; mmap needs it
    try:
        # mmap: a large checkpoint is paged in on use instead of being read whole into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # pickle, zip and unicode errors all mean "not a checkpoint we can read"
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"{path}: holds a pickled Python object ({found.group(1)}) that a weights-only load refuses; "
                f"minisora reads checkpoints only with torch.load(weights_only=True), which cannot run code"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch/Lightning checkpoint ({type(e).__name__}); {HELP}") from None


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _dit_state(ckpt: Any, path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The VideoDiT weights of a loaded Lightning checkpoint (or plain state dict) and which ones they are."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dictionary; {HELP}")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors (keys: {sorted(ckpt)[:8]}); {HELP}")
    if any(k.startswith("vae.") for k in state):
        raise CheckpointError(f"{path}: an autoencoder (VAE) training checkpoint, not a DiT checkpoint; {HELP}")
    raw, averaged = _strip(state, "model."), _strip(state, "ema.module.")
    if not raw and not averaged:  # a bare VideoDiT state dict (torch.save(model.state_dict()))
        return dict(state), "raw"
    if ema and averaged:
        n = state.get("ema.n_averaged")
        if n is not None and int(n) == 0 and raw:
            warnings.warn(f"{path}: the EMA was never updated (step 0); using the raw weights", stacklevel=3)
            return raw, "raw"
        return averaged, "ema"
    if ema and not averaged:
        warnings.warn(f"{path}: no EMA weights in the checkpoint; using the raw weights", stacklevel=3)
    if not raw:
        raise CheckpointError(f"{path}: no raw model weights (model.*) in the checkpoint; use the EMA weights")
    return raw, "raw"


def read_weights(path: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DiT weights of any checkpoint (fp32 or as stored) and what is known about them (kind, source, config, ...)."""
    kind, file = find_checkpoint(path)
    info: dict[str, Any] = {"kind": kind, "source": file, "config": None, "step": None}
    if kind == "exported":
        state, meta = _read_safetensors(file)
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{file}: a safetensors file without minisora DiT metadata (format {meta.get('format')!r}); {HELP}"
            )
        info["weights"] = meta.get("weights", "ema")
        info["step"] = int(meta["step"]) if meta.get("step", "").isdigit() else None
        if (file.parent / "config.yaml").is_file():  # the folder's config wins: a user may edit it (prompts, fps)
            info["config"] = read_config_file(file.parent / "config.yaml")
        elif meta.get("config"):
            info["config"] = json.loads(meta["config"])
        if not ema and info["weights"] == "ema":
            warnings.warn(f"{file}: an export holds one set of weights (EMA); using them", stacklevel=2)
        return state, info
    ckpt = _torch_load(file)
    state, info["weights"] = _dit_state(ckpt, file, ema)
    if isinstance(ckpt, dict):
        info["step"] = ckpt.get("global_step")
        info["config"] = ckpt.get("minisora_config")
    if is_lora_state(state):  # a LoRA fine-tuning run: fold its adapters into the base weights
        state = _merge_lora(state, info["config"], file)
        info["lora_merged"] = True
    return state, info


def _merge_lora(state: dict[str, torch.Tensor], config: dict[str, Any] | None, file: Path) -> dict[str, torch.Tensor]:
    if not config or not config.get("lora"):
        raise CheckpointError(f"{file}: holds LoRA tensors but no `lora` settings in its config to merge them with")
    model = config["model"]
    pt, ph, pw = model.get("patch_size") or [1, 2, 2]
    args = {**model, "in_channels": state["x_embedder.weight"].shape[1] // (pt * ph * pw)}
    if (text_dim := _text_dim(state)) is not None:
        args["text_dim"] = text_dim
    return merged_state(state, args, config["lora"])


def read_config_file(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable config ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: not a minisora run config (no 'model' section)")
    return cfg


# ---- the one loader --------------------------------------------------------------------------
def _vae_candidates(config: dict[str, Any], kind: str, file: Path) -> list[Path]:
    base = file.parent if kind == "exported" else file.parent.parent if file.parent.name == "checkpoints" else None
    named = config.get("vae_weights")
    if named:
        p = Path(named)
        return [p] if p.is_absolute() else [*([base / p] if base else []), p]
    run = Path(config.get("run_dir", "runs")) / config.get("name", "shapes")
    return [
        *([base / "vae" / "vae.safetensors", base / "vae.safetensors"] if base else []),
        run / "vae" / "vae.safetensors",
    ]


def load_checkpoint(path: str | Path, ema: bool = True) -> Checkpoint:
    """Load a Lightning checkpoint, an exported folder or a run folder (its newest checkpoint).

    Returns the run config, the DiT weights (EMA by default) and the autoencoder path; raises
    CheckpointError with the path and the reason for anything else.
    """
    state, info = read_weights(path, ema=ema)
    file = info["source"]
    config = info["config"]
    if config is None:
        raise CheckpointError(
            f"{file}: the checkpoint carries no run config (checkpoint['minisora_config'], which every minisora "
            f"training run writes), so the model cannot be built; {HELP}"
        )
    candidates = _vae_candidates(config, info["kind"], file)
    vae = next((p for p in candidates if p.is_file()), None)
    if vae is None:
        raise CheckpointError(f"{file}: its autoencoder was not found; looked for {', '.join(map(str, candidates))}")
    return Checkpoint(config, state, vae, file, info["kind"], info["weights"], info["step"])


# ---- weights into a model --------------------------------------------------------------------
def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str | Path) -> None:
    """Raise CheckpointError naming missing, unexpected and wrongly shaped tensors unless `state` fits `model`."""
    report = mismatch_report(state, model, found="checkpoint")
    if report:
        head = f"{source}: the weights do not fit the model (the model config differs from the checkpoint's)"
        raise CheckpointError("\n".join([head, *report]))


def load_dit_weights(path: str | Path, model: torch.nn.Module, ema: bool = True) -> dict[str, Any]:
    """Copy a checkpoint's DiT weights (EMA by default) into `model`, weights only (for `init_from` fine-tuning).

    Accepts what load_checkpoint accepts and a bare model.safetensors; returns what is known about the
    source (kind, source, weights, step, config). A VAE file, a non-checkpoint or a model whose config
    differs raise CheckpointError naming the tensors and shapes that differ.
    """
    state, info = read_weights(path, ema=ema)
    check_state_dict(state, model, info["source"])
    model.load_state_dict(state)
    return info


# ---- building and exporting -------------------------------------------------------------------
def dit_args(config: dict[str, Any], latent_channels: int, text_dim: int | None) -> dict[str, Any]:
    """VideoDiT arguments from config `model`, with input channels and text width from the autoencoder and encoder."""
    args = dict(config["model"])
    args["in_channels"] = latent_channels
    if text_dim is not None:
        args["text_dim"] = text_dim
    return args


def _text_dim(state: dict[str, torch.Tensor]) -> int | None:
    """Text width read from the first cross-attention's key/value projection (None for models without text)."""
    kv = next((v for k, v in state.items() if k.endswith(("cross_attn.kv.weight", "cross_attn.kv.base_layer.weight"))), None)
    return int(kv.shape[1]) if kv is not None else None


def write_export(
    folder: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    vae_path: Path,
    weights: str,
    dtype: str,
    step: int | None,
) -> Path:
    """Write config.yaml, model.safetensors and vae.safetensors into `folder` (overwriting them)."""
    from omegaconf import OmegaConf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    folder.mkdir(parents=True, exist_ok=True)
    config = {**config, "vae_weights": "vae.safetensors"}  # relative to the folder, so the folder can move
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in state.items()}
    meta = {"format": FORMAT, "weights": weights, "dtype": dtype, "step": str(step if step is not None else ""),
            "config": json.dumps(config)}  # fmt: skip
    save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
    if Path(vae_path).resolve() != (folder / "vae.safetensors").resolve():
        shutil.copyfile(vae_path, folder / "vae.safetensors")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return folder


def export_checkpoint(
    path: str | Path, out: str | Path, ema: bool = True, dtype: str = "fp32", overwrite: bool = False
) -> Path:
    """Export a checkpoint to a folder that loads without Lightning or pickle; returns the folder.

    The weights are checked against a model built from the config first, so a broken export fails here,
    not on a user's machine. The text width is read from the weights (so no text tower is built or
    downloaded) and the latent channels from the autoencoder file.
    """
    from minisora.models.autoencoder import load_autoencoder
    from minisora.models.dit import VideoDiT

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if (out / "model.safetensors").exists() and not overwrite:
        raise CheckpointError(f"{out}: already holds an export (model.safetensors); pass --overwrite to replace it")
    ckpt = load_checkpoint(path, ema=ema)
    latent_channels = load_autoencoder(ckpt.vae_path).latent_channels
    config = {**ckpt.config, "model": dit_args(ckpt.config, latent_channels, _text_dim(ckpt.state_dict))}
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = VideoDiT(**config["model"])
    check_state_dict(ckpt.state_dict, model, ckpt.source)
    return write_export(out, config, ckpt.state_dict, ckpt.vae_path, ckpt.weights, dtype, ckpt.step)
