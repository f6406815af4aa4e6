"""Differential-based layer fusion (DevFT paper, Sec. "DBLF"; devft_paper.md §3, §7.5-7.7).

For a group g with anchor a (its lowest layer):

    fused = θ_a + β · Σ_{j ∈ g} (θ_j − θ_a) = (1 − β(|g|−1)) · θ_a + β · Σ_{j ∈ g, j ≠ a} θ_j

applied element-wise to every tensor of the layer (base weights, norms, LoRA A and B alike).
Ablation variants replace the coefficients: `anchor` keeps the anchor alone (R-ONE),
`average` gives every layer 1/|g|.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from devft.core.grouping import Groups
from devft.core.layerstate import LayerStates, StateDict

log = logging.getLogger(__name__)

FusionVariant = Literal["differential", "anchor", "average"]


def fusion_coefficients(
    group_size: int, beta: float, variant: FusionVariant = "differential"
) -> list[float]:
    """Coefficient of each layer of a group, anchor first; they always sum to 1."""
    if variant == "differential":
        return [1.0 - beta * (group_size - 1)] + [beta] * (group_size - 1)
    if variant == "anchor":
        return [1.0] + [0.0] * (group_size - 1)
    if variant == "average":
        return [1.0 / group_size] * group_size
    raise ValueError(f"unknown fusion variant {variant!r}")


def fuse_group(states: list[StateDict], coefficients: list[float]) -> StateDict:
    """Σ_i c_i · states[i], per key, cast back to each tensor's dtype.

    Computed in float32 (float64 tensors in float64, so a one-layer group stays exact);
    non-float tensors are copied from the first (anchor) state.
    """
    if len(coefficients) != len(states):
        raise ValueError(f"got {len(coefficients)} fusion coefficients for {len(states)} layers")
    out: StateDict = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        compute = torch.promote_types(first.dtype, torch.float32)
        acc = torch.zeros_like(first, dtype=compute)
        for coeff, state in zip(coefficients, states):
            if coeff != 0.0:
                acc.add_(state[key].to(compute), alpha=coeff)
        out[key] = acc.to(first.dtype)
    return out


def fuse_layers(
    layers: LayerStates, groups: Groups, beta: float, variant: FusionVariant = "differential"
) -> LayerStates:
    """One fused layer state per group, indexed 0..G-1 in group order.

    A one-layer group gives that layer's tensors unchanged (cloned). Logs a warning when the
    anchor's coefficient 1 − β(|g|−1) is negative (large groups with large β).
    """
    fused: LayerStates = {}
    for n, group in enumerate(groups):
        coeffs = fusion_coefficients(len(group), beta, variant)
        if coeffs[0] < 0:
            log.warning(
                "group %s: anchor coefficient 1 - beta*(|g|-1) = %.2f is negative "
                "(beta=%g, |g|=%d)",
                group,
                coeffs[0],
                beta,
                len(group),
            )
        fused[n] = fuse_group([layers[i] for i in group], coeffs)
    return fused
