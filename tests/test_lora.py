"""LoRA through peft: adapters on a tiny VideoDiT, their files, base identity, scale and merge."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from minisora.models import lora as lora_lib
from minisora.models.dit import VideoDiT
from minisora.models.lora import LoraError
from minisora.models.text import TextEncoder
from minisora.training.lit_dit import LitVideoDiT

ARGS = dict(in_channels=4, text_dim=32, hidden_size=32, depth=2, num_heads=2, pooled_text=True)


def base(seed: int = 0, **kw) -> VideoDiT:
    torch.manual_seed(seed)
    model = VideoDiT(**{**ARGS, **kw})
    for p in model.parameters():  # zero-initialised layers too: outputs must depend on every weight
        p.data.normal_(0, 0.2)
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 4, 4, generator=g)
    t = torch.rand(2, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    return x, t, ctx, torch.ones(2, 5, dtype=torch.bool)


def run(model, seed: int = 1) -> torch.Tensor:
    x, t, ctx, mask = inputs(seed)
    with torch.no_grad():
        return model(x, t, context=ctx, context_mask=mask)


def trained_adapter(model: VideoDiT, seed: int = 2) -> None:
    """Give every LoRA tensor random values, as training would (lora_B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3


def test_add_lora_freezes_the_base_and_starts_as_the_base():
    model = base()
    before = run(model)
    lora_lib.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=["self_attn", "cross_attn", "mlp"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # 2 blocks x (qkv, proj, q, kv, proj, fc1, fc2) x (A, B)
    assert len(trainable) == 2 * 7 * 2
    assert {n.split(".lora_")[0] for n in trainable} >= {"blocks.0.attn.qkv", "blocks.1.cross_attn.kv", "blocks.1.mlp.fc2"}
    torch.testing.assert_close(run(model), before)  # lora_B = 0: step 0 is the base model
    only_attn = lora_lib.add_lora(base(), 4, 8, 0.0, ["self_attn"])
    assert {n.split(".lora_")[0] for n, p in only_attn.named_parameters() if p.requires_grad} == {
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"}  # fmt: skip
    regex = lora_lib.add_lora(base(), 4, 8, 0.0, [r"blocks\.1\.mlp\.fc1"])
    assert [n for n, p in regex.named_parameters() if p.requires_grad] == [
        "blocks.1.mlp.fc1.lora_A.default.weight", "blocks.1.mlp.fc1.lora_B.default.weight"]  # fmt: skip


def test_targets_that_match_nothing_or_bad_settings_are_named():
    with pytest.raises(LoraError, match=r"lora target 'blocks\\.9\\.attn' matches no Linear layer.*blocks.0.attn.qkv"):
        lora_lib.add_lora(base(), 4, 8, 0.0, [r"blocks\.9\.attn"])
    with pytest.raises(LoraError, match="'cross_attn' matches no Linear layer"):
        lora_lib.add_lora(base(condition="none"), 4, 8, 0.0, ["cross_attn"])
    with pytest.raises(LoraError, match="not a valid regex"):
        lora_lib.add_lora(base(), 4, 8, 0.0, ["blocks.(("])
    with pytest.raises(LoraError, match="rank >= 1"):
        lora_lib.lora_settings(rank=0)
    assert lora_lib.lora_settings()["targets"] == ["self_attn", "cross_attn", "mlp"]


def adapter_file(tmp_path, model_seed: int = 0, **kw):
    model = base(model_seed, **kw)
    identity = lora_lib.base_identity(model, {**ARGS, **kw}, "base.ckpt")
    lora_lib.add_lora(model, 4, 8, 0.0, ["self_attn", "cross_attn", "mlp"])
    trained_adapter(model)
    path = lora_lib.save_adapter(tmp_path / "adapter.safetensors", model, lora_lib.lora_settings(4, 8), identity)
    return path, model


def test_adapter_save_load_merge_match_the_trained_model(tmp_path):
    path, trained = adapter_file(tmp_path)
    assert path.stat().st_size < 100_000  # adapters only, not the base
    want = run(trained)
    assert not torch.allclose(want, run(base()))  # the adapter changes the output
    loaded = base()
    meta = lora_lib.load_adapter(path, loaded, dict(ARGS))
    assert meta["base_source"] == "base.ckpt" and meta["lora"]["rank"] == 4
    torch.testing.assert_close(run(loaded), want)  # unmerged
    merged = lora_lib.merge_lora(loaded)
    assert not lora_lib.has_lora(merged) and set(merged.state_dict()) == set(base().state_dict())
    torch.testing.assert_close(run(merged), want, rtol=1e-4, atol=1e-5)  # merged
    # The state of a LoRA-wrapped model (a LoRA run's checkpoint) merges to the same plain weights.
    state = lora_lib.merged_state(trained.state_dict(), dict(ARGS), lora_lib.lora_settings(4, 8))
    plain = VideoDiT(**ARGS)
    plain.load_state_dict(state)
    torch.testing.assert_close(run(plain), want, rtol=1e-4, atol=1e-5)


def test_scale_blends_between_base_and_adapter(tmp_path):
    path, trained = adapter_file(tmp_path)
    zero, half = base(), base()
    lora_lib.load_adapter(path, zero, dict(ARGS), scale=0.0)
    lora_lib.load_adapter(path, half, dict(ARGS), scale=0.5)
    torch.testing.assert_close(run(zero), run(base()))
    full = run(trained)
    assert (run(half) - run(base())).norm() < (full - run(base())).norm()
    assert not torch.allclose(run(half), full)


def test_mismatched_bases_and_non_adapters_are_refused(tmp_path):
    path, _ = adapter_file(tmp_path)
    with pytest.raises(LoraError, match=r"different base architecture: hidden_size: adapter's base 32, this model 64"):
        lora_lib.load_adapter(path, base(hidden_size=64), {**ARGS, "hidden_size": 64})
    with pytest.warns(UserWarning, match="base weights differ from those the adapter was trained on"):
        lora_lib.load_adapter(path, base(seed=5), dict(ARGS))
    # grad checkpointing is a runtime switch, not architecture
    lora_lib.load_adapter(path, base(grad_checkpointing=True), {**ARGS, "grad_checkpointing": True})

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(LoraError, match="junk.safetensors: not a LoRA adapter"):
        lora_lib.read_adapter(junk)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "minisora-dit-1"})
    with pytest.raises(LoraError, match="not a minisora LoRA adapter \\(format 'minisora-dit-1'"):
        lora_lib.read_adapter(other)
    with pytest.raises(LoraError, match="no such adapter file"):
        lora_lib.read_adapter(tmp_path / "missing.safetensors")


def test_lit_module_trains_only_the_adapters_with_adamw8bit():
    model = lora_lib.add_lora(base(), 4, 8, 0.0, ["self_attn", "cross_attn"])
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lit = LitVideoDiT(model, null_context=torch.zeros(5, 32), null_mask=torch.ones(5, dtype=torch.bool),
                      optimizer="adamw8bit", lr=1e-2, warmup_steps=1)  # fmt: skip
    opt = lit.configure_optimizers()["optimizer"]
    assert type(opt).__name__ == "AdamW8bit"
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == 2 * 5 * 2 and all(p.requires_grad for p in params)
    x, t, ctx, mask = inputs()
    loss = model(x, t, context=ctx, context_mask=mask).pow(2).mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert p.grad is None and torch.equal(p, frozen_before[n]), n


def test_text_encoder_lora_trains_through_the_encoder():
    text = TextEncoder(model_name="tiny", width=32, layers=1, heads=1, context_length=8)
    before, _ = text(["a red circle moving left"])
    lora_lib.add_lora(text, 4, 8, 0.0, [lora_lib.TEXT_TARGETS], where="text encoder")
    names = [n for n, p in text.named_parameters() if p.requires_grad]
    assert names and all(".mlp.c_" in n and "lora_" in n for n in names)
    emb, _ = text(["a red circle moving left"])
    torch.testing.assert_close(emb.detach(), before)
    emb.pow(2).mean().backward()
    assert all(p.grad is not None for p in text.parameters() if p.requires_grad)
    null, _ = text.null_embedding()
    assert not null.requires_grad
