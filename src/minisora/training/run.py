"""Runs built from a config: train the VAE, cache latents, train the DiT, sample (and score, where the config
asks). `make train` calls run_pipeline."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from minisora.config import kwargs, save_config, to_plain
from minisora.files import file_lock, remove_stale_partials
from minisora.training.checkpoint_io import SafeCheckpointIO, StepCheckpoint
from minisora.training.strategy import build_strategy, uses_checkpoint_io

log = logging.getLogger("minisora")


def say(msg: str) -> None:
    """Progress a user needs to trust a run; printed (global rank 0 only) so it shows next to Lightning's output."""
    if rank_zero_only.rank == 0:
        print(f"[minisora] {msg}", flush=True)


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) / cfg.name


def precision(value: str) -> str:
    """'auto' = device.default_precision: bf16 autocast where the GPU supports it, else full fp32."""
    from minisora.device import default_precision

    return default_precision() if value == "auto" else value


def devices(value: str) -> Any:
    value = str(value)
    if value == "auto":
        return "auto"
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return int(value)


def build_trainer(
    tcfg: DictConfig, folder: Path, callbacks: list, tag: str, wrap: set[type] | None = None, find_unused: bool = False
) -> L.Trainer:
    """A Lightning Trainer from a `trainer` section: its strategy, TensorBoard logs, checkpoints every
    `checkpoint_every` steps and at the last step (+ last.ckpt).

    `wrap` and `find_unused` go to build_strategy (FSDP's wrap units; DDP with parameters a step may not use).
    Checkpoints go through SafeCheckpointIO (atomic writes, free-space check, weights_only loads).
    """
    section = tcfg._key() or "trainer"  # "trainer" or "vae_trainer", for error messages
    strategy = build_strategy(tcfg.strategy, to_plain(tcfg.strategy_options), wrap, find_unused, section)
    ckpt = StepCheckpoint(
        dirpath=folder / "checkpoints",
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=tcfg.checkpoint_every,
        save_last=True,
        save_top_k=2,
        monitor="step",
        mode="max",
        # Lightning defers a monitored save at an epoch's last batch to the validation it expects next; with
        # step-based validation none follows, and runs of short epochs lost their checkpoints. Saving in the
        # train loop (every_n_epochs stays 0, so no extra epoch-end saves) keeps every_n_train_steps exact.
        save_on_train_epoch_end=True,
        # A resumed run writes last.ckpt, not last-v1.ckpt beside it, also when its folder moved (Lightning then
        # forgets which file it wrote last and versions the name).
        enable_version_counter=False,
    )
    return L.Trainer(
        max_steps=tcfg.max_steps,
        accelerator=tcfg.accelerator,
        devices=devices(tcfg.devices),
        num_nodes=tcfg.num_nodes,
        strategy=strategy,
        plugins=[SafeCheckpointIO()] if uses_checkpoint_io(strategy) else None,
        precision=precision(tcfg.precision),
        accumulate_grad_batches=tcfg.accumulate_grad_batches,
        gradient_clip_val=tcfg.gradient_clip_val,
        log_every_n_steps=tcfg.log_every_n_steps,
        val_check_interval=tcfg.val_check_interval,
        check_val_every_n_epoch=None if tcfg.val_check_interval else 1,
        limit_val_batches=tcfg.limit_val_batches,
        deterministic=tcfg.deterministic,
        enable_progress_bar=tcfg.enable_progress_bar,
        logger=TensorBoardLogger(save_dir=str(folder), name="logs", version=tag),
        callbacks=[ckpt, LearningRateMonitor(logging_interval="step"), *callbacks],
        default_root_dir=str(folder),
    )


def last_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a rerun resumes from: checkpoint.newest_checkpoint of <folder>/checkpoints.

    Partial files of a writer killed mid-save are deleted first (the complete files they were to replace are
    still there); sampling and export only read, so this cleanup is resume's alone.
    """
    from minisora.checkpoint import newest_checkpoint

    ckpts = folder / "checkpoints"
    for p in remove_stale_partials(ckpts):
        say(f"removed {p}: a checkpoint write that did not finish (the run was killed while saving)")
    return newest_checkpoint(ckpts) if ckpts.is_dir() else None


# ---- data ------------------------------------------------------------------------------------
def ensure_data(cfg: DictConfig) -> None:
    """Generate the dataset when the config asks for one (`shapes`: the demo's) and it is missing or stale."""
    if cfg.get("shapes") is None:
        return
    from minisora.data.shapes import make_shapes

    out = Path(cfg.data.path).parent
    t0 = time.time()
    with file_lock(out / ".make_shapes.lock"):
        manifest = make_shapes(out, **kwargs(cfg.shapes))
    say(f"shapes dataset: {manifest} ({time.time() - t0:.1f} s)")


def video_data(cfg: DictConfig, vae, patch_size: tuple[int, ...] | None = None):
    """The VideoDataModule of cfg.data; with a `buckets` section, bucketed for this autoencoder and DiT patch
    (patch_size: a released transformer's; default cfg.model.patch_size)."""
    from minisora.data.datamodule import VideoDataModule

    if cfg.get("buckets") is None:
        return VideoDataModule(**kwargs(cfg.data))
    from minisora.data.buckets import BucketSpec, Geometry

    geometry = Geometry.of(vae, patch_size or cfg.model.patch_size)
    return VideoDataModule(**kwargs(cfg.data), buckets=BucketSpec(**kwargs(cfg.buckets)), geometry=geometry)


# ---- autoencoder -----------------------------------------------------------------------------
def vae_path(cfg: DictConfig) -> Path:
    return Path(cfg.vae_weights) if cfg.get("vae_weights") else run_dir(cfg) / "vae" / "vae.safetensors"


def train_vae(cfg: DictConfig) -> Path:
    """Train (or resume) the autoencoder of `cfg`, estimate its latent statistics, save it as safetensors."""
    from minisora.models.autoencoder import VideoVAE
    from minisora.training.callbacks import SkippedFilesLogger
    from minisora.training.lit_autoencoder import LitAutoencoder

    if cfg.get("pretrained_vae") is not None:
        from minisora.config import ConfigError

        raise ConfigError(f"pretrained_vae is set ({cfg.pretrained_vae.kind}: {cfg.pretrained_vae.path}): that autoencoder "
                          "is imported, not trained; run `minisora import-vae --config <this config>` instead")
    L.seed_everything(cfg.seed, workers=True)
    ensure_data(cfg)
    folder = run_dir(cfg) / "vae"
    if rank_zero_only.rank == 0:
        save_config(cfg, folder / "config.yaml")
    vae = VideoVAE(**kwargs(cfg.vae))
    lit = LitAutoencoder(vae, **kwargs(cfg.vae_train))
    data = video_data(cfg, vae)
    n_params = sum(p.numel() for p in vae.parameters())
    C, t, h, w = vae.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    ratio = 3 * cfg.data.num_frames * cfg.data.height * cfg.data.width / (C * t * h * w)
    say(
        f"VAE: {n_params / 1e6:.2f} M parameters; clip 3x{cfg.data.num_frames}x{cfg.data.height}x{cfg.data.width} "
        f"-> latent {C}x{t}x{h}x{w} ({ratio:.1f}x fewer values); run folder {folder}"
    )
    # A GAN discriminator sits unused until disc_start: DDP must be told to expect that.
    trainer = build_trainer(cfg.vae_trainer, folder, [SkippedFilesLogger()], tag="vae",
                            find_unused=lit.discriminator is not None)  # fmt: skip
    resume = last_checkpoint(folder)
    if resume:
        say(f"resuming the VAE from {resume}")
    t0 = time.time()
    trainer.fit(lit, datamodule=data, ckpt_path=str(resume) if resume else None)
    say(f"VAE trained in {time.time() - t0:.0f} s")
    # LitAutoencoder.on_train_end has stored the latent shift/scale in the VAE's buffers.
    out = vae_path(cfg) if not cfg.get("vae_weights") else folder / "vae.safetensors"
    if trainer.is_global_zero:
        vae.save_pretrained(out)
    trainer.strategy.barrier("vae saved")  # the other ranks load it next
    say(f"VAE saved to {out} (latent shift {vae.shift.mean():.3f}, scale {vae.scale.mean():.3f} on average)")
    return out


def vae_stats(cfg: DictConfig, path: str | None = None, batches: int | None = None) -> Path:
    """Re-estimate an autoencoder's latent shift/scale on cfg.data's training clips and save them in place.

    What `minisora vae-stats` runs: after fine-tuning a VAE elsewhere, or to re-measure on new data. Latent
    caches are keyed by the VAE's weights (stats included), so they are rebuilt on the next `cache`/`train`.
    """
    from minisora.models.autoencoder import load_autoencoder, save_autoencoder
    from minisora.training.lit_autoencoder import estimate_latent_stats

    target = Path(path) if path else vae_path(cfg)
    vae = load_autoencoder(target)
    data = video_data(cfg, vae)
    data.setup("fit")
    n = batches or cfg.vae_train.latent_stats_batches
    t0 = time.time()
    shift, scale = estimate_latent_stats(vae, data.train_dataloader(), n)
    save_autoencoder(vae, target)
    say(
        f"latent stats of {target} over {n} batches of {cfg.data.path} ({time.time() - t0:.0f} s): "
        f"shift {[round(v, 3) for v in shift.tolist()]}, scale {[round(v, 3) for v in scale.tolist()]}"
    )
    return target


def load_or_train_vae(cfg: DictConfig):
    from minisora.models.autoencoder import load_autoencoder

    path = vae_path(cfg)
    if not path.is_file() and cfg.get("pretrained_vae") is not None:
        # Imported once into a normal autoencoder file: cache keys, checkpoints, export and sampling see no difference.
        from minisora.models.diffusers_vae import save_pretrained_vae

        say(f"no autoencoder at {path}: importing {cfg.pretrained_vae.kind} from {cfg.pretrained_vae.path}")
        save_pretrained_vae(path, **kwargs(cfg.pretrained_vae))
    if not path.is_file():
        if cfg.get("vae_weights"):
            raise FileNotFoundError(f"vae_weights: {path} does not exist")
        say(f"no autoencoder at {path}: training one first")
        path = train_vae(cfg)
    vae = load_autoencoder(path)
    say(f"autoencoder: {path}")
    return vae


# ---- diffusion transformer -------------------------------------------------------------------
def build_dit(cfg: DictConfig, latent_channels: int, text_dim: int):
    """VideoDiT from cfg.model; input channels and text width come from the autoencoder and text encoder."""
    from minisora.models.dit import VideoDiT

    args = kwargs(cfg.model)
    for key, value in (("in_channels", latent_channels), ("text_dim", text_dim)):
        if args.get(key) != value:
            say(f"model.{key} = {value} (from the {'autoencoder' if key == 'in_channels' else 'text encoder'})")
            args[key] = value
    return VideoDiT(**args)


def describe_dit(cfg: DictConfig, model, vae, lit, buckets: list | None = None) -> str:
    T, H, W = cfg.data.num_frames, cfg.data.height, cfg.data.width
    C, t, h, w = vae.latent_shape(T, H, W)
    tokens = model.tokens(t, h, w)
    pt, ph, pw = model.patch_size
    from minisora.device import default_device

    dev = default_device()
    clip = f"clip 3x{T}x{H}x{W} -> latent {C}x{t}x{h}x{w} -> {tokens} tokens"
    if buckets:  # sizes vary per batch: name the range (minisora data-stats lists them all)
        big, small = buckets[0], buckets[-1]
        clip = (f"{len(buckets)} bucket sizes from {small.name} ({small.tokens} tokens) to {big.name} "
                f"({big.tokens} tokens)")  # fmt: skip
    return (
        f"DiT: {model.num_parameters() / 1e6:.2f} M parameters ({model.layout} attention, {len(model.blocks)} blocks, "
        f"width {model.hidden_size}); {clip} of {C * pt * ph * pw} values; device {dev}, precision "
        f"{precision(cfg.trainer.precision)}, optimizer {lit.optimizer_name}, prediction {lit.prediction}"
    )


def cache_latents(cfg: DictConfig) -> Path:
    """Encode the dataset once into the latent cache (what `minisora cache` runs); returns its folder."""
    from minisora.data.latent_datamodule import LatentDataModule
    from minisora.models.text import TextEncoder

    ensure_data(cfg)
    if cfg.get("pretrained") is not None:  # a released model: its own VAE and T5 (training/released_stage.py)
        from minisora.training.released_stage import cache_released

        return cache_released(cfg)
    vae = load_or_train_vae(cfg)
    latents = LatentDataModule(video_data(cfg, vae), vae, TextEncoder(**kwargs(cfg.text)), **kwargs(cfg.latents))
    latents.prepare_data()
    say(f"latent cache: {latents.folder}")
    return latents.folder


def train_dit(cfg: DictConfig, vae) -> Path:
    """Cache latents (once) and train (or resume) the DiT; returns the run folder."""
    from minisora.data.latent_datamodule import LatentDataModule
    from minisora.models.text import TextEncoder
    from minisora.models.dit import DiTBlock
    from minisora.training import finetune
    from minisora.training.lit_dit import LitVideoDiT
    from minisora.training.preview import PreviewSamples
    from minisora.training.validation import best_checkpoint_callback

    folder = run_dir(cfg)
    L.seed_everything(cfg.seed, workers=True)
    text = TextEncoder(**kwargs(cfg.text))
    latents = LatentDataModule(video_data(cfg, vae), vae, text, **kwargs(cfg.latents))
    model = build_dit(cfg, vae.latent_channels, text.dim)
    resume = last_checkpoint(folder)
    latents.key  # noqa: B018  (fixed now: LoRA layers added to the text tower below must not change the cache key)
    null, null_mask = text.null_embedding()
    # Before LitVideoDiT: its EMA starts from the loaded (and LoRA-wrapped) weights.
    report, adapter = finetune.prepare(cfg, model, text, resumed=resume is not None)
    live_text = text if cfg.get("lora") and cfg.lora.text_encoder else None
    lit = LitVideoDiT(model, null_context=null[0], null_mask=null_mask[0], text_encoder=live_text, **kwargs(cfg.dit_train))
    lit.run_config = to_plain(cfg)
    say(describe_dit(cfg, model, vae, lit, latents.video.buckets if latents.video.spec is not None else None))
    if resume:
        say(f"resuming from {resume}")
    for line in report:
        say(line)
    if lit.frozen:
        say(f"frozen by dit_train.freeze: {len(lit.frozen)} tensors ({', '.join(lit.frozen[:4])}{', ...' if len(lit.frozen) > 4 else ''})")
    callbacks = [PreviewSamples(vae=vae, text_encoder=text, folder=folder / "samples", **kwargs(cfg.sample)),
                 best_checkpoint_callback(folder)]  # checkpoints/best.ckpt: lowest val/loss (`sample --best`)
    if cfg.get("shapes_eval") is not None:  # the demo's score (configs/shapes.yaml), sampled as `sample` says
        from minisora.eval.shapes import ShapesEval

        sampling = {k: cfg.sample[k] for k in ("steps", "guidance", "sampler", "shift", "seed", "fps")}
        wrap = bool(cfg.shapes.wrap) if cfg.get("shapes") is not None else False  # scored as the data was made
        callbacks.append(ShapesEval(vae=vae, text_encoder=text, folder=folder / "samples", **sampling, wrap=wrap,
                                    **kwargs(cfg.shapes_eval)))  # fmt: skip
    if resume or cfg.get("init_from"):
        callbacks.append(finetune.StartLoss(cfg.trainer.limit_val_batches))
    if adapter:
        callbacks.append(finetune.SaveLoraAdapter(folder / "lora" / "adapter.safetensors", **adapter))
    trainer = build_trainer(cfg.trainer, folder, callbacks, tag="dit", wrap={DiTBlock})
    t0 = time.time()
    trainer.fit(lit, datamodule=latents, ckpt_path=str(resume) if resume else None)
    say(f"DiT trained to step {trainer.global_step} in {time.time() - t0:.0f} s; checkpoints in {folder / 'checkpoints'}")
    say(f"samples: {folder / 'samples'}")
    if adapter:
        say(f"LoRA adapter: {folder / 'lora' / 'adapter.safetensors'} (minisora sample --ckpt <base> --lora <it>)")
    for callback in callbacks:  # evaluators' final scores: the last lines a user reads
        if getattr(callback, "summary", None):
            say(callback.summary)
    return folder


def run_pipeline(cfg: DictConfig) -> None:
    """The whole run: data -> VAE -> latent cache -> DiT -> samples (+ the config's evaluators)."""
    t0 = time.time()
    folder = run_dir(cfg)
    if rank_zero_only.rank == 0:
        save_config(cfg, folder / "config.yaml")
    say(f"run folder: {folder} (resolved config in {folder / 'config.yaml'})")
    ensure_data(cfg)
    if cfg.get("pretrained") is not None:  # fine-tune a released model (training/released_stage.py)
        from minisora.training.released_stage import train_released

        train_released(cfg)
    else:
        train_dit(cfg, load_or_train_vae(cfg))
    say(f"pipeline finished in {time.time() - t0:.0f} s; TensorBoard: tensorboard --logdir {folder / 'logs'}")
