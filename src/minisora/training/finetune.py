"""Fine-tuning a DiT: weights from `init_from`, LoRA adapters, and proof at the start that the weights took.

Users of video-diffusion repos lose days to checkpoints that silently did not load. So every fine-tuned or
resumed run says which tensors it loaded and which are new, and measures the validation loss of the
loaded model before the first step (StartLoss): a base that took scores near its own final loss, a
model that did not scores like an untrained one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from minisora.config import kwargs, to_plain
from minisora.files import partial_path
from minisora.models import lora as lora_lib


def _count(tensors: list[torch.Tensor]) -> str:
    return f"{len(tensors)} tensors, {sum(t.numel() for t in tensors) / 1e6:.2f} M values"


def prepare(cfg: DictConfig, model: torch.nn.Module, text: torch.nn.Module, resumed: bool) -> tuple[list[str], dict | None]:
    """Load `init_from` into `model` and add LoRA layers as `cfg` asks; returns (report lines, adapter base info).

    On a resumed run the checkpoint then restores everything; LoRA layers are still added so its LoRA
    tensors have somewhere to go.
    """
    from minisora.checkpoint import load_dit_weights

    lines: list[str] = []
    base = None
    if cfg.get("init_from") and (not resumed or cfg.get("lora")):
        # A resumed run's checkpoint overwrites these weights; a LoRA run still reads them, as the adapter's base.
        info = load_dit_weights(cfg.init_from, model)  # strict: a mismatch raises, naming the tensors
        if not resumed:
            loaded = list(model.state_dict().values())
            lines.append(
                f"init_from {info['source']} ({info.get('weights', 'weights')} weights, step {info.get('step')}): "
                f"loaded every DiT tensor ({_count(loaded)}); none newly initialised; the EMA starts from them"
            )
    if cfg.get("lora"):
        settings = lora_lib.lora_settings(**kwargs(cfg.lora))
        model_args = {**to_plain(cfg.model), "in_channels": model.in_channels}
        if model.condition == "text":
            model_args["text_dim"] = text.dim
        base = {"settings": settings, "identity": lora_lib.base_identity(model, model_args, str(cfg.get("init_from")))}
        lora_lib.add_lora(model, settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
        new = [p for n, p in model.named_parameters() if "lora_" in n]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        lines.append(
            f"LoRA rank {settings['rank']}, alpha {settings['alpha']:g} on {', '.join(settings['targets'])}: "
            f"newly initialised {_count(new)} (lora_B = 0, so step 0 is the base model); base frozen ({_count(frozen)})"
        )
        if settings["text_encoder"]:
            lora_lib.add_lora(text, settings["rank"], settings["alpha"], settings["dropout"], [lora_lib.TEXT_TARGETS],
                              where="text encoder")  # fmt: skip
            new_text = [p for n, p in text.named_parameters() if "lora_" in n]
            lines.append(f"LoRA on the text encoder's MLPs: {_count(new_text)}; captions are encoded at every step")
    if resumed:
        lines.append("resumed: every tensor, the optimizer state, EMA, LR schedule and data position come from the checkpoint")
    return lines, base


class StartLoss(L.Callback):
    """Before the first step of a resumed or fine-tuned run: the validation loss of the weights as loaded.

    Logged as `val/loss_at_start` and printed next to the load report.
    """

    def __init__(self, max_batches: int | None = 8):
        self.max_batches = max_batches
        self.loss: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else []
        self.loss = pl_module.evaluate_loss(loader, self.max_batches) if loader else None
        step = trainer.global_step
        if trainer.is_global_zero:
            print(
                f"[minisora] validation loss of the loaded weights before step {step + 1}: {self.loss:.4f} "
                f"(a base that loaded scores near its own last val/loss on similar clips; one that did not, like an untrained model)"
                if self.loss is not None else "[minisora] no validation split: no loss of the loaded weights to report",
                flush=True,
            )
        if self.loss is None:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics({"val/loss_at_start": self.loss}, step=step)


class SaveLoraAdapter(L.Callback):
    """Writes the EMA DiT's LoRA tensors (and the text tower's) to `path` with every checkpoint and at the end."""

    def __init__(self, path: str | Path, settings: dict[str, Any], identity: dict[str, str]):
        self.path, self.settings, self.identity = Path(path), settings, identity

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        tmp = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = getattr(pl_module, "text_encoder", None)
        meta = {**self.identity, "step": trainer.global_step}
        lora_lib.save_adapter(tmp, pl_module.ema_model, self.settings, meta, text=text)
        os.replace(tmp, self.path)  # atomic: a reader never sees half an adapter

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)
