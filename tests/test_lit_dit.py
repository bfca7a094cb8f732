"""LitVideoDiT on a tiny synthetic latent cache: loss falls, EMA, caption dropout, optimizer, schedule, resume, bf16."""

from __future__ import annotations

import math
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minisora import diffusion
from minisora.data.datamodule import VideoDataModule
from minisora.data.latent_datamodule import LatentDataModule
from minisora.data.latents import build_cache, write_cache_index
from minisora.models.dit import VideoDiT
from minisora.models.text import TextEncoder
from minisora.training.lit_dit import LitVideoDiT
from minisora.training.optim import build_optimizer, lr_lambda

CAPTIONS = ("a red pattern", "a blue pattern")
LATENT = (4, 5, 8, 8)  # (C, t, h, w): 5 * 4 * 4 = 80 tokens with patch 1x2x2


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder(model_name="tiny", width=32, layers=1, heads=1, context_length=16)


class Identity(torch.nn.Module):
    """Stands in for the autoencoder: the synthetic "videos" already are latents."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


# One fixed latent per caption: a constant per channel, so a 2-block model can learn it within 40 steps.
PATTERNS = (torch.tensor([1.5, -1.0, 0.5, 1.0]), torch.tensor([-1.5, 1.0, -0.5, 1.0]))


def synthetic_cache(root: Path, text: TextEncoder, n: int) -> str:
    """A latent cache of n items alternating between the two captions and their latents."""
    latents = [p[:, None, None, None].expand(LATENT) for p in PATTERNS]  # 2 x (C, t, h, w)
    batch = {
        "video": torch.stack([latents[i % 2] for i in range(n)]),  # (n, C, t, h, w)
        "caption": [CAPTIONS[i % 2] for i in range(n)],
        "label": [i % 2 for i in range(n)],
    }
    key = f"synthetic-{n}"
    [bucket] = VIDEO.buckets
    build_cache([batch], Identity(), text, root / key / bucket.name, key=key)
    write_cache_index(root / key, key, [(bucket, n)])
    return key


VIDEO = VideoDataModule(num_frames=17, height=32, width=32)  # one size, whose latents LATENT stands in for


def datamodule(root: Path, key: str, batch_size: int) -> LatentDataModule:
    """The real LatentDataModule over a prebuilt cache: with the key preset, prepare_data finds it complete."""
    dm = LatentDataModule(video=VIDEO, vae=None, text_encoder=None, cache_root=str(root), dit_batch_size=batch_size,
                          num_workers=0, val_fraction=0.0)  # fmt: skip
    dm._key = key
    return dm


def tiny_lit(text: TextEncoder, **kw) -> LitVideoDiT:
    model = VideoDiT(in_channels=LATENT[0], hidden_size=32, depth=2, num_heads=2, text_dim=text.dim)
    null, null_mask = text.null_embedding()  # (1, L, D), (1, L)
    # adamw: bitsandbytes' CPU AdamW8bit took 3x longer per step here (0.31 vs 0.10 s); the resume test uses it.
    args = dict(lr=3e-3, warmup_steps=1, ema_decay=0.9, prediction="v", t_shift=1.0, optimizer="adamw")
    return LitVideoDiT(model, null_context=null[0], null_mask=null_mask[0], **{**args, **kw})


class Recorder(L.Callback):
    """Per-step training loss and the step it belongs to."""

    def __init__(self):
        self.losses: list[float] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.steps.append(trainer.global_step)


def trainer(max_steps: int, callbacks: list, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, max_steps=max_steps, num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(**{**args, **kw}, callbacks=callbacks)


@torch.no_grad()
def fixed_loss(lit: LitVideoDiT, text: TextEncoder) -> float:
    """The flow loss of both captions at fixed timesteps and noise: comparable before and after training."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.stack([p[:, None, None, None].expand(LATENT) for p in PATTERNS]).repeat(8, 1, 1, 1, 1)  # (16, C, ...)
    t = torch.linspace(0.05, 0.95, 16)  # (16,)
    noise = torch.randn(x0.shape, generator=g)
    context, mask = text(list(CAPTIONS) * 8)  # (16, L, D), (16, L)
    lit.model.eval()
    loss = diffusion.flow_loss(lit.model, x0, t, noise, context=context, context_mask=mask).mean()
    lit.model.train()
    return loss.item()


def test_loss_falls_on_a_fixed_synthetic_dataset(text, tmp_path):
    L.seed_everything(0, verbose=False)
    key = synthetic_cache(tmp_path, text, n=8)
    lit = tiny_lit(text, lr=1e-2, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    before = fixed_loss(lit, text)
    rec = Recorder()
    trainer(40, [rec]).fit(lit, datamodule=datamodule(tmp_path, key, batch_size=8))
    assert rec.steps == list(range(1, 41))
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    # At init the output is zero, so the loss is E|noise - x0|^2 = 1 + E[x0^2] ~ 2.1.
    assert 1.6 < first < 2.6 and 1.8 < before < 2.4, (rec.losses, before)
    assert last < 0.5 * first, rec.losses
    assert fixed_loss(lit, text) < 0.5 * before
    assert type(lit.optimizers().optimizer) is torch.optim.AdamW
    # The scheduler stepped once per training step: lr = lr0 * lr_lambda(40) = lr0 * min_lr_ratio.
    assert lit.optimizers().param_groups[0]["lr"] == pytest.approx(1e-2 * lr_lambda(10, "cosine", 40, 0.1)(40))
    assert lit.optimizers().param_groups[0]["lr"] == pytest.approx(1e-3)


class Snapshots(L.Callback):
    """(EMA, model) parameters as they stand after each optimizer step (taken before the next batch and at the end)."""

    def __init__(self):
        self.taken: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def _take(self, pl_module) -> None:
        clone = lambda ps: [p.detach().clone() for p in ps]  # noqa: E731
        self.taken.append((clone(pl_module.ema_model.parameters()), clone(pl_module.model.parameters())))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step > 0:
            self._take(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._take(pl_module)


def test_ema_follows_the_model_with_its_decay(text, tmp_path):
    L.seed_everything(0, verbose=False)
    key = synthetic_cache(tmp_path, text, n=8)
    lit = tiny_lit(text, ema_decay=0.8, lr=1e-2)
    assert lit.ema_model is lit.ema.module and isinstance(lit.ema_model, VideoDiT)
    assert all(not p.requires_grad for p in lit.ema.parameters())
    start = [p.detach().clone() for p in lit.model.parameters()]
    snaps = Snapshots()
    trainer(6, [snaps]).fit(lit, datamodule=datamodule(tmp_path, key, batch_size=4))
    assert len(snaps.taken) == 6 and int(lit.ema.n_averaged) == 6

    # The first update copies the model; then ema_k = d * ema_(k-1) + (1 - d) * model_k.
    ema, model = snaps.taken[0]
    assert all(torch.equal(e, p) for e, p in zip(ema, model))
    for (prev, _), (ema, model) in zip(snaps.taken, snaps.taken[1:]):
        for e0, e, p in zip(prev, ema, model):
            torch.testing.assert_close(e, 0.8 * e0 + 0.2 * p, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(e, p) for e, p in zip(ema, lit.ema_model.parameters()))  # what ema_model returns

    # The EMA lags behind the model but has moved from the start towards it.
    final = list(lit.model.parameters())
    lag = sum((e - p).norm() ** 2 for e, p in zip(ema, final)).sqrt()
    travel = sum((s - p).norm() ** 2 for s, p in zip(start, final)).sqrt()
    assert 0 < lag < travel


def test_ema_updates_once_per_optimizer_step(text, tmp_path):
    L.seed_everything(0, verbose=False)
    key = synthetic_cache(tmp_path, text, n=8)
    lit = tiny_lit(text)
    t = trainer(2, [], accumulate_grad_batches=2)
    t.fit(lit, datamodule=datamodule(tmp_path, key, batch_size=2))
    assert t.global_step == 2
    assert int(lit.ema.n_averaged) == 2


def test_cond_replaces_dropped_rows_with_the_null_condition(text):
    lit = tiny_lit(text)
    emb, mask = text(["a red pattern", "a blue pattern"])  # (2, L, D), (2, L)
    batch = {"context": emb, "context_mask": mask}
    cond = lit._cond(batch, torch.tensor([True, False]))
    assert torch.equal(cond["context"][0], lit.null_context) and torch.equal(cond["context_mask"][0], lit.null_mask)
    assert torch.equal(cond["context"][1], emb[1]) and torch.equal(cond["context_mask"][1], mask[1])
    assert torch.equal(lit._cond(batch, None)["context"], emb)
    assert torch.equal(lit._cond(batch, torch.tensor([False, False]))["context"], emb)

    model = VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, condition="class", num_classes=5)
    lit = LitVideoDiT(model)
    labels = lit._cond({"labels": torch.tensor([1, 2, 3])}, torch.tensor([False, True, False]))["labels"]
    assert labels.tolist() == [1, 5, 3]  # index num_classes is the null label


@pytest.mark.parametrize("dropout", [0.0, 0.9999])
def test_caption_dropout_in_training(text, tmp_path, dropout):
    L.seed_everything(0, verbose=False)
    key = synthetic_cache(tmp_path, text, n=8)
    lit = tiny_lit(text, caption_dropout=dropout)
    null = lit.null_context
    seen: list[bool] = []

    def spy(module, args, kwargs):
        context = kwargs["context"]  # (B, L, D)
        seen.extend(bool(torch.equal(c, null)) for c in context)

    lit.model.register_forward_pre_hook(spy, with_kwargs=True)
    trainer(3, []).fit(lit, datamodule=datamodule(tmp_path, key, batch_size=8))
    assert len(seen) == 24
    assert all(seen) if dropout > 0.5 else not any(seen)


def test_optimizer_choice_and_lr_schedule():
    params = [torch.nn.Parameter(torch.zeros(64, 64))]
    opt = build_optimizer(params, "adamw8bit", lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95])
    assert isinstance(opt, bnb.optim.AdamW8bit)
    opt = build_optimizer(params, "adamw", lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95])
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="'sgd'"):
        build_optimizer(params, "sgd", lr=1e-3, weight_decay=0.0, betas=[0.9, 0.99])

    constant = lr_lambda(warmup_steps=10, lr_schedule="constant", total_steps=100, min_lr_ratio=0.1)
    assert [constant(s) for s in (0, 4, 9, 10, 50, 1000)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0, 1.0])
    cosine = lr_lambda(warmup_steps=10, lr_schedule="cosine", total_steps=110, min_lr_ratio=0.1)
    assert [cosine(s) for s in (0, 9, 10, 60, 110, 500)] == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert cosine(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_optimizer_name_is_rejected_at_construction(text):
    with pytest.raises(ValueError, match="'adam'"):
        tiny_lit(text, optimizer="adam")


@pytest.mark.parametrize(
    "items, batch_size, after_fit",
    # 4 batches per epoch: stop at step 3, mid epoch 0 (checkpoints from ModelCheckpoint and from save_checkpoint
    # after fit); 2 batches per epoch: step 3 is mid epoch 1.
    [(8, 2, True), (4, 2, False)],
    ids=["mid-first-epoch", "mid-second-epoch"],
)
def test_resume_continues_the_uninterrupted_run(text, tmp_path, items, batch_size, after_fit):
    key = synthetic_cache(tmp_path, text, n=items)

    def run(max_steps: int, ckpt_path: Path | None = None, checkpoints: Path | None = None):
        L.seed_everything(0, verbose=False)
        # The default optimizer resumes too; so do conditioning-frame draws (clean first latent frames, most steps).
        lit = tiny_lit(text, caption_dropout=0.3, lr=1e-2, optimizer="adamw8bit", p_image=0.3, p_extend=0.5)
        rec = Recorder()
        callbacks: list = [rec]
        if checkpoints is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="step{step}", every_n_train_steps=3,
                                             save_top_k=-1, auto_insert_metric_name=False))  # fmt: skip
        t = trainer(max_steps, callbacks, enable_checkpointing=checkpoints is not None)
        t.fit(lit, datamodule=datamodule(tmp_path, key, batch_size), ckpt_path=ckpt_path and str(ckpt_path))
        return t, lit, rec

    # Uninterrupted 6 steps; ModelCheckpoint saves at step 3 on the way (mid-epoch, in on_train_batch_end).
    _, full, ref = run(6, checkpoints=tmp_path / "ckpt")
    assert ref.steps == [1, 2, 3, 4, 5, 6]
    checkpoints = [tmp_path / "ckpt" / "step3.ckpt"]
    if after_fit:  # a separate 3-step run, saved with trainer.save_checkpoint after fit returned
        t, _, head = run(3)
        assert head.losses == ref.losses[:3]
        t.save_checkpoint(tmp_path / "after-fit.ckpt")
        checkpoints.append(tmp_path / "after-fit.ckpt")

    for ckpt in checkpoints:
        t, resumed, tail = run(6, ckpt_path=ckpt)
        assert tail.steps == [4, 5, 6] and t.global_step == 6, ckpt.name
        assert tail.losses == pytest.approx(ref.losses[3:], rel=1e-5), ckpt.name
        for a, b in zip(full.model.parameters(), resumed.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(full.ema_model.parameters(), resumed.ema_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_training_step_is_finite(text, tmp_path):
    L.seed_everything(0, verbose=False)
    key = synthetic_cache(tmp_path, text, n=4)
    lit = tiny_lit(text)
    dtypes: list[torch.dtype] = []
    # attn.proj: with recompute, qkv, fc1 and fc2 run inside RecomputedLinear, not through their own forward
    lit.model.blocks[0].attn.proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    rec = Recorder()
    trainer(2, [rec], precision="bf16-mixed").fit(lit, datamodule=datamodule(tmp_path, key, batch_size=4))
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)  # Lightning ran the step under CPU bf16 autocast
    assert len(rec.losses) == 2 and all(math.isfinite(v) and v > 0 for v in rec.losses)
    assert all(p.dtype == torch.float32 for p in lit.model.parameters())  # master weights stay fp32
    assert all(torch.isfinite(p).all() for p in lit.ema_model.parameters())


class PoisonSteps(L.Callback):
    """Makes the model's output NaN (so the loss and every gradient are NaN) on the listed global steps."""

    def __init__(self, steps):
        self.steps, self.handle = set(steps), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self.handle = pl_module.model.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_non_finite_steps_are_skipped_without_touching_the_weights(text, tmp_path):
    key = synthetic_cache(tmp_path, text, 8)
    lit = tiny_lit(text, max_bad_steps=3)

    class Snapshot(L.Callback):
        def __init__(self):
            self.weights = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.model.parameters()]

    snap = Snapshot()
    trainer(6, [PoisonSteps({2, 3}), snap]).fit(lit, datamodule=datamodule(tmp_path, key, 4))
    assert lit.bad_steps == 2 and lit.bad_in_a_row == 0  # steps 2 and 3 skipped; 4 and 5 trained again
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(snap.weights[a], snap.weights[b]))  # noqa: E731
    assert same(2, 4)  # the two poisoned steps changed nothing
    assert not same(1, 2) and not same(4, 5)  # the others did
    assert all(torch.isfinite(p).all() for p in lit.model.parameters())
    assert all(torch.isfinite(p).all() for p in lit.ema.parameters())


def test_too_many_non_finite_steps_in_a_row_stop_the_run_naming_the_step(text, tmp_path):
    key = synthetic_cache(tmp_path, text, 8)
    lit = tiny_lit(text, max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"step \d+: the loss or gradients were not finite for 3 steps in a row"):
        trainer(10, [PoisonSteps(range(1, 10))]).fit(lit, datamodule=datamodule(tmp_path, key, 4))
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        tiny_lit(text, max_bad_steps=0)
