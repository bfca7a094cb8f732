"""Analytic VideoDiT FLOPs against torch's FlopCounterMode on real forward/backward passes; peak table; MFU."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minisora.bench.flops import (
    PARTS,
    attention_flops,
    dit_forward_flops,
    dit_train_step_flops,
    gpu_peak_flops,
    mfu,
    peak_flops,
)
from minisora.models.dit import VideoDiT

C, TEXT_DIM, L = 4, 32, 5
# T=3 with a temporal patch of 2 exercises the time padding (the model computes on 4 frames).
LATENT = (2, C, 3, 8, 8)  # (B, C, T, H, W)


def tiny(**overrides) -> VideoDiT:
    args = dict(in_channels=C, patch_size=[2, 2, 2], hidden_size=64, depth=2, num_heads=2, text_dim=TEXT_DIM)
    return VideoDiT(**{**args, **overrides})


def _inputs(model: VideoDiT) -> tuple[torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    B = LATENT[0]
    x, t = torch.randn(*LATENT), torch.rand(B)
    cond = {}
    if model.condition == "text":
        cond = {"context": torch.randn(B, L, TEXT_DIM), "context_mask": torch.ones(B, L, dtype=torch.bool)}
    elif model.condition == "class":
        cond = {"labels": torch.zeros(B, dtype=torch.long)}
    return x, t, cond


def _measured_parts(counts: dict[str, dict]) -> dict[str, int]:
    """FlopCounterMode's per-module counts grouped into flops.PARTS."""
    per_module = {name: sum(ops.values()) for name, ops in counts.items()}
    parts = dict.fromkeys(PARTS, 0)
    for name, n in per_module.items():
        leaf = name.removeprefix("VideoDiT.")
        if leaf == "x_embedder":
            parts["patch_embed"] += n
        elif leaf in ("t_embedder", "t_block", "text_pool"):
            parts["adaln"] += n
        elif leaf == "final_layer":
            parts["final_layer"] += n
        elif leaf.startswith("blocks.") and leaf.count(".") == 2:  # blocks.i.attn / cross_attn / mlp
            kind = leaf.split(".")[2]
            if kind == "attn":
                proj = per_module[name + ".qkv"] + per_module[name + ".proj"]
                parts["attention_proj"] += proj
                parts["attention_scores"] += n - proj  # the SDPA matmuls inside the module
            elif kind == "cross_attn":
                parts["cross_attention"] += n
            elif kind == "mlp":
                parts["mlp"] += n
    parts["total"] = per_module["Global"]
    return parts


def _count(model: VideoDiT, backward: bool = False) -> dict:
    x, t, cond = _inputs(model)
    # The math SDPA backend is made of bmm calls that FlopCounterMode counts; the CPU flash kernel is not
    # registered with it in torch 2.14 and would count as 0.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, t, **cond)
        if backward:
            out.square().mean().backward()
    return counter.get_flop_counts()


@pytest.mark.parametrize(
    "overrides",
    [
        {"layout": "full"},
        {"layout": "factorized"},
        {"layout": "full", "pooled_text": True},
        {"layout": "factorized", "depth": 3, "condition": "class", "num_classes": 10},
        {"layout": "full", "condition": "none", "patch_size": [1, 2, 2]},
    ],
    ids=["full-text", "factorized-text", "full-pooled-text", "factorized-class", "full-none"],
)
def test_forward_flops_match_flop_counter(overrides):
    model = tiny(**overrides).eval()
    B, _, T, H, W = LATENT
    analytic = dit_forward_flops(model, T, H, W, batch=B, context_len=L)
    measured = _measured_parts(_count(model))
    assert analytic["total"] == sum(analytic[p] for p in PARTS)
    for part in (*PARTS, "total"):
        assert analytic[part] == pytest.approx(measured[part], rel=0.01), part
    if model.condition == "text":
        assert analytic["cross_attention"] > 0
    else:
        assert analytic["cross_attention"] == 0


def test_train_step_is_three_forwards():
    # Without recompute (whose extra forward test_recompute_adds_one_forward_of_the_blocks counts); FlopCounterMode's
    # module tracker also cannot follow RecomputedLinear's autograd.grad inside backward.
    model = tiny(layout="factorized", recompute=False).train()
    B, _, T, H, W = LATENT
    measured = sum(_count(model, backward=True)["Global"].values())
    analytic = dit_train_step_flops(model, T, H, W, batch=B, context_len=L)
    fwd = dit_forward_flops(model, T, H, W, batch=B, context_len=L)["total"]
    assert analytic == 3 * fwd
    # backward = 2 x forward over-counts only layers whose input needs no gradient (patch embedding, text k/v,
    # the timestep MLP's first layer): a few percent at this tiny width, less at real ones.
    assert measured <= analytic
    assert measured == pytest.approx(analytic, rel=0.03)


def test_recompute_adds_one_forward_of_the_blocks():
    model = tiny()
    fwd = dit_forward_flops(model, 3, 8, 8, context_len=L)
    blocks = fwd["attention_proj"] + fwd["attention_scores"] + fwd["cross_attention"] + fwd["mlp"]
    plain = dit_train_step_flops(model, 3, 8, 8, context_len=L)
    assert dit_train_step_flops(model, 3, 8, 8, context_len=L, include_recompute=True) == plain + blocks


def test_attention_quadratic_in_tokens_and_factorized_cheaper_at_scale():
    full, fact = tiny(layout="full", patch_size=[1, 2, 2]), tiny(layout="factorized", patch_size=[1, 2, 2])
    small, big = dit_forward_flops(full, 4, 16, 16), dit_forward_flops(full, 4, 16, 32)  # tokens x2
    assert big["attention_scores"] == 4 * small["attention_scores"]
    assert big["mlp"] == 2 * small["mlp"] and big["attention_proj"] == 2 * small["attention_proj"]
    # (t', h', w') = (16, 32, 32): 16,384 tokens. Full attention is N^2; factorized is N * (h'w' + t') / 2.
    f, g = dit_forward_flops(full, 16, 64, 64), dit_forward_flops(fact, 16, 64, 64)
    assert g["attention_scores"] * 10 < f["attention_scores"]
    assert g["total"] < f["total"]
    assert g["mlp"] == f["mlp"] and g["attention_proj"] == f["attention_proj"]


def test_attention_formula_matches_einsum_count():
    # The same count, independent of SDPA: two einsums under FlopCounterMode.
    G, heads, n, m, d = 3, 2, 7, 5, 8
    q, k, v = torch.randn(G, heads, n, d), torch.randn(G, heads, m, d), torch.randn(G, heads, m, d)
    with FlopCounterMode(display=False) as counter:
        scores = torch.einsum("ghnd,ghmd->ghnm", q, k).softmax(-1)
        torch.einsum("ghnm,ghmd->ghnd", scores, v)
    assert counter.get_total_flops() == attention_flops(G, heads, n, m, d)


def test_preset_scale_sanity():
    # DiT-S widths on 1,280 tokens: per token and block, qkv + out + MLP = (3 + 1 + 8) D^2 multiply-adds.
    model = VideoDiT(in_channels=16, hidden_size=384, depth=12, num_heads=6, text_dim=768)
    fwd = dit_forward_flops(model, 5, 32, 32, context_len=77)
    assert fwd["attention_proj"] + fwd["mlp"] == 2 * 1280 * 12 * 12 * 384**2
    assert fwd["attention_scores"] == 12 * 4 * 1280**2 * 384  # 4 N^2 D per full-attention block
    assert fwd["cross_attention"] == 12 * (2 * 1280 * 2 * 384**2 + 2 * 77 * 768 * 2 * 384 + 4 * 1280 * 77 * 384)


def test_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="batch"):
        dit_forward_flops(model, 3, 8, 8, batch=0)
    with pytest.raises(ValueError, match="patch_size"):
        dit_forward_flops(model, 3, 9, 8)


def test_peak_flops_table():
    assert peak_flops("cpu") is None
    assert peak_flops(torch.device("cpu")) is None
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert gpu_peak_flops("NVIDIA H100 NVL") == 835.5e12
    assert gpu_peak_flops("NVIDIA H200") == 989.5e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == gpu_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 3090") == 71.2e12
    assert gpu_peak_flops("NVIDIA L40S") == 362.05e12 and gpu_peak_flops("NVIDIA L40") == 181.05e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12
    assert gpu_peak_flops("NVIDIA RTX A6000") == 154.8e12
    # Look-alikes with different silicon stay unknown rather than borrowing a neighbour's figure.
    for name in ("NVIDIA A10G", "NVIDIA GeForce RTX 4090 D", "NVIDIA GeForce RTX 3090 Ti",
                 "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA RTX A4000", "Tesla V100-SXM2-16GB", ""):
        assert gpu_peak_flops(name) is None, name


def test_mfu_arithmetic():
    assert mfu(3e12, 0.5, 12e12) == pytest.approx(0.5)
    assert mfu(1e15, 2.0, 989.5e12) == pytest.approx(1e15 / 2 / 989.5e12)
    assert mfu(1e12, 1.0, None) is None
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 1e12)
    with pytest.raises(ValueError):
        mfu(1e12, 1.0, 0.0)
