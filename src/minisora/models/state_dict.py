"""Comparing a state dict with a model: which tensors are missing, unexpected or of the wrong shape.

Shared by the autoencoder loader and the DiT checkpoint loader, so both name the same things when
weights do not fit a config.
"""

from __future__ import annotations

import torch


def _listing(title: str, items: list[str]) -> str:
    shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
    return f"  {title} ({len(items)}): " + ", ".join(shown)


def mismatch_report(state: dict[str, torch.Tensor], model: torch.nn.Module, found: str = "file") -> list[str]:
    """One line per kind of mismatch (shape, missing, unexpected), each naming up to 20 tensors; [] if `state` fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: {found} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    kinds = (("shape mismatch", wrong), (f"missing in {found}", missing), ("unexpected", unexpected))
    return [_listing(title, items) for title, items in kinds if items]
