"""Typed experiment configs on OmegaConf: schemas come from constructor signatures, errors name key and file.

Each section's keys are exactly the constructor arguments of the class it configures
(`VideoDiT(**cfg.model)`), so the schema is derived from that signature instead of being
written twice. Files merge as: schema defaults -> the files listed under `base:` (each may have
its own base) -> the experiment file -> command-line `key=value` overrides. One top-level `seed`
sets every stage's seed unless a section sets its own.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONFIG_ROOT = Path("configs")


class ConfigError(ValueError):
    """A config file, key or value that is not what the schema expects."""


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments a run may set (a subset of `lightning.Trainer`)."""

    max_steps: int = 1000
    accelerator: str = "auto"  # "cpu", "gpu", "auto"
    devices: str = "auto"  # "auto", a count ("2") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"  # "auto" (one device), "ddp", "fsdp" (shards the DiT; training/strategy.py)
    # Keyword arguments of DDPStrategy for ddp (e.g. {static_graph: true}); fsdp and auto take none.
    strategy_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "auto"  # "auto" = bf16-mixed on a GPU that supports it, else 32-true
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    val_check_interval: int | None = None  # validate every N training steps (None: once per epoch)
    limit_val_batches: int | None = 8
    checkpoint_every: int = 500  # steps between checkpoints; the last step is saved too, whatever max_steps is
    deterministic: bool = False
    enable_progress_bar: bool = True


def _section_schema(cls: type, skip: tuple[str, ...] = ()) -> type:
    """A dataclass whose fields are the annotated keyword arguments of `cls.__init__`.

    A `seed` argument becomes optional with default null: load_config fills it from the top-level seed.
    """
    fn = cls.__init__ if isinstance(cls, type) else cls
    sig = inspect.signature(fn)
    hints = inspect.get_annotations(fn, eval_str=True)
    fields = []
    for name, p in sig.parameters.items():
        if name == "self" or name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in hints:
            raise TypeError(f"{cls.__qualname__}: argument {name!r} needs a type annotation to be configurable")
        default = p.default
        if name == "seed":
            fields.append((name, int | None, field(default=None)))
            continue
        if default is inspect.Parameter.empty:
            spec = field(default=dataclasses.MISSING)
        elif isinstance(default, (list, dict)):
            spec = field(default_factory=lambda d=default: type(d)(d))
        else:
            spec = field(default=default)
        fields.append((name, hints[name], spec))
    schema = dataclasses.make_dataclass(f"{cls.__name__}Config", fields)
    schema.__doc__ = f"Keys are the arguments of {cls.__module__}.{cls.__qualname__}."
    return schema


def _sections() -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Config section -> (the class or function it configures, its arguments that are not config)."""
    from minisora.data.datamodule import VideoDataModule
    from minisora.data.latent_datamodule import LatentDataModule
    from minisora.models.autoencoder import VideoVAE
    from minisora.models.dit import VideoDiT
    from minisora.models.text import TextEncoder
    from minisora.training.lit_autoencoder import LitAutoencoder
    from minisora.training.lit_dit import LitVideoDiT
    from minisora.training.preview import PreviewSamples

    return {
        "data": (VideoDataModule, ("buckets", "geometry")),
        "vae": (VideoVAE, ()),
        "vae_train": (LitAutoencoder, ("vae",)),
        "text": (TextEncoder, ()),
        "model": (VideoDiT, ()),
        "latents": (LatentDataModule, ("video", "vae", "text_encoder")),
        "dit_train": (LitVideoDiT, ("model", "null_context", "null_mask", "text_encoder")),
        "sample": (PreviewSamples, ("vae", "text_encoder", "folder")),
    }


@lru_cache(maxsize=1)
def schema() -> type:
    """The top-level experiment schema."""
    fields: list[tuple[str, Any, Any]] = [
        ("name", str, field(default="shapes")),  # run folder: <run_dir>/<name>
        ("run_dir", str, field(default="runs")),
        ("seed", int, field(default=0)),  # every section's seed unless it sets its own
        ("vae_weights", str | None, field(default=None)),  # a trained autoencoder file; None: train one in the run
        ("init_from", str | None, field(default=None)),  # DiT weights to start a fine-tune from (weights only)
        ("trainer", TrainerConfig, field(default_factory=TrainerConfig)),
        ("vae_trainer", TrainerConfig, field(default_factory=TrainerConfig)),
    ]
    for section, (cls, skip) in _sections().items():
        sch = _section_schema(cls, skip)
        fields.append((section, sch, field(default_factory=sch)))
    from minisora.data.buckets import BucketSpec
    from minisora.data.shapes import make_shapes
    from minisora.eval.shapes import ShapesEval
    from minisora.models.lora import lora_settings

    # Native aspect ratios and durations in buckets (data/buckets.py); null: every clip at data's one size.
    fields.append(("buckets", _section_schema(BucketSpec) | None, field(default=None)))
    # Options of the synthetic dataset written next to data.path; null for real data.
    fields.append(("shapes", _section_schema(make_shapes, ("out", "force")) | None, field(default=None)))
    # The shapes demo's score during and after training (sampling settings from `sample`); null for other data.
    skip = ("vae", "text_encoder", "folder", "steps", "guidance", "sampler", "shift", "seed", "fps", "wrap")
    fields.append(("shapes_eval", _section_schema(ShapesEval, skip) | None, field(default=None)))
    # LoRA fine-tuning of the DiT (configs/finetune/lora.yaml); null trains every weight.
    fields.append(("lora", _section_schema(lora_settings) | None, field(default=None)))
    from minisora.models.diffusers_vae import import_pretrained_vae  # imports diffusers only when a model is built

    # A pretrained diffusers autoencoder instead of training one (configs/vae/ltx.yaml, wan.yaml, sd.yaml).
    fields.append(("pretrained_vae", _section_schema(import_pretrained_vae) | None, field(default=None)))
    from minisora.training.released_stage import load_pretrained

    # A released model's diffusers folder to fine-tune (configs/finetune/wan2.1-t2v-1.3b-lora.yaml, ...): its
    # transformer trains, its VAE and text encoder fill the latent cache; null trains minisora's own DiT.
    fields.append(("pretrained", _section_schema(load_pretrained) | None, field(default=None)))
    return dataclasses.make_dataclass("ExperimentConfig", fields)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)  # OmegaConf's loader is a yaml.SafeLoader: data only, no code
    except Exception as e:  # yaml.YAMLError and friends; the message carries line and column
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got a {type(cfg).__name__}")
    return cfg


def _explain(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(OmegaConf.structured(schema()), parent) if parent else OmegaConf.structured(schema())
        valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
        where = f" in '{parent}'" if parent else ""
        return ConfigError(f"{source}: unknown key '{key}'{where}; valid keys: {valid}")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {str(e).splitlines()[0]} (key '{key}')")


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        raise _explain(e, source) from None


# Keys that were renamed or moved: a config that still uses one gets an error naming the new key, not a silent default.
RENAMED = {
    "dit_train.schedule": "dit_train.lr_schedule",
    "sample.shapes_eval": "shapes_eval (a section: shapes_eval.samples_per_prompt, shapes_eval.every_n_steps; "
    "null switches the shapes score off)",
    "sample.samples_per_prompt": "shapes_eval.samples_per_prompt",
    "data.batch_size": "data.vae_batch_size (the autoencoder stage's batch)",
    "latents.batch_size": "latents.dit_batch_size (the DiT stage's batch)",
}


def _check_renamed(layer: DictConfig, source: str) -> None:
    for old, new in RENAMED.items():
        section, key = old.split(".")
        node = layer.get(section)
        if isinstance(node, DictConfig) and key in node:
            raise ConfigError(f"{source}: '{old}' was renamed; use {new}")


def _file_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[DictConfig, str]]:
    """A file's layers, lowest first: its `base:` files (each with its own bases, depth first), then the file."""
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: 'base' files form a cycle: {cycle}")
    layer = _read_yaml(path)
    bases = layer.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    layers: list[tuple[DictConfig, str]] = []
    for b in bases:
        bpath = (path.parent / b) if (path.parent / b).is_file() else CONFIG_ROOT / b
        if not bpath.is_file():
            raise ConfigError(f"{path}: base file {b!r} not found (looked in {path.parent} and {CONFIG_ROOT})")
        layers += _file_layers(bpath, (*chain, path.resolve()))
    _check_renamed(layer, str(path))
    return [*layers, (layer, str(path))]


def _layers(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> list[tuple[DictConfig, str]]:
    """The config layers above the schema, lowest first: `base:` files, the experiment file, each override."""
    layers = _file_layers(Path(path)) if path is not None else []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like key=value (e.g. trainer.max_steps=100)")
        key = item.split("=", 1)[0]
        try:
            layer = OmegaConf.from_dotlist([item])
        except Exception as e:  # OmegaConf's own errors and yaml's scanner errors (e.g. "a:b" inside {...})
            raise ConfigError(f"command line: cannot parse {item!r}: {str(e).splitlines()[0]}") from None
        _check_renamed(layer, f"command line ({key})")
        layers.append((layer, f"command line ({key})"))
    return layers


# Keys of a base run's config that describe that run, not the model a fine-tune continues.
NOT_INHERITED = ("name", "run_dir", "init_from", "shapes", "lora", "vae_weights")


def _migrate(config: dict) -> dict:
    """A stored run config with this version's key names: renamed keys moved, seeds the base derived dropped.

    Checkpoints written before a rename still fine-tune; a stage seed equal to the base's top-level seed was
    derived from it, so the fine-tune's own `seed` derives it again.
    """
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    dit, sample = config.get("dit_train") or {}, config.get("sample") or {}
    if "schedule" in dit:
        dit["lr_schedule"] = dit.pop("schedule")
    for section, new in (("data", "vae_batch_size"), ("latents", "dit_batch_size")):
        node = config.get(section)
        if isinstance(node, dict) and "batch_size" in node:
            node[new] = node.pop("batch_size")
    samples_per_prompt = sample.pop("samples_per_prompt", 1)
    if sample.pop("shapes_eval", False):
        config["shapes_eval"] = {"samples_per_prompt": samples_per_prompt, "every_n_steps": sample.get("every_n_steps", 0)}
    for node in config.values():
        if isinstance(node, dict) and node.get("seed") == config.get("seed"):
            node.pop("seed")
    return config


def finetune_base(init_from: str) -> tuple[DictConfig, str]:
    """The config layer a fine-tune starts from: the `init_from` checkpoint's own run config.

    Model, text encoder, autoencoder (its file), clip size, sampling and training settings continue
    from the base; the fine-tune's experiment file and command line change what they name.
    """
    from minisora.checkpoint import CheckpointError, load_checkpoint
    from minisora.released_pipeline import is_released

    if is_released(init_from):
        raise ConfigError(f"init_from: {init_from} is a released model (a diffusers folder or a run that fine-tuned "
                          "one); fine-tune it with configs/finetune/<model>-lora.yaml pretrained.path=<its folder>")
    try:
        ckpt = load_checkpoint(init_from)
    except CheckpointError as e:
        raise ConfigError(f"init_from: {e}") from None
    base = {k: v for k, v in _migrate(ckpt.config).items() if k not in NOT_INHERITED}
    base["vae_weights"] = str(ckpt.vae_path)  # the base's latent space: the DiT only works on it
    return OmegaConf.create(base), f"init_from {ckpt.source} (its run config)"


def _replacing(cfg: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """A command-line mapping replaces a mapping-valued key (buckets.resolutions={256px: [1, 17]}) instead of adding keys.

    OmegaConf merges mappings key by key, so the override would keep the file's other resolutions; on the
    command line a value means that value. Typed sections (model, data, ...) still merge.
    """
    if not source.startswith("command line ("):
        return layer
    key = source[len("command line (") : -1]
    value = OmegaConf.select(layer, key)
    node = OmegaConf.select(cfg, key)
    if isinstance(value, DictConfig) and isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
        OmegaConf.update(cfg, key, {}, merge=False)  # emptied in place; the merge then fills in the new mapping
    return layer


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load an experiment: schema defaults <- `base:` files <- `path` <- `key=value` overrides.

    With `init_from` set, the base checkpoint's run config goes in right above the schema defaults
    (finetune_base), so a fine-tune config only names what changes.
    """
    layers = _layers(path, overrides)
    cfg = OmegaConf.structured(schema())
    for layer, source in layers:
        cfg = _merge(cfg, _replacing(cfg, layer, source), source)
    if cfg.init_from and cfg.pretrained is not None:
        raise ConfigError(f"{path or 'config'}: init_from loads minisora DiT weights; a released model starts from "
                          "pretrained.path (to continue a released run, rerun it with the same name: it resumes)")
    if cfg.init_from:
        base = finetune_base(cfg.init_from)
        cfg = OmegaConf.structured(schema())
        for layer, source in [base, *layers]:
            cfg = _merge(cfg, _replacing(cfg, layer, source), source)
    for node in cfg.values():  # stage seeds not set in any layer follow the top-level seed
        if isinstance(node, DictConfig) and "seed" in node and node.seed is None:
            node.seed = cfg.seed
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{path or 'config'}: required keys not set: {', '.join(missing)}")
    if cfg.lora is not None and not cfg.init_from and cfg.pretrained is None:
        raise ConfigError(f"{path or 'config'}: lora: LoRA fine-tunes a trained model; set init_from=<base run, "
                          ".ckpt or exported folder> or pretrained.path=<diffusers folder>")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def kwargs(cfg_section: DictConfig) -> dict[str, Any]:
    """A section as plain constructor keyword arguments (lists as lists)."""
    out = OmegaConf.to_container(cfg_section, resolve=True)
    assert isinstance(out, dict)
    return out


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    """Write the fully resolved config (what the run actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def to_plain(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)
