"""VideoDiT and its layers: shapes, zero init, gradient flow, masking, RoPE, checkpointing."""

import pytest
import torch

from minisora.models.dit import VideoDiT
from minisora.models.layers import RoPE3D, TimestepEmbedder, apply_rope, modulate, rope_split

C, TEXT_DIM, NUM_CLASSES = 4, 24, 3


def tiny(**kw) -> VideoDiT:
    args = dict(in_channels=C, hidden_size=48, depth=2, num_heads=2, text_dim=TEXT_DIM, num_classes=NUM_CLASSES)
    args.update(kw)
    torch.manual_seed(0)
    return VideoDiT(**args)


def cond_for(condition: str, B: int, L: int = 5) -> dict:
    if condition == "text":
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, 3:] = False
        return dict(context=torch.randn(B, L, TEXT_DIM), context_mask=mask)
    if condition == "class":
        return dict(labels=torch.arange(B) % (NUM_CLASSES + 1))  # includes the null label
    return {}


def perturb_zero_init(model: VideoDiT) -> None:
    """Give zero-initialised tensors small random values so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(std=0.05)


# ---- layers ----

def test_rope_split_even_and_complete():
    for head_dim in (8, 16, 24, 32, 64, 128):
        parts = rope_split(head_dim)
        assert sum(parts) == head_dim and all(p % 2 == 0 and p > 0 for p in parts)
    assert rope_split(64) == (16, 24, 24)
    with pytest.raises(ValueError, match="head_dim"):
        rope_split(7)


def test_rope_is_relative_and_norm_preserving():
    rope = RoPE3D(32)
    cos, sin = rope(4, 5, 6)
    assert cos.shape == (4 * 5 * 6, 32)
    q, k = torch.randn(2, 32), torch.randn(2, 32)

    def at(pos):  # rotate q or k as if at grid position pos on a (4, 5, 6) grid
        i = (pos[0] * 5 + pos[1]) * 6 + pos[2]
        return cos[i], sin[i]

    qa, _ = apply_rope(q[:1], k[:1], *at((0, 1, 2)))
    _, kb = apply_rope(q[:1], k[:1], *at((1, 3, 2)))
    qc, _ = apply_rope(q[:1], k[:1], *at((2, 2, 3)))
    _, kd = apply_rope(q[:1], k[:1], *at((3, 4, 3)))
    # the same offset (1, 2, 0) gives the same logit at different absolute positions
    assert torch.allclose((qa * kb).sum(), (qc * kd).sum(), atol=1e-5)
    assert torch.allclose(qa.norm(), q[:1].norm(), atol=1e-5)
    # a different offset gives a different logit
    _, ke = apply_rope(q[:1], k[:1], *at((1, 1, 2)))
    assert not torch.allclose((qa * kb).sum(), (qa * ke).sum(), atol=1e-3)


def test_rope_cache_and_image_grid():
    rope = RoPE3D(16)
    a = rope(1, 4, 4)
    assert rope(1, 4, 4)[0] is a[0]  # cached per grid
    # head_dim 16 gives time 4 channels = 2 rotation pairs, columns 0-1 and 8-9; with T=1 their angle is 0
    cos = a[0]
    assert torch.equal(cos[:, [0, 1, 8, 9]], torch.ones(16, 4)) and not torch.equal(cos[:, 2], torch.ones(16))


def test_timestep_embedder_and_modulate():
    emb = TimestepEmbedder(32)
    out = emb(torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == (3, 32)
    assert not torch.allclose(out[0], out[1])
    x = torch.randn(2, 5, 8)
    y = modulate(x, torch.ones(2, 8), torch.zeros(2, 8))
    assert torch.allclose(y, x + 1)


# ---- VideoDiT ----

@pytest.mark.parametrize("layout", ["full", "factorized"])
@pytest.mark.parametrize("condition", ["text", "class", "none"])
def test_shapes_and_zero_init(layout, condition):
    model = tiny(layout=layout, condition=condition)
    for T, H, W in [(1, 8, 8), (3, 4, 6), (5, 6, 10)]:  # an image, videos, non-square
        x = torch.randn(2, C, T, H, W)
        out = model(x, torch.rand(2), **cond_for(condition, 2))
        assert out.shape == x.shape
        assert torch.equal(out, torch.zeros_like(out))  # zero-initialised head: the untrained model outputs 0


@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_rope_extrapolation_to_larger_grid(layout):
    model = tiny(layout=layout)
    perturb_zero_init(model)
    small = model(torch.randn(1, C, 2, 4, 4), torch.rand(1), **cond_for("text", 1))
    big = model(torch.randn(1, C, 9, 16, 20), torch.rand(1), **cond_for("text", 1))  # never seen, larger grid
    assert big.shape == (1, C, 9, 16, 20) and torch.isfinite(big).all() and big.abs().sum() > 0
    assert small.shape == (1, C, 2, 4, 4)


def test_temporal_patch_pads_time_and_images_work():
    model = tiny(patch_size=[2, 2, 2])
    perturb_zero_init(model)
    assert model.tokens(5, 8, 8) == 3 * 4 * 4  # time rounds up
    for T in (1, 4, 5):
        x = torch.randn(1, C, T, 8, 8)
        assert model(x, torch.rand(1), **cond_for("text", 1)).shape == x.shape


def test_non_divisible_shape_raises():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(T, H, W\) = \(2, 7, 8\).*multiple of 2"):
        model(torch.randn(1, C, 2, 7, 8), torch.rand(1), **cond_for("text", 1))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, C + 1, 2, 8, 8), torch.rand(1), **cond_for("text", 1))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="layout"):
        tiny(layout="diagonal")
    with pytest.raises(ValueError, match="condition"):
        tiny(condition="audio")
    with pytest.raises(ValueError, match="num_classes"):
        tiny(condition="class", num_classes=0)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(patch_size=[2, 2])


def test_factorized_attention_groups():
    # depth-1 factorized = one spatial block: frames never see each other; a full block mixes them.
    x, t = torch.randn(1, C, 3, 4, 4), torch.rand(1)
    x2 = x.clone()
    x2[:, :, 2] += 1.0  # change the last frame only
    for layout, mixes in [("factorized", False), ("full", True)]:
        model = tiny(layout=layout, depth=1, condition="none").eval()
        perturb_zero_init(model)
        a, b = model(x, t), model(x2, t)
        assert torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-6) != mixes, layout
    # a temporal block alone: patch (0, 0) never sees a change at patch (1, 1) of any frame
    model = tiny(layout="factorized", depth=2, condition="none").eval()
    model.blocks = model.blocks[1:]
    assert model.blocks[0].attn_mode == "temporal"
    perturb_zero_init(model)
    x3 = x.clone()
    x3[:, :, :, 2:4, 2:4] += 1.0
    a, b = model(x, t), model(x3, t)
    assert torch.allclose(a[..., :2, :2], b[..., :2, :2], atol=1e-6)
    assert not torch.allclose(a[:, :, 0, 2:4, 2:4], b[:, :, 0, 2:4, 2:4], atol=1e-4)


@pytest.mark.parametrize("layout,pooled_text", [("full", False), ("factorized", False), ("full", True)])
def test_context_mask_masks(layout, pooled_text):
    model = tiny(layout=layout, pooled_text=pooled_text).eval()
    perturb_zero_init(model)
    x, t = torch.randn(2, C, 2, 4, 4), torch.rand(2)
    cond = cond_for("text", 2)  # sample 0 has real tokens 0..2 only
    out = model(x, t, **cond)
    changed = cond["context"].clone()
    changed[0, 3:] = torch.randn(2, TEXT_DIM) * 10  # masked-out tokens of sample 0
    out2 = model(x, t, context=changed, context_mask=cond["context_mask"])
    assert torch.allclose(out, out2, atol=1e-6)
    changed[0, 1] += 1.0  # a real token does matter
    out3 = model(x, t, context=changed, context_mask=cond["context_mask"])
    assert not torch.allclose(out[0], out3[0], atol=1e-4)
    assert torch.equal(out[1], out3[1])  # and only for its own sample


def test_all_false_mask_gives_no_nan():
    model = tiny().eval()
    perturb_zero_init(model)
    cond = cond_for("text", 2)
    cond["context_mask"][0] = False  # a prompt of zero tokens
    out = model(torch.randn(2, C, 1, 4, 4), torch.rand(2), **cond)
    assert torch.isfinite(out).all()


def test_class_labels_matter_and_none_is_null():
    model = tiny(condition="class").eval()
    perturb_zero_init(model)
    x, t = torch.randn(2, C, 1, 4, 4), torch.rand(2)
    a = model(x, t, labels=torch.tensor([0, 1]))
    b = model(x, t, labels=torch.tensor([1, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])
    null = model(x, t, labels=torch.full((2,), NUM_CLASSES))
    assert torch.equal(model(x, t), null)


@pytest.mark.parametrize("condition", ["text", "class"])
def test_gradient_reaches_every_parameter(condition):
    model = tiny(layout="factorized", condition=condition, pooled_text=condition == "text")
    assert (model.text_pool is not None) == (condition == "text")  # pooled text needs text
    perturb_zero_init(model)
    x = torch.randn(4, C, 2, 4, 4)
    model(x, torch.rand(4), **cond_for(condition, 4)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


def test_training_from_init_updates_every_parameter_and_lowers_loss():
    # From the real (zero-head) init, gradients reach deeper layers step by step: head, then cross-attention
    # projections, then everything. Fit a fixed target for a few Adam steps.
    model = tiny(condition="text", pooled_text=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    x, t, cond = torch.randn(4, C, 2, 4, 4), torch.rand(4), cond_for("text", 4)
    target = torch.randn_like(x)
    losses = []
    for _ in range(8):
        loss = (model(x, t, **cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters never updated: {unchanged}"
    assert losses[-1] < 0.9 * losses[0]


def test_grad_checkpointing_matches():
    x, t, cond = torch.randn(2, C, 2, 4, 4), torch.rand(2), cond_for("text", 2)
    grads = []
    for ckpt in (False, True):
        model = tiny(layout="factorized", grad_checkpointing=ckpt).train()
        perturb_zero_init(model)  # same seed inside tiny() and here: identical weights
        model(x, t, **cond).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_counts():
    model = tiny(patch_size=[1, 2, 2])
    assert model.tokens(4, 8, 6) == 4 * 4 * 3
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_bf16_autocast_close_to_fp32(layout):
    model = tiny(layout=layout).eval()
    perturb_zero_init(model)
    x, t, cond = torch.randn(2, C, 2, 4, 4), torch.rand(2), cond_for("text", 2)
    ref = model(x, t, **cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, **cond)
    assert low.shape == x.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_constructor_annotations_fit_the_config_schema():
    import inspect

    scalars = (int, float, bool, str)
    allowed = {*scalars, *(s | None for s in scalars), list[int], list[float], list[str],
               list[int] | None, list[float] | None, list[str] | None}
    for name, param in inspect.signature(VideoDiT).parameters.items():
        assert param.annotation in allowed, f"VideoDiT.{name}: {param.annotation}"
        assert param.default is not inspect.Parameter.empty, name


# ---- per-frame and per-token timesteps ----

@pytest.mark.parametrize("layout,condition", [("full", "text"), ("factorized", "class"), ("factorized", "none")])
def test_per_token_t_all_equal_matches_per_sample(layout, condition):
    model = tiny(layout=layout, condition=condition, pooled_text=condition == "text").eval()
    perturb_zero_init(model)
    x, t, cond = torch.randn(2, C, 3, 4, 6), torch.tensor([0.3, 0.8]), cond_for(condition, 2)
    ref = model(x, t, **cond)
    N = model.tokens(3, 4, 6)
    per_token = model(x, t[:, None].expand(2, N), **cond)
    per_frame = model(x, t[:, None].expand(2, 3), **cond)
    assert (per_token - ref).abs().max() <= 1e-6 and (per_frame - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_per_frame_t_equals_expanded_per_token_t(layout):
    model = tiny(layout=layout).eval()
    perturb_zero_init(model)
    T, H, W = 3, 4, 6
    x, cond = torch.randn(2, C, T, H, W), cond_for("text", 2)
    t_frame = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 0.9]])  # clean first frame(s), as image-to-video gives them
    tokens_per_frame = (H // 2) * (W // 2)
    t_token = t_frame.repeat_interleave(tokens_per_frame, dim=1)  # (B, N) in (t, h, w) order
    a, b = model(x, t_frame, **cond), model(x, t_token, **cond)
    assert (a - b).abs().max() <= 1e-6
    # and each frame's t matters: a clean first frame is modulated differently from a noisy one
    c = model(x, torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.9]]), **cond)
    assert not torch.allclose(a[0], c[0], atol=1e-4) and torch.allclose(a[1], c[1], atol=1e-6)


def test_per_frame_t_with_temporal_patch_and_bad_shapes():
    model = tiny(patch_size=[2, 2, 2]).eval()
    perturb_zero_init(model)
    x, cond = torch.randn(1, C, 5, 4, 4), cond_for("text", 1)  # 5 frames pad to 3 temporal patches
    same = model(x, torch.tensor([[0.0, 0.0, 0.4, 0.4, 0.7]]), **cond)
    assert (same - model(x, torch.tensor([[0.0, 0.4, 0.7]]).repeat_interleave(4, dim=1), **cond)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="within each temporal patch of 2"):
        model(x, torch.tensor([[0.0, 0.4, 0.4, 0.4, 0.7]]), **cond)
    with pytest.raises(ValueError, match=r"per latent frame \(B, T\) = \(1, 5\)"):
        model(x, torch.rand(1, 7), **cond)


@pytest.mark.parametrize("ckpt", [False, True])
def test_per_frame_t_gradients_flow_and_checkpointing_matches(ckpt):
    x, cond = torch.randn(2, C, 3, 4, 4), cond_for("text", 2)
    t = torch.tensor([[0.0, 0.6, 0.6], [0.0, 0.2, 0.2]])
    grads = []
    for use in (False, ckpt):
        model = tiny(layout="factorized", grad_checkpointing=use, pooled_text=True).train()
        perturb_zero_init(model)
        model(x, t, **cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    missing = [n for n, p in model.named_parameters() if n not in grads[1] or grads[1][n].abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_per_frame_t_under_bf16_autocast():
    model = tiny(layout="factorized").eval()
    perturb_zero_init(model)
    x, cond, t = torch.randn(2, C, 3, 4, 4), cond_for("text", 2), torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 0.9]])
    ref = model(x, t, **cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, **cond)
    assert torch.isfinite(low).all() and (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ---- memory layout: regrouping once, per-group RoPE tables, recompute ----

def reference_attention(attn, x, rope_full, grid, mode):
    """The attention as first written: RoPE on the full grid, then q, k, v regrouped (kept to pin the function)."""
    from einops import rearrange

    T, H, W = grid
    qkv = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    q, k, v = qkv.unbind(0)
    q, k = apply_rope(attn.q_norm(q), attn.k_norm(k), *rope_full)
    group = {"full": "b h n d -> b h n d", "spatial": "b h (t s) d -> (b t) h s d",
             "temporal": "b h (t s) d -> (b s) h t d"}[mode]
    ungroup = {"full": "b h n d -> b n (h d)", "spatial": "(b t) h s d -> b (t s) (h d)",
               "temporal": "(b s) h t d -> b (t s) (h d)"}[mode]
    axes = {} if mode == "full" else {"t": T, "s": H * W}
    q, k, v = (rearrange(z, group, **axes) for z in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return attn.proj(rearrange(out, ungroup, b=x.shape[0], **axes))


@pytest.mark.parametrize("mode", ["full", "spatial", "temporal"])
def test_attention_matches_full_grid_rope_reference(mode):
    model = tiny(hidden_size=48, num_heads=2, depth=1)
    perturb_zero_init(model)
    attn, grid = model.blocks[0].attn, (3, 4, 6)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3 * 4 * 6, 48) * 3
    ref = reference_attention(attn, x, model.rope(*grid), grid, mode)
    out = attn(x, model.rope_tables(grid, x.device)[mode], grid, mode)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("layout", ["full", "factorized"])
def test_recompute_changes_neither_outputs_nor_gradients(layout):
    x, t, cond = torch.randn(2, C, 3, 4, 4), torch.tensor([[0.0, 0.4, 0.4], [0.7, 0.7, 0.7]]), cond_for("text", 2)
    results = []
    for recompute in (False, True):
        model = tiny(layout=layout, recompute=recompute, pooled_text=True).train()
        perturb_zero_init(model)
        out = model(x, t, **cond)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][n], rtol=1e-5, atol=1e-8), n


def test_recomputed_linear_matches_autograd_in_fp32_and_bf16():
    from functools import partial

    from minisora.models.attention import norm_modulate
    from minisora.models.layers import RecomputedLinear

    torch.manual_seed(0)
    lin, norm = torch.nn.Linear(32, 8), torch.nn.LayerNorm(32, elementwise_affine=False)
    x = torch.randn(2, 5, 32, requires_grad=True)
    shift, scale = torch.randn(2, 32, requires_grad=True), torch.randn(2, 32, requires_grad=True)
    dy = torch.randn(2, 5, 8)
    gelu = partial(torch.nn.functional.gelu, approximate="tanh")
    for f, inputs in ((gelu, (x,)), (partial(norm_modulate, norm), (x, shift, scale))):
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                ref = lin(f(*inputs))
                out = RecomputedLinear.apply(f, lin.weight, lin.bias, *inputs)
            assert out.dtype == ref.dtype and torch.equal(out, ref)
            wrt = [*inputs, lin.weight, lin.bias]
            g_ref = torch.autograd.grad(ref, wrt, dy.to(ref.dtype))
            g_out = torch.autograd.grad(out, wrt, dy.to(out.dtype))
            for r, o in zip(g_ref, g_out):
                assert o.dtype == r.dtype and torch.allclose(o, r, rtol=1e-5 if not autocast else 2e-2, atol=1e-6)
