"""An 8-bit frozen base (bitsandbytes Linear8bitLt) under LoRA: a quarter of the block weights' bytes, the same
LoRA loss curve as the float base within a few percent, and samples close to the float base's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="needs the optional diffusers: pip install -e .[diffusers]")
pytest.importorskip("transformers", reason="needs transformers: pip install -e .[diffusers]")

import released_folders as rf  # noqa: E402
from test_released_parity import minisora_latents, relative_error  # noqa: E402

from minisora import diffusion  # noqa: E402
from minisora.models.lora_formats import add_released_lora  # noqa: E402
from minisora.models.quantized import is_int8, quantize_int8, weight_bytes  # noqa: E402

STEPS = 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return rf.build_folder(tmp_path_factory.mktemp("released-int8"), "wan21")


def train_lora(folder, int8: bool) -> tuple[object, list[float]]:
    """30 AdamW steps of a rank-4 LoRA on the tiny Wan model (fixed data, noise, timesteps); returns model, losses."""
    from minisora.models.released import load_released

    model = load_released(folder, vae=False)
    if int8:
        quantize_int8(model.denoiser.transformer)
    torch.manual_seed(0)  # the same LoRA initialisation on both bases
    add_released_lora(model.denoiser, rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(1)
    C, T, H, W = model.latent_shape(*rf.CLIPS["wan21"])
    x0 = torch.randn(4, C, T, H, W, generator=g)
    context, mask = model.text(["a red circle moving left", "a blue square", "a cat runs", "a dog jumps"])
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(STEPS):
        noise, t = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
        loss = diffusion.flow_loss(model.denoiser, x0, t, noise, context=context, context_mask=mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_int8_layers_are_a_quarter_of_the_bytes_and_accurate(folder):
    import bitsandbytes as bnb

    from minisora.models.released import load_released

    transformer = load_released(folder, vae=False, text=False).denoiser.transformer
    linear = transformer.blocks[0].ffn.net[2]
    weight, before = linear.weight.detach().clone(), weight_bytes(transformer.blocks)
    quantize_int8(transformer)
    q = transformer.blocks[0].ffn.net[2]
    assert isinstance(q, bnb.nn.Linear8bitLt) and q.weight.dtype == torch.int8 and not q.weight.requires_grad
    assert is_int8(transformer) and type(transformer.proj_out) is torch.nn.Linear  # outside the blocks: float
    weights = [m.weight for m in transformer.blocks.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    int8 = sum(w.numel() for w in weights)
    assert len(weights) == 2 * 10 and all(w.dtype == torch.int8 for w in weights)  # 10 Linear layers per block
    assert before - weight_bytes(transformer.blocks) == 3 * int8  # 4 bytes -> 1 byte per weight
    dequantized = q.weight.float() * q.weight.SCB.float()[:, None] / 127  # per output row scales
    # half an int8 step of its row (the scales are kept at fp16 precision: up to 7% more measured)
    assert ((dequantized - weight).abs() <= weight.abs().amax(1, keepdim=True) / 254 * 1.1).all()
    x = torch.randn(8, linear.in_features)
    with torch.no_grad():
        assert relative_error(q(x), torch.nn.functional.linear(x, weight, linear.bias)) < 0.02
    with pytest.raises(ValueError, match="match no Linear layer"):
        quantize_int8(transformer, targets=r"nothing\..*")


def test_lora_on_an_int8_base_trains_and_samples_like_the_float_base(folder):
    from minisora.models.lora import merge_lora

    fp, fp_losses = train_lora(folder, int8=False)
    q, q_losses = train_lora(folder, int8=True)
    gap = max(abs(a - b) / a for a, b in zip(fp_losses, q_losses))
    print(f"int8 vs fp32 base, LoRA loss over {STEPS} steps: fp32 {fp_losses[0]:.3f} -> {fp_losses[-1]:.3f}, "
          f"int8 {q_losses[0]:.3f} -> {q_losses[-1]:.3f}, largest relative gap {gap:.2%}")  # fmt: skip
    assert fp_losses[-1] < 0.8 * fp_losses[0] and q_losses[-1] < 0.8 * q_losses[0]
    assert gap < 0.01, (fp_losses, q_losses)  # measured 0.05%
    for model in (fp, q):
        model.denoiser.eval()
    error = relative_error(minisora_latents(q, "wan21", "default"), minisora_latents(fp, "wan21", "default"))
    print(f"int8 vs fp32 base, sampled latents: max|diff|/max|ref| = {error:.2e}")
    assert error < 0.03
    with pytest.raises(ValueError, match="cannot merge a LoRA into an 8-bit base"):
        merge_lora(q.denoiser.transformer)
