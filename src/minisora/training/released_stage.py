"""Fine-tuning a released model (Wan2.1 T2V, Wan2.2 TI2V, LTX-Video) in minisora's own trainer.

A config with a `pretrained:` section (configs/finetune/wan2.1-t2v-1.3b-lora.yaml, ...) runs this stage instead of
VAE -> DiT: the released VAE and T5/umT5 encode the clips once into the latent cache (the VAE's own latent
normalisation, the pipeline's own prompt encoding), both are freed, and LitVideoDiT trains the released
transformer behind the same `model(x_t, t, **cond) -> v` callable as VideoDiT: LoRA (a `lora:` section) or every
weight (none). What it writes into runs/NAME: lora/pytorch_lora_weights.safetensors (diffusers' format, loads in
WanPipeline/LTXPipeline.load_lora_weights) or transformer/ (a full fine-tune, save_pretrained's layout); the
pipeline's from_pretrained("runs/NAME") puts either onto the base folder.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from minisora.config import ConfigError, kwargs, to_plain
from minisora.device import default_device
from minisora.files import partial_path
from minisora.models.released import LTX, ReleasedModel, dynamic_shift, load_released, ltx_mu
from minisora.training.run import build_trainer, last_checkpoint, precision, run_dir, say, video_data

QUANTIZE = (None, "int8")
DEFAULT_DATA = "data/shapes/manifest.csv"  # VideoDataModule's default path: a released run must name its clips


def load_pretrained(path: str, dtype: str = "float32", quantize: str | None = None,
                    gradient_checkpointing: bool = True, frame_rate: float = 25.0) -> ReleasedModel:  # fmt: skip
    """The `pretrained` section: the transformer of a diffusers folder (model_index.json, transformer/, vae/,
    text_encoder/, tokenizer/, scheduler/) loaded for training (its VAE and text encoder: load_encoders).

    dtype: weights (float32, bfloat16, auto = bfloat16 on a CUDA GPU). quantize "int8": the transformer blocks'
    Linear layers frozen in 8 bits (LoRA only; models/quantized.py). gradient_checkpointing: diffusers'
    enable_gradient_checkpointing (activations of each block recomputed in backward). frame_rate: LTX-Video's
    RoPE time scale.
    """
    if quantize not in QUANTIZE:
        raise ConfigError(f"pretrained.quantize must be null or 'int8', got {quantize!r}")
    from minisora.models.diffusers_folder import FolderError

    try:
        model = load_released(path, dtype=dtype, frame_rate=frame_rate, vae=False, text=False)
    except FolderError as e:  # a user error, one line from the CLI: named by its key
        raise ConfigError(f"pretrained.path: {e}") from None
    if quantize == "int8":
        from minisora.models.quantized import quantize_int8

        quantize_int8(model.denoiser.transformer)
    if gradient_checkpointing:
        model.denoiser.transformer.enable_gradient_checkpointing()
    return model


def load_encoders(cfg: DictConfig) -> ReleasedModel:
    """The VAE and text encoder of cfg.pretrained's folder, without the transformer: the cache is filled and they
    are freed before the transformer is loaded, so host memory never holds umT5-XXL (~11 GiB) and the DiT at once."""
    from minisora.models.diffusers_folder import FolderError

    p = cfg.pretrained
    try:
        return load_released(p.path, dtype=p.dtype, frame_rate=p.frame_rate, transformer=False)
    except FolderError as e:
        raise ConfigError(f"pretrained.path: {e}") from None


def check_config(cfg: DictConfig) -> None:
    """What a released-model run cannot do, named by key."""
    where = f"{cfg.name} (pretrained.path={cfg.pretrained.path})"
    if cfg.get("shapes") is None and cfg.data.path == DEFAULT_DATA:
        raise ConfigError(f"{where}: data.path is not set (still the shapes default {DEFAULT_DATA}); give your clips: "
                          "data.path=MANIFEST (a CSV of path,caption[,start,end]) or a folder")  # fmt: skip
    if cfg.dit_train.prediction != "v":
        raise ConfigError(f"{where}: dit_train.prediction={cfg.dit_train.prediction!r}; released models predict "
                          "velocity (v = noise - x0): set dit_train.prediction=v")  # fmt: skip
    if cfg.get("lora") is not None and cfg.lora.text_encoder:
        raise ConfigError(f"{where}: lora.text_encoder=true is for minisora's CLIP tower; the T5 embeddings of a "
                          "released model are cached and the encoder freed (set lora.text_encoder=false)")
    if cfg.get("lora") is None and cfg.pretrained.quantize:
        raise ConfigError(f"{where}: pretrained.quantize={cfg.pretrained.quantize} freezes the base in 8 bits; a full "
                          "fine-tune trains every weight: add a lora section or set pretrained.quantize=null")


def training_shift(model: ReleasedModel, tokens: int) -> float:
    """The timestep shift the model samples with: Wan's flow_shift (3 T2V, 5 TI2V); LTX-Video's dynamic shift at
    `tokens` (0.9.0/0.9.1) or its fixed shift. Training t then follows the sampler's emphasis (docs/finetuning.md)."""
    cfg = model.scheduler.config
    if model.info.family is LTX:
        return dynamic_shift(cfg, ltx_mu(cfg, tokens)) if cfg.get("use_dynamic_shifting") else cfg.get("shift", 1.0)
    return float(cfg.get("flow_shift") or cfg.get("shift", 1.0))


def released_latents(cfg: DictConfig, model: ReleasedModel):
    """The LatentDataModule of cfg.data encoded by the released VAE and text encoder."""
    from minisora.data.latent_datamodule import LatentDataModule

    video = video_data(cfg, model.vae, patch_size=model.patch_size)
    return LatentDataModule(video, model.vae, model.text, **kwargs(cfg.latents))


def encode_and_free(cfg: DictConfig, model: ReleasedModel, latents) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the cache (rank 0; other ranks find it complete), then drop the VAE and text encoder (umT5-XXL is
    ~11 GiB in bf16); returns the empty prompt's embedding and mask (1, L, D), (1, L) for caption dropout."""
    device = default_device()
    model.text.to(device)
    latents.key  # noqa: B018  (computed while the encoders exist; prepare_data in fit then finds the cache)
    null, null_mask = (x.cpu() for x in model.text.null_embedding())
    if rank_zero_only.rank == 0:
        latents.prepare_data()
    latents.vae = latents.text_encoder = model.vae = model.text = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    check_channels(cfg, model, latents)
    return null, null_mask


def check_channels(cfg: DictConfig, model: ReleasedModel, latents) -> None:
    """The cached latents must have the transformer's input channels."""
    import json

    index = latents.folder / "buckets.json"
    if not index.is_file():  # another rank is still encoding: Lightning's prepare_data barrier waits for it
        return
    want = int(model.info.configs["transformer"]["in_channels"])
    for bucket in json.loads(index.read_text())["buckets"]:
        shape = json.loads((latents.folder / bucket["name"] / "index.json").read_text())["latent_shape"]
        if shape[0] != want:
            raise ConfigError(f"{latents.folder / bucket['name'] / 'index.json'}: latents of {shape[0]} channels, but "
                              f"{cfg.pretrained.path}/transformer takes in_channels {want}: the cache was not made by "
                              "this model's VAE (delete it or change latents.cache_root)")  # fmt: skip


def _count(params: list[torch.Tensor]) -> str:
    return f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.2f} M values"


def prepare_denoiser(cfg: DictConfig, model: ReleasedModel) -> list[str]:
    """LoRA layers (a `lora` section) or every weight trainable; returns the load report's lines."""
    from minisora.models.lora_formats import add_released_lora

    denoiser, info = model.denoiser, model.info
    denoiser.train()  # load_released gives eval mode, which Lightning keeps (LoRA dropout would never act)
    loaded = list(denoiser.state_dict().values())
    lines = [f"pretrained {info.path} ({info.family.name}, {info.classes['transformer']}): loaded every transformer "
             f"tensor ({_count(loaded)}) from {info.path / 'transformer'}; none newly initialised"]  # fmt: skip
    if cfg.get("lora") is None:
        denoiser.requires_grad_(True)
        lines.append(f"full fine-tune: every weight trains ({_count(list(denoiser.parameters()))})")
        return lines
    s = cfg.lora
    targets = list(s.targets or ["self_attn", "cross_attn", "mlp"])
    add_released_lora(denoiser, s.rank, s.alpha, s.dropout, targets)
    new = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    for p in new:  # fp32 master weights (peft makes them bf16 on a bf16 base: small updates would round away)
        p.data = p.data.float()
    frozen = [p for p in denoiser.parameters() if not p.requires_grad]
    lines.append(f"LoRA rank {s.rank}, alpha {s.alpha:g} on {', '.join(targets)}: newly initialised {_count(new)} "
                 f"(lora_B = 0, so step 0 is the base model); base frozen ({_count(frozen)}"
                 f"{', int8' if cfg.pretrained.quantize else ''})")  # fmt: skip
    return lines


class FrozenBaseOut(L.Callback):
    """Checkpoints of a LoRA run hold the trainable tensors only: the frozen base (2.6 GiB for Wan 1.3B in bf16)
    is pretrained.path itself, loaded again on resume. Loading checks that every trainable tensor is there."""

    @staticmethod
    def _frozen(pl_module: L.LightningModule) -> set[str]:
        names = {n for n, p in pl_module.model.named_parameters() if not p.requires_grad}
        return {f"model.{n}" for n in names} | {f"ema.module.{n}" for n in names}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        frozen = self._frozen(pl_module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        frozen = self._frozen(pl_module)
        missing = [k for k in pl_module.state_dict() if k not in frozen and k not in checkpoint["state_dict"]]
        if missing:
            raise ValueError(f"checkpoint of a LoRA run lacks {len(missing)} trainable tensors (e.g. {missing[:3]}): "
                             "it was written for another LoRA configuration")  # fmt: skip


class SaveReleased(L.Callback):
    """Writes the (EMA) result where from_pretrained("runs/NAME") and diffusers find it: the LoRA as
    lora/pytorch_lora_weights.safetensors with every checkpoint and at the end, or a full fine-tune's transformer
    as transformer/ (diffusers' save_pretrained) at the end. Each file appears whole or not at all."""

    def __init__(self, folder: str | Path, source: str, lora: bool):
        self.folder, self.source, self.lora = Path(folder), source, lora

    def _write_lora(self, pl_module: L.LightningModule) -> Path:
        from minisora.models.lora_formats import DIFFUSERS_FILE, save_released_lora

        out = self.folder / "lora" / DIFFUSERS_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{os.getpid()}-{DIFFUSERS_FILE}")  # a .safetensors name: written as a file
        save_released_lora(tmp, pl_module.ema_model, source=self.source)
        os.replace(tmp, out)
        return out

    def _write_transformer(self, pl_module: L.LightningModule) -> Path:
        out = self.folder / "transformer"
        tmp = partial_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        pl_module.ema_model.transformer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.lora and trainer.is_global_zero:
            self._write_lora(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = self._write_lora(pl_module) if self.lora else self._write_transformer(pl_module)
        say(f"{'LoRA adapter' if self.lora else 'fine-tuned transformer'}: {out} (minisora sample --ckpt "
            f"{self.folder}; diffusers: {'load_lora_weights' if self.lora else 'from_pretrained'})")  # fmt: skip


def describe(cfg: DictConfig, model: ReleasedModel, lit, t_shift: float, latents) -> str:
    T, H, W = cfg.data.num_frames, cfg.data.height, cfg.data.width
    C, t, h, w = model.latent_shape(T, H, W)
    n = sum(p.numel() for p in model.denoiser.parameters())
    trainable = sum(p.numel() for p in model.denoiser.parameters() if p.requires_grad)
    dev = default_device()
    sizes: dict[torch.dtype, int] = {}
    for p in model.denoiser.parameters():  # diffusers keeps a few small modules in fp32: name the bulk's dtype
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    clip = f"clip 3x{T}x{H}x{W} -> latent {C}x{t}x{h}x{w} -> {model.denoiser.tokens(t, h, w)} tokens"
    if latents.video.spec is not None:  # sizes vary per batch: name the range (minisora data-stats lists them all)
        big, small = latents.video.buckets[0], latents.video.buckets[-1]
        clip = (f"{len(latents.video.buckets)} bucket sizes from {small.name} ({small.tokens} tokens) to {big.name} "
                f"({big.tokens} tokens)")  # fmt: skip
    return (f"{model.family}: {n / 1e6:.2f} M parameters ({trainable / 1e6:.3f} M trainable); {clip}; t "
            f"logit-normal({lit.t_mean:g}, {lit.t_std:g}) shifted by {t_shift:.3g}; device {dev}, precision {precision(cfg.trainer.precision)}, "
            f"weights mostly {max(sizes, key=sizes.get)}, optimizer {lit.optimizer_name}, EMA "
            f"{'off' if lit.ema is None else 'on'}; latent cache {latents.folder}")  # fmt: skip


def cache_released(cfg: DictConfig) -> Path:
    """`minisora cache` for a released model: encode the clips with its VAE and text encoder."""
    check_config(cfg)
    encoders = load_encoders(cfg)
    latents = released_latents(cfg, encoders)
    encode_and_free(cfg, encoders, latents)
    say(f"latent cache: {latents.folder}")
    return latents.folder


def train_released(cfg: DictConfig) -> Path:
    """Cache latents and text (once), then train (or resume) the released transformer; returns the run folder."""
    from minisora.training import finetune
    from minisora.training.lit_dit import LitVideoDiT

    check_config(cfg)
    folder = run_dir(cfg)
    L.seed_everything(cfg.seed, workers=True)
    encoders = load_encoders(cfg)
    latents = released_latents(cfg, encoders)
    null, null_mask = encode_and_free(cfg, encoders, latents)
    del encoders
    t0 = time.time()
    model = load_pretrained(**kwargs(cfg.pretrained))
    say(f"loaded {cfg.pretrained.path}/transformer in {time.time() - t0:.1f} s")
    resume = last_checkpoint(folder)
    report = prepare_denoiser(cfg, model)
    args: dict[str, Any] = kwargs(cfg.dit_train)
    _, t, h, w = model.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    if args["t_shift"] is None:  # the model's own sampling shift (training_shift), not minisora's token rule
        args["t_shift"] = training_shift(model, model.denoiser.tokens(t, h, w))
    lit = LitVideoDiT(model.denoiser, null_context=null[0], null_mask=null_mask[0], **args)
    lit.run_config = to_plain(cfg)
    lora = cfg.get("lora") is not None
    callbacks: list[L.Callback] = [SaveReleased(folder, str(cfg.pretrained.path), lora)]
    if lora:
        lit.strict_loading = False  # FrozenBaseOut: the base comes from pretrained.path, checked on load
        callbacks.append(FrozenBaseOut())
    say(describe(cfg, model, lit, args["t_shift"], latents))
    if resume:
        say(f"resuming from {resume}")
        callbacks.append(finetune.StartLoss(cfg.trainer.limit_val_batches))
    for line in report:
        say(line)
    if lit.frozen:
        say(f"frozen by dit_train.freeze: {len(lit.frozen)} tensors ({', '.join(lit.frozen[:4])}"
            f"{', ...' if len(lit.frozen) > 4 else ''})")  # fmt: skip
    blocks = getattr(model.denoiser.transformer, "blocks", None) or model.denoiser.transformer.transformer_blocks
    trainer = build_trainer(cfg.trainer, folder, callbacks, tag="dit", wrap={type(blocks[0])})
    t0 = time.time()
    trainer.fit(lit, datamodule=latents, ckpt_path=str(resume) if resume else None)
    say(f"{model.family} trained to step {trainer.global_step} in {time.time() - t0:.0f} s; checkpoints in "
        f"{folder / 'checkpoints'}")  # fmt: skip
    return folder
