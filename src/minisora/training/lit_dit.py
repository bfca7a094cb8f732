"""LitVideoDiT: wires VideoDiT, the rectified-flow objective, AdamW8bit, EMA and sample logging."""

from __future__ import annotations

import copy
import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from minisora import diffusion
from minisora.conditioning import check_conditioning, draw_known_frames, frame_timesteps
from minisora.models.dit import VideoDiT
from minisora.training import validation
from minisora.training.optim import check_optim, configure_optim
from minisora.training.strategy import ShardedStrategy

T_BUCKETS = 4  # the training loss is also logged per quarter of [0, 1] in t: where the model is weak shows there


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Stop training the parameters whose names match any regex in `patterns` (re.match); returns their names.

    Each pattern must match at least one parameter (a typo must not silently train everything).
    """
    frozen: list[str] = []
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        hits = [n for n in names if re.match(pattern, n)]
        if not hits:
            raise ValueError(
                f"dit_train.freeze: {pattern!r} matches no DiT parameter; names look like {', '.join(names[:6])}, ..."
            )
        frozen += [n for n in hits if n not in frozen]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


class LitVideoDiT(L.LightningModule):
    """Rectified-flow training of a VideoDiT on cached latents (batches from LatentDataModule)."""

    def __init__(
        self,
        model: VideoDiT,
        null_context: torch.Tensor | None = None,
        null_mask: torch.Tensor | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: list[float] | None = None,
        optimizer: str = "adamw8bit",
        warmup_steps: int = 100,
        lr_schedule: str = "constant",  # "constant" | "cosine"
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = 0.999,  # None: no EMA (a released base would be copied whole)
        caption_dropout: float = 0.1,
        prediction: str = "v",  # "v" | "x0" (x0 is converted to velocity; same loss)
        t_mean: float = 0.0,
        t_std: float = 1.0,
        t_shift: float | None = None,  # None: shift from the token count (resolution_shift)
        compile: bool = False,
        seed: int = 0,
        val_t_points: int = 4,  # validation timesteps per clip (training.validation); 4 = one per quarter of t
        max_bad_steps: int = 10,
        freeze: list[str] | None = None,
        text_encoder: torch.nn.Module | None = None,
        p_image: float = 0.0,  # steps' clips whose first latent frame is given clean (image-to-video)
        p_extend: float = 0.0,  # ... whose first k latent frames are (continuation; k in extend_frames); off here,
        # on in configs/shapes.yaml (0.1 / 0.2), whose text-to-video kept 1.00 with them (docs/conditioning.md)
        extend_frames: list[int] | None = None,  # [lo, hi] for k; default [2, 3]
    ):
        super().__init__()
        if prediction not in ("v", "x0"):
            raise ValueError(f"prediction must be 'v' or 'x0', got {prediction!r}")
        check_optim(optimizer, lr_schedule, warmup_steps, min_lr_ratio)
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.model = model
        self.frozen = freeze_parameters(model, freeze or [])
        # A text encoder here trains with the DiT (LoRA on its MLPs): captions are encoded at every step instead
        # of read from the latent cache. None: the cached embeddings are used.
        self.text_encoder = text_encoder
        # EMA in fp32 (the parameters stay fp32 under mixed precision); used for sampling and export. Under FSDP
        # it is sharded like the model (configure_model), so each rank averages its own shard.
        self.ema = None
        if ema_decay is not None:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self._unsharded: tuple[VideoDiT, ...] = ()  # under FSDP: the EMA's architecture on the meta device
        if model.condition == "text" and null_context is None:
            raise ValueError("a text-conditioned model needs null_context (the empty-prompt embedding) for caption dropout")
        self.register_buffer("null_context", null_context, persistent=False)  # (L, D)
        self.register_buffer("null_mask", null_mask, persistent=False)  # (L,)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, list(betas or [0.9, 0.99])
        self.optimizer_name, self.warmup_steps, self.lr_schedule, self.min_lr_ratio = optimizer, warmup_steps, lr_schedule, min_lr_ratio
        self.caption_dropout, self.prediction = caption_dropout, prediction
        self.t_mean, self.t_std, self.t_shift = t_mean, t_std, t_shift
        self.compile, self.seed = compile, seed
        validation.t_grid(val_t_points)  # checked now, not at the first validation
        self.val_t_points = val_t_points
        # Conditioning frames (conditioning.py): trained the way released models condition, so --image and
        # --extend-to give the model clean frames it has learnt to follow.
        self.p_image, self.p_extend = p_image, p_extend
        self.extend_frames = check_conditioning(p_image, p_extend, extend_frames or [2, 3])
        # Steps whose loss or gradient was not finite: skipped (no update); this many in a row stop the run.
        self.max_bad_steps, self.bad_steps, self.bad_in_a_row = max_bad_steps, 0, 0
        # Held outside the module tree (in a tuple) so checkpoints do not store the weights a second time.
        self._net = (torch.compile(model) if compile else model,)
        self.run_config: dict | None = None  # the resolved run config; saved into every checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints describe themselves: the resolved config travels with the weights."""
        if self.run_config is not None:
            checkpoint["minisora_config"] = self.run_config

    # ---- conditioning -------------------------------------------------------------------------
    def _cond(self, batch: dict[str, Any], drop: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Model keyword arguments for a batch; rows where `drop` is True get the null condition."""
        if self.model.condition == "text" and self.text_encoder is not None:
            keep = [True] * len(batch["caption"]) if drop is None else (~drop).tolist()
            context, mask = self.text_encoder([c if k else "" for c, k in zip(batch["caption"], keep)])
            return {"context": context, "context_mask": mask}  # (B, L, D), (B, L); "" is the null prompt
        if self.model.condition == "text":
            context, mask = batch["context"], batch["context_mask"]  # (B, L, D), (B, L)
            if drop is not None and drop.any():
                context = torch.where(drop[:, None, None], self.null_context.to(context.dtype), context)
                mask = torch.where(drop[:, None], self.null_mask, mask)
            return {"context": context, "context_mask": mask}
        if self.model.condition == "class":
            labels = batch["labels"]
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, self.model.num_classes), labels)
            return {"labels": labels}
        return {}

    def _shift(self, latents: torch.Tensor) -> float:
        if self.t_shift is not None:
            return self.t_shift
        _, _, T, H, W = latents.shape
        return diffusion.resolution_shift(self.model.tokens(T, H, W))

    # ---- steps ------------------------------------------------------------------------------
    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample rectified-flow training losses (B,) and their timesteps t (B,) for a batch."""
        x0 = batch["latents"]  # (B, C, T, H, W)
        B = x0.shape[0]
        # t, noise and caption dropout come from a generator seeded by (seed, step), not the global RNG, so a
        # resumed run draws exactly what an uninterrupted one would. Each of `world` ranks draws them for the whole
        # global batch and keeps rows rank::world, the rows its BucketBatchSampler share holds: W processes with batch
        # B train exactly like one with batch W*B. (Validation uses its own fixed grid: val_losses.)
        world, rank = (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)
        key = (self.seed, self.global_step)
        gen = torch.Generator(device=x0.device).manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)
        t = diffusion.sample_t(B * world, generator=gen, device=x0.device, mean=self.t_mean, std=self.t_std,
                               shift=self._shift(x0))[rank::world]  # (B,)
        noise = torch.randn((B * world, *x0.shape[1:]), generator=gen, device=x0.device, dtype=x0.dtype)[rank::world]
        drop = torch.rand(B * world, generator=gen, device=x0.device)[rank::world] < self.caption_dropout
        t_in, frames = t, None  # the first k latent frames clean (t = 0) and out of the loss (conditioning.py)
        T = x0.shape[2]
        k = draw_known_frames(gen, B * world, T, self.p_image, self.p_extend, self.extend_frames,
                              self.model.patch_size[0])[rank::world]  # (B,)
        if k.any():
            t_in, frames = frame_timesteps(t, k, T), frame_timesteps(torch.ones_like(t), k, T) > 0  # (B, T) each
        losses = diffusion.flow_loss(self.net, x0, t_in, noise, prediction=self.prediction, mask=frames,
                                     **self._cond(batch, drop))  # (B,)
        return losses, t

    def val_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """Losses (B, val_t_points) of a batch of held-out clips at the fixed t grid with fixed noise per clip."""
        return validation.grid_losses(self.net, batch["latents"], validation.clip_ids(batch), points=self.val_t_points,
                                      seed=self.seed, prediction=self.prediction, **self._cond(batch, None))  # fmt: skip

    def _shared_step(self, batch: dict[str, Any], stage: str, batch_idx: int) -> torch.Tensor:
        if stage == "val":  # every clip at every grid point; per quarter: q1 is t in [0, 1/4), nearly clean
            losses = self.val_losses(batch)  # (B, K)
            B = losses.shape[0]
            self.log("val/loss", losses.mean(), prog_bar=True, batch_size=B, sync_dist=True)
            for q, mean in enumerate(validation.quarter_means(losses), start=1):
                self.log(f"val/loss_q{q}", mean, batch_size=B, sync_dist=True)
            return losses.mean()
        losses, t = self._losses(batch)
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=losses.shape[0])
        bucket = (t * T_BUCKETS).long().clamp(max=T_BUCKETS - 1)
        for k in range(T_BUCKETS):
            sel = bucket == k
            if sel.any():
                self.log(f"train/loss_q{k + 1}", losses[sel].mean(), batch_size=int(sel.sum()))  # as val/loss_q*
        return loss

    @torch.no_grad()
    def evaluate_loss(self, loader, max_batches: int | None = None) -> float | None:
        """Mean validation loss over `loader` (the first max_batches), as validation computes it; None if empty."""
        was_training, total, count = self.training, 0.0, 0
        self.eval()
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = move_data_to_device(batch, self.device)
            losses = self.val_losses(batch).mean(1)  # (B,)
            total, count = total + float(losses.sum()), count + losses.shape[0]
        self.train(was_training)
        return total / count if count else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val", batch_idx)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Once per optimizer step (not per micro-batch), and before callbacks' on_train_batch_end, so a
        # step-N checkpoint holds the EMA of step N.
        if self.ema is not None and self._keeps_ema():
            self.ema.update_parameters(self.model)

    def _keeps_ema(self) -> bool:
        """Rank 0 alone keeps the EMA current (it writes checkpoints and samples); under FSDP each rank owns a shard."""
        if self._trainer is None or self.trainer.world_size == 1:
            return True
        return self.trainer.is_global_zero or isinstance(self.trainer.strategy, ShardedStrategy)

    # ---- FSDP -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under FSDP: shard the model and its EMA identically (DiT blocks, then the rest), so the EMA needs no traffic.

        fully_shard splits every tensor along its first dimension over the same ranks, so rank r holds the same
        rows of a model weight and of its average: AveragedModel's update runs on local shards, and each rank
        keeps 1/W of the EMA. Checked below, tensor by tensor. Lightning's FSDP1 flattened the two into different
        shards instead. Checkpoints gather both into one full state dict (ShardedStrategy).
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ShardedStrategy) or self._unsharded:
            return
        refused = [why for bad, why in (
            (self.optimizer_name == "adamw8bit", "dit_train.optimizer=adamw8bit (bitsandbytes has no sharded-tensor "
             "version; use dit_train.optimizer=adamw: FSDP already divides the optimizer state over the GPUs)"),
            (self.text_encoder is not None, "a text encoder trained with the DiT (lora.text_encoder)"),
            (self.compile, "dit_train.compile=true (torch.compile of sharded blocks is untested here)"),
            (self.ema is None, "dit_train.ema_decay=null (the sharded EMA is part of this strategy; set a decay)"),
            (bool(self.frozen) or not all(p.requires_grad for p in self.model.parameters()),
             "frozen DiT weights (lora, dit_train.freeze): fine-tunes that fit one GPU; use trainer.strategy=ddp"),
        ) if bad]  # fmt: skip
        if refused:
            raise ValueError(f"trainer.strategy=fsdp does not train {'; '.join(refused)}")
        self._unsharded = (copy.deepcopy(self.ema.module).to("meta"),)  # shapes only: what full_ema() fills
        strategy.shard(self.model)
        strategy.shard(self.ema.module)
        for (name, p), e in zip(self.model.named_parameters(), self.ema.module.parameters()):
            if (p.placements, p.to_local().shape) != (e.placements, e.to_local().shape):
                raise RuntimeError(f"FSDP sharded {name} and its EMA differently: {p.placements} {p.to_local().shape} "
                                   f"vs {e.placements} {e.to_local().shape}")  # fmt: skip

    def full_ema(self) -> VideoDiT | None:
        """The EMA network, whole, for sampling. Under FSDP a collective: every rank calls it, rank 0 gets the model."""
        if not self._unsharded:
            return self.ema_model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the CPU
        state = get_model_state_dict(self.ema.module, options=options)
        if not self.trainer.is_global_zero:
            return None
        model = copy.deepcopy(self._unsharded[0]).to_empty(device=self.device)
        model.load_state_dict(state)
        return model.eval()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm; skip the update when it is not finite (a NaN/inf loss gives NaN gradients).

        Runs after backward and before clipping and the optimizer step: clearing every gradient makes AdamW
        and AdamW8bit leave the weights and their state alone, so one bad batch costs one step, not the run.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.stack([g.detach().float().norm() for g in grads]).norm()
        if isinstance(norm, DTensor):  # FSDP: the norm over every rank's gradient shards
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(norm))
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank must take the same decision: a step skipped on one rank only would desynchronise them.
            finite = not self.trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if finite:
            self.bad_in_a_row = 0
            self.log("train/grad_norm", norm, prog_bar=False)
            return
        for p in self.parameters():
            p.grad = None
        self.bad_steps += 1
        self.bad_in_a_row += 1
        self.log("train/skipped_steps", float(self.bad_steps), prog_bar=False)
        step = self.trainer.global_step if self._trainer is not None else -1
        if self.bad_in_a_row >= self.max_bad_steps:
            ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") if self._trainer else ""
            raise RuntimeError(
                f"step {step}: the loss or gradients were not finite for {self.bad_in_a_row} steps in a row "
                f"(dit_train.max_bad_steps={self.max_bad_steps}); stopping. Last good checkpoint: "
                f"{ckpt or 'none written yet'}. Lower dit_train.lr, check the data, or resume from that checkpoint."
            )
        rank_zero_warn(f"step {step}: non-finite loss or gradient; step skipped ({self.bad_steps} so far)")

    def configure_optimizers(self):
        # Trainable only: LoRA adapters (DiT and text tower) or the blocks not frozen; never the EMA copy.
        params = [p for p in self.parameters() if p.requires_grad]
        return configure_optim(self, params, optimizer=self.optimizer_name, lr=self.lr, weight_decay=self.weight_decay,
                               betas=self.betas, warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
                               min_lr_ratio=self.min_lr_ratio)  # fmt: skip

    @property
    def net(self) -> torch.nn.Module:
        """The network the loss calls: the model, or its torch.compile wrapper."""
        return self._net[0]

    @property
    def ema_model(self) -> VideoDiT:
        """The EMA copy of the network (what sampling and export use); the network itself when there is no EMA."""
        return self.ema.module if self.ema is not None else self.model
