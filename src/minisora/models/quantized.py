"""A frozen base in 8 bits for LoRA on the larger released models: bitsandbytes' Linear8bitLt.

Why bitsandbytes: torchao is not installable in this environment; bitsandbytes is already a dependency (AdamW8bit),
its Linear8bitLt keeps int8 weights with one scale per output row (LLM.int8, Dettmers et al. 2022), runs on
CPU in bnb 0.50 (measured on a 1536 x 1536 layer: relative error 0.39%, the same as weight-only int8 with
per-row scales, at the fp32 speed) and on CUDA with int8 matmuls, and peft puts LoRA layers on top of it.
A 5 B-parameter transformer (Wan2.2 TI2V) then holds ~5 GiB of weights instead of 10 GiB in bf16.

Only the Linear layers inside the transformer blocks are quantized (default): they hold nearly all the weights,
while the timestep/text embedders and the output projection stay in full precision (diffusers also keeps Wan's
time embedder in fp32). The quantized layers are frozen: train LoRA on top; merging a LoRA into them is refused.
"""

from __future__ import annotations

import re

from torch import nn

BLOCK_LINEARS = r"(transformer_)?blocks\.\d+\..+"  # Wan's blocks.N..., LTX-Video's transformer_blocks.N...


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"an 8-bit base needs bitsandbytes (pip install bitsandbytes); import failed: {e}") from None
    return bnb


def quantize_int8(model: nn.Module, targets: str = BLOCK_LINEARS, threshold: float = 6.0) -> nn.Module:
    """Replace the nn.Linear layers of `model` whose names fully match `targets` by frozen int8 Linear8bitLt (in place).

    threshold: LLM.int8's outlier threshold on CUDA (activation columns above it run in 16 bits; 0 = all int8).
    Call before adding LoRA; returns `model`.
    """
    bnb = _bnb()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    if not names:
        raise ValueError(f"quantize_int8: targets {targets!r} match no Linear layer of {type(model).__name__}")
    for name in names:
        linear = model.get_submodule(name)
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)  # fmt: skip
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        q = q.to(linear.weight.device)  # Int8Params quantizes when it moves to its device
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def is_int8(model: nn.Module) -> bool:
    """True if `model` holds Linear8bitLt layers (a LoRA must then stay separate: merging corrupts int8 weights)."""
    try:
        bnb = _bnb()
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters of `model` (int8 weights count 1 byte each; their scales are not parameters)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_mergeable(model: nn.Module) -> None:
    """Refuse to merge a LoRA into an int8 base (peft would add a float update to int8 weights)."""
    if is_int8(model):
        raise ValueError("cannot merge a LoRA into an 8-bit base: keep the adapter separate, or load the base in "
                         "bfloat16/float32 to merge")  # fmt: skip

