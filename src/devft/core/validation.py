"""Checks on a client's update before it may be aggregated (pure; no flwr, no model)."""

from __future__ import annotations

import math

import torch

from devft.core.layerstate import StateDict


def check_update(update: StateDict, expected: dict[str, tuple[int, ...]],
                 max_norm: float) -> str | None:
    """None if `update` is acceptable, else the reason it must be rejected.

    Rejects missing or extra keys, wrong shapes, NaN/Inf values, and a total L2 norm above
    `max_norm` (an implausibly large update, e.g. a scaled or corrupted one).
    """
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing:
        return f"{len(missing)} missing tensor(s), e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}"
    total = 0.0
    for key, value in update.items():
        if tuple(value.shape) != tuple(expected[key]):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key])}"
        if not bool(torch.isfinite(value).all()):
            return f"{key} contains NaN or Inf"
        total += float(value.double().pow(2).sum())
    norm = math.sqrt(total)
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds federation.max_update_norm={max_norm:g}"
    return None
