"""LitAutoencoder: a short CPU training run whose loss falls, latent statistics, GAN and perceptual terms, logging."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import save_file

from minisora.models.autoencoder import VideoVAE
from minisora.training.lit_autoencoder import LitAutoencoder, PerceptualLoss, bounded_error, estimate_latent_stats


def moving_squares(n: int, T: int = 5, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n clips (n, 3, T, size, size) in [-1, 1]: a coloured 4x4 square moving 1 px/frame on black."""
    g = torch.Generator().manual_seed(seed)
    video = -torch.ones(n, 3, T, size, size)
    for i in range(n):
        colour = torch.rand(3, generator=g) * 2 - 1
        y, x = torch.randint(0, size - 4, (2,), generator=g).tolist()
        dx = 1 if x < size - 4 - T else -1
        for t in range(T):
            video[i, :, t, y : y + 4, x + dx * t : x + dx * t + 4] = colour[:, None, None]
    return video


class Clips(torch.utils.data.Dataset):
    def __init__(self, video: torch.Tensor) -> None:
        self.video = video

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], "caption": "a square"}


def tiny_vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(latent_channels=8, base_channels=8, temporal_compression=4, spatial_compression=4, patch_size=2)


def trainer(steps: int, tmp_path, logger=False) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1, gradient_clip_val=1.0,
    )  # fmt: skip


@torch.no_grad()
def l1(vae: VideoVAE, video: torch.Tensor) -> float:
    return (vae.decode(vae.encode(video)) - video).abs().mean().item()


def test_training_reduces_reconstruction_error(tmp_path):
    L.seed_everything(0)
    data = moving_squares(64)
    loader = torch.utils.data.DataLoader(Clips(data), batch_size=8, shuffle=True)
    vae = tiny_vae()
    before = l1(vae.eval(), data[:16])
    lit = LitAutoencoder(vae.train(), lr=3e-3, optimizer="adamw8bit", warmup_steps=5, recon_loss="mse",
                         log_video_every=0, latent_stats_batches=4)  # fmt: skip
    trainer(40, tmp_path).fit(lit, loader)
    after = l1(vae.eval(), data[:16])
    assert type(lit.optimizers().optimizer).__name__ == "AdamW8bit"
    assert after < 0.5 * before, f"L1 {before:.3f} -> {after:.3f}"
    # on_train_end measured the latent statistics: normalised latents are ~zero-mean, unit-std per channel.
    with torch.no_grad():
        z = vae.encode(data)
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 0.3
    assert ((z.std(dim=(0, 2, 3, 4)) - 1).abs().max()) < 0.3
    assert not torch.equal(vae.scale, torch.ones_like(vae.scale))


def test_bounded_error_forgives_overshoot_only_beyond_bound_targets():
    video = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.5, 0.5])
    recon = torch.tensor([-1.5, 1.5, 1.5, -0.5, 1.5, -1.5], requires_grad=True)
    err = bounded_error(recon, video)
    assert err.tolist() == [0.0, 2.5, 0.0, -1.5, 1.0, -2.0]
    err.pow(2).sum().backward()
    assert recon.grad.tolist() == [0.0, 5.0, 0.0, -3.0, 2.0, -4.0]  # a wrongly saturated pixel still learns


def test_estimate_latent_stats_normalises_latents():
    vae = tiny_vae().eval()
    data = moving_squares(24, seed=1)
    batches = [{"video": data[i : i + 8]} for i in range(0, 24, 8)]
    shift, scale = estimate_latent_stats(vae, batches, max_batches=3)
    with torch.no_grad():
        raw = vae.encode_raw(data)
        z = vae.encode(data)
    assert torch.allclose(shift, raw.mean(dim=(0, 2, 3, 4)), atol=1e-5)
    assert torch.allclose(scale, raw.std(dim=(0, 2, 3, 4), unbiased=False), rtol=1e-4)
    assert torch.allclose(z.mean(dim=(0, 2, 3, 4)), torch.zeros(8), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3, 4), unbiased=False), torch.ones(8), atol=1e-3)
    with pytest.raises(ValueError, match="no batches"):
        estimate_latent_stats(vae, [], max_batches=3)


def test_discriminator_phase_trains_both_networks_and_logs_gifs(tmp_path):
    L.seed_everything(0)
    loader = torch.utils.data.DataLoader(Clips(moving_squares(16)), batch_size=4)
    vae = tiny_vae()
    lit = LitAutoencoder(vae, lr=1e-3, optimizer="adamw", disc_start=2, warmup_steps=1, log_video_every=2,
                         latent_stats_batches=0)  # fmt: skip
    disc_before = [p.detach().clone() for p in lit.discriminator.parameters()]
    logger = TensorBoardLogger(tmp_path, name="vae")
    t = trainer(4, tmp_path, logger)
    t.fit(lit, loader)
    assert {"train/d_loss", "train/g_loss", "train/d_weight"} <= set(t.logged_metrics)
    assert t.logged_metrics["train/d_weight"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, lit.discriminator.parameters()))
    # The generator's adversarial term must not train the discriminator towards being fooled: with the
    # discriminator's own loss removed, its parameters get no gradient.
    lit.zero_grad()
    video = moving_squares(2)
    recon, _, _ = vae(video)
    g_loss, _ = lit._adversarial(recon, (recon - video).abs().mean())
    g_loss.backward()
    assert all(p.grad is None for p in lit.discriminator.parameters())
    events = list((tmp_path / "vae").rglob("events.out.tfevents*"))
    assert events and b"input|reconstruction" in events[0].read_bytes() and b"GIF89a" in events[0].read_bytes()


def test_perceptual_loss_uses_only_a_local_file(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    path = tmp_path / "vgg16.safetensors"  # random weights with torchvision vgg16's feature names
    torch.manual_seed(0)
    save_file({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, str(path))
    loss = PerceptualLoss(str(path))
    x = moving_squares(1, T=2, size=32)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, x.flip(-1)).item() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(FileNotFoundError, match="never downloads"):
        PerceptualLoss(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="needs lpips_path"):
        LitAutoencoder(tiny_vae(), perceptual_weight=0.1)
    lit = LitAutoencoder(tiny_vae(), perceptual_weight=0.1, lpips_path=str(path), optimizer="adamw")
    optimised = {id(p) for group in lit.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in lit.vae.parameters()}  # the frozen VGG is not optimised


@pytest.mark.parametrize(
    "kwargs,message",
    [({"optimizer": "sgd"}, "optimizer must be one of adamw8bit, adamw, got 'sgd'"),
     ({"lr_schedule": "linear"}, "lr_schedule must be one of constant, cosine"),
     ({"betas": [0.9]}, "betas must be two floats"),
     ({"recon_loss": "huber"}, "recon_loss must be one of l1, mse")],
)  # fmt: skip
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LitAutoencoder(tiny_vae(), **kwargs)
