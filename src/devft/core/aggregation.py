"""Aggregation rules for client LoRA updates (pure functions on state dicts)."""

from __future__ import annotations

import torch

from devft.core.layerstate import StateDict


def normalized_weights(weights: list[float]) -> list[float]:
    if any(w < 0 for w in weights):
        raise ValueError(f"aggregation weights must be >= 0 (not negative), got {weights}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {weights}")
    return [float(w) / total for w in weights]


def bounded_shares(weights: list[float], max_share: float) -> list[float]:
    """Normalized weights with no share above `max_share`: each share over the bound is
    clipped to it and the excess spread over the others in proportion to their weights
    (repeated until none exceeds it). Uniform when k clients cannot respect the bound
    (k · max_share <= 1)."""
    p = normalized_weights(weights)
    k = len(p)
    if k * max_share <= 1:
        return [1.0 / k] * k
    capped: set[int] = set()
    while True:
        free = [i for i in range(k) if i not in capped]
        rest = 1.0 - max_share * len(capped)
        mass = sum(p[i] for i in free)
        shares = [max_share if i in capped else
                  (p[i] / mass * rest if mass > 0 else rest / len(free)) for i in range(k)]
        over = {i for i in free if shares[i] > max_share + 1e-12}
        if not over:
            return shares
        capped |= over


def weighted_mean(states: list[StateDict], weights: list[float]) -> StateDict:
    """Σ_k p_k · state_k per key with p_k = w_k / Σ w (FedAvg; computed in float32, or in
    float64 for float64 tensors)."""
    if not states:
        raise ValueError("no client states to aggregate")
    if len(weights) != len(states):
        raise ValueError(f"got {len(weights)} aggregation weights for {len(states)} client states")
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(f"client {i} sent keys that differ from client 0's")
    p = normalized_weights(weights)
    out: StateDict = {}
    for key, first in states[0].items():
        compute = torch.promote_types(first.dtype, torch.float32)
        acc = torch.zeros_like(first, dtype=compute)
        for pk, state in zip(p, states):
            acc.add_(state[key].to(compute), alpha=pk)
        out[key] = acc.to(first.dtype)
    return out


def fedavg(states: list[StateDict], weights: list[float]) -> StateDict:
    """FedIT's rule: weighted mean of A and of B, separately (inexact for the product B·A)."""
    return weighted_mean(states, weights)
