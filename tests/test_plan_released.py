"""The released-model planner against live tiny models of the real classes (tests/released_folders.py): saved
activations against autograd's saved tensors, FLOPs against FlopCounterMode, parameter counts against the
models; then the memory arithmetic, the command and its errors."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import released_folders as rf
from minisora import plan_released as PR
from minisora.cli import main
from minisora.plan import GIB

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {family: rf.build_folder(root, family) for family in rf.FAMILIES}


def _denoiser(folder, mode: str = "full", rank: int = 4):
    """The folder's transformer as the trainer holds it, in train mode: "full" bf16 weights, "master" fp32 weights,
    "lora" fp32 adapters of `rank` on a frozen bf16 base (load_released keeps RoPE, time embedder, norms in fp32)."""
    from minisora.models.lora_formats import add_released_lora
    from minisora.models.released import load_released

    den = load_released(folder, dtype="float32" if mode == "master" else "bfloat16", vae=False, text=False).denoiser
    den.train()
    if mode != "lora":
        return den.requires_grad_(True)
    add_released_lora(den, rank=rank, alpha=rank)
    for name, p in den.named_parameters():
        if "lora_" in name:  # the trainer's fp32 adapters (peft makes them bf16 on a bf16 base)
            p.data = p.data.float()
    return den


def _latent(family: str, t: int) -> torch.Tensor:
    C = {"wan21": 16, "wan22": 48, "ltx": 8}[family]
    side = 8 if family == "ltx" else 16  # 8x8 tokens a frame either way (Wan's patch is 2x2)
    return torch.randn(1, C, t, side, side)


def _measure_block(den, family: str, t: int, lora: bool, text_tokens: int) -> int:
    """Bytes autograd saves in the first block (parameters and the block's shared inputs excluded)."""
    transformer = den.transformer
    block = (transformer.blocks if family != "ltx" else transformer.transformer_blocks)[0]
    got = {}
    hook = block.register_forward_pre_hook(lambda m, a, k: got.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        den(_latent(family, t), torch.tensor([0.5]), torch.randn(1, text_tokens, rf.TEXT_DIM))
    hook.remove()

    def detach(v, grad: bool):
        if isinstance(v, tuple):
            return tuple(detach(u, grad) for u in v)
        if not torch.is_tensor(v):
            return v
        v = v.detach().clone()
        return v.requires_grad_(grad) if v.is_floating_point() else v

    # the residual stream always needs gradients; the text and timestep embeddings only when they train (full)
    args = [detach(a, i == 0 or not lora) for i, a in enumerate(got["args"])]
    kwargs = {k: detach(v, k == "hidden_states" or (not lora and k in ("encoder_hidden_states", "temb")))
              for k, v in got["kwargs"].items()}  # fmt: skip
    skip = {p.untyped_storage().data_ptr() for p in den.parameters()}
    shared = [*args[1:], *[v for k, v in kwargs.items() if k != "hidden_states"]]
    for v in shared:  # counted once per model by shared_bytes, not per block
        for u in v if isinstance(v, tuple) else (v,):
            if torch.is_tensor(u):
                skip.add(u.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        key = x.untyped_storage().data_ptr()
        if key not in skip:
            seen[key] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        block(*args, **kwargs)
    return sum(seen.values())


@pytest.mark.parametrize("family", rf.FAMILIES)
@pytest.mark.parametrize("mode", PR.MODES)
def test_saved_activations_match_autograd(folders, family, mode):
    su = PR.load_released_setup(folders[family], lora_rank=4)
    den = _denoiser(folders[family], mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed, as the trainer runs on a GPU
        measured = [_measure_block(den, family, t, mode == "lora", su.text_tokens) for t in (2, 4)]  # 128, 256 tokens
    predicted = [PR.block_saved_bytes(su, 64 * t, mode) for t in (2, 4)]
    # per video token: exact; in all, within 2% (small per-sample tensors, the modulation vectors, are not counted)
    assert predicted[1] - predicted[0] == measured[1] - measured[0]
    for m, p in zip(measured, predicted):
        assert p == pytest.approx(m, rel=0.02), f"{family} {mode}: measured {measured}, predicted {predicted}"


@pytest.mark.parametrize("family", rf.FAMILIES)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_whole_transformer_saved_bytes(folders, family, mode):
    """A whole forward without checkpointing: depth x block_saved_bytes + the shared tensors, within 10%. The rest
    is the embedders and output layer (not modelled: a few D-wide tensors per token against ~80 in each of the 2
    blocks here, under 1% with 30 blocks) and the 512 text tokens' projection, large only beside tiny models."""
    su = PR.load_released_setup(folders[family], lora_rank=4)
    den = _denoiser(folders[family], mode)
    skip = {p.untyped_storage().data_ptr() for p in den.parameters()}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if (key := x.untyped_storage().data_ptr()) not in skip:
            seen[key] = x.untyped_storage().nbytes()
        return x

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        den(_latent(family, 8), torch.tensor([0.5]), torch.randn(1, su.text_tokens, rf.TEXT_DIM))
    tokens = 8 * 64
    predicted = su.depth * PR.block_saved_bytes(su, tokens, mode) + PR.shared_bytes(su, tokens)
    assert predicted == pytest.approx(sum(seen.values()), rel=0.1)


@pytest.mark.parametrize("family", rf.FAMILIES)
def test_forward_flops_match_flop_counter(folders, family):
    from torch.utils.flop_counter import FlopCounterMode

    su = PR.load_released_setup(folders[family])
    den = _denoiser(folders[family], "master")
    # the math SDPA backend is bmm calls FlopCounterMode counts; it does not count the CPU flash kernel
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        den(_latent(family, 3), torch.tensor([0.5]), torch.randn(1, su.text_tokens, rf.TEXT_DIM))
    assert PR.released_forward_flops(su, 3 * 64)["total"] == counter.get_total_flops()


def test_full_step_flops_match_flop_counter(folders):
    """Forward + backward of a full fine-tune: 3 x forward, within what the input-gradient-free layers save."""
    from torch.utils.flop_counter import FlopCounterMode

    su = PR.load_released_setup(folders["wan21"])
    den = _denoiser(folders["wan21"], "master")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        v = den(_latent("wan21", 3), torch.tensor([0.5]), torch.randn(1, su.text_tokens, rf.TEXT_DIM))
        v.square().mean().backward()
    predicted = PR.released_step_flops(su, 3 * 64, lora=False, checkpointing=False)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_parameter_counts(folders):
    from minisora.models.quantized import BLOCK_LINEARS, quantize_int8, weight_bytes

    for family in rf.FAMILIES:
        su = PR.load_released_setup(folders[family], lora_rank=4)
        den = _denoiser(folders[family], "lora", 4)
        assert su.params == sum(p.numel() for n, p in den.transformer.named_parameters() if "lora_" not in n)
        assert su.lora_params == sum(p.numel() for p in den.parameters() if p.requires_grad)
        text = rf.text_encoder("t5" if family == "ltx" else "umt5", 0)
        assert su.text_params == sum(p.numel() for p in text.parameters())
    den = _denoiser(folders["wan21"], "master")
    su = PR.load_released_setup(folders["wan21"])
    int8 = quantize_int8(den.transformer, BLOCK_LINEARS)
    # int8 weights (1 B) + everything else in fp32 here; the planner's bf16 rest is half of that
    assert weight_bytes(int8) == su.int8_params + 4 * (su.params - su.int8_params)


def test_training_components_by_hand(folders):
    su = PR.load_released_setup(folders["wan21"], lora_rank=4)
    n = 256
    lora = PR.released_training_peak(su, n, lora=True, adamw8bit=False, checkpointing=True)
    assert lora["transformer weights (bf16)"] == 2 * su.params and lora["optimizer state"] == 8 * su.lora_params
    assert lora["activations"] == su.depth * n * su.hidden * 2 + PR.block_saved_bytes(su, n, "lora")
    assert lora["total"] == pytest.approx(sum(v for k, v in lora.items() if k != "total"))
    int8 = PR.released_training_peak(su, n, lora=True, int8=True, adamw8bit=False, checkpointing=True)
    assert lora["total"] - int8["total"] == pytest.approx(su.int8_params - 4 * su.int8_rows)
    no_ckpt = PR.released_training_peak(su, n, lora=True, adamw8bit=False, checkpointing=False)
    assert no_ckpt["activations"] == su.depth * PR.block_saved_bytes(su, n, "lora")
    full = PR.released_training_peak(su, n, lora=False, adamw8bit=True, master=True, checkpointing=True)
    assert full["fp32 master weights"] == 4 * su.params
    bf16 = PR.released_training_peak(su, n, lora=False, adamw8bit=True, master=False, checkpointing=True)
    assert full["total"] > bf16["total"] + 2 * su.params  # fp32 weights and gradients instead of bf16
    assert full["optimizer state"] == pytest.approx(PR.ADAMW8BIT_BYTES * su.params)
    with pytest.raises(ValueError, match="int8 base is frozen"):
        PR.released_training_peak(su, n, lora=False, int8=True, adamw8bit=True, checkpointing=True)


def test_presets_and_the_table():
    su = PR.load_released_setup("ltx-video-2b", lora_rank=16)
    assert su.params / 1e9 == pytest.approx(1.92, abs=0.01) and (su.kt, su.s, su.latent_channels) == (8, 32, 128)
    assert 2 * su.text_params / GIB == pytest.approx(8.9, abs=0.05)  # T5-XXL in bf16 (DESIGN.md)
    assert 2 * PR.t5_params(PR.UMT5_XXL) / GIB == pytest.approx(10.6, abs=0.05)  # umT5-XXL
    wan = PR.load_released_setup("wan2.1-t2v-1.3b")  # DESIGN.md: 1.42 B parameters, VAE 4x8x8, 16 channels
    assert wan.params / 1e9 == pytest.approx(1.42, abs=0.005) and (wan.kt, wan.s, wan.latent_channels) == (4, 8, 16)
    res = PR.plan_released("ltx-video-2b", 49, 512, 768, lora_rank=16)
    assert res["latent"] == [128, 7, 16, 24] and res["tokens"] == 2688
    assert res["training"]["cheapest"]["switches"] == {"adamw8bit": False, "int8": False, "checkpointing": False}


def test_cli(capsys, folders):
    assert main(["plan", "--pretrained", "ltx-video-2b", "--frames", "49", "--height", "512", "--width", "768"]) == 0
    out = capsys.readouterr().out
    assert "2,688 tokens" in out and "Training: fits 24 GiB with" in out and "computed" in out
    assert main(["plan", "--pretrained", "ltx-video-2b", "--frames", "49", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["family"] == "ltx"
    assert main(["plan", "--pretrained", str(folders["wan22"]), "--frames", "9", "--height", "64", "--width", "64",
                 "--lora-rank", "0"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "latent 48x3x4x4 -> 3x2x2 = 12 tokens" in out and "one timestep per token" in out and "full fine-tune" in out
    for argv, message in ((["--pretrained", "nowhere/model"], "neither a preset"),
                          (["--released-table", "--lora-rank", "0"], "must be >= 1"),
                          (["--released-table", "--tokens"], "give one of"),
                          (["--pretrained", "ltx-video-2b", "--lora-targets", "mlp"], "not for a released model"),
                          (["--pretrained", "ltx-video-2b", "--frames", "0"], "--frames must be positive"),
                          ):  # fmt: skip
        assert main(["plan", *argv]) == 2
        assert message in capsys.readouterr().err


def test_released_table(capsys, monkeypatch):
    from minisora import plan_released_report as RR

    monkeypatch.setattr(RR, "TABLE_CLIPS", (("ltx-video-2b", 49, 512, 768),))  # the other presets: docs/benchmarks.md
    assert main(["plan", "--released-table"]) == 0
    out = capsys.readouterr().out
    assert "| ltx-video-2b 49x512x768 | 2,688 | LoRA r32, bf16 base, AdamW8bit (lora.yaml) |" in out
    assert "ASSUMED MFU" in out
    rows = RR.released_table()
    assert [r["mode"] for r in rows] == [m.format(rank=32) for m, _ in RR.TABLE_MODES]
    lora, int8, full, master = rows
    assert int8["gib_ckpt"] < lora["gib_ckpt"] < full["gib_ckpt"] < master["gib_ckpt"]
    assert all(r["gib_ckpt"] <= r["gib_no_ckpt"] for r in rows)
