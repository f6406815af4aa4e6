"""Differential-based layer fusion (DevFT paper, Sec. "DBLF"; devft_paper.md §3, §7.5-7.7).

For a group g with anchor a (its lowest layer):

    fused = θ_a + β · Σ_{j ∈ g} (θ_j − θ_a) = (1 − β(|g|−1)) · θ_a + β · Σ_{j ∈ g, j ≠ a} θ_j

applied element-wise to every tensor of the layer (base weights, norms, LoRA A and B alike;
the initial LoRA of never-trained groups is the exception, see core/initial_adapter.py).
Ablation variants replace the coefficients: `anchor` keeps the anchor alone (R-ONE),
`average` gives every layer 1/|g|.

A negative anchor coefficient. 1 − β(|g|−1) < 0 happens when β > 1/(|g|−1), e.g. the paper's
13B setting (β = 0.15) with groups of 8 or more. The formula then extrapolates past the
anchor: it subtracts the anchor from the sum of the others. devft's one rule, applied by the
same `fusion_coefficients` on the server (LoRA) and on every client (base weights and norm
gains), is to *clamp*: such a group uses β_g = 1/(|g|−1), the largest β whose anchor
coefficient is ≥ 0 (the anchor gets 0, each other layer 1/(|g|−1)); the coefficients still
sum to 1. The server logs a warning per clamped group and records it in the stage's metrics
(`clamped_groups`). What can be known before training, a β that even groups of an explicit
or doubling stage schedule would already clamp, is refused by the config check instead
(`check_beta_for_stages`).

Residual scale (`devft-calibrated`, calibrate.residual_exponents; not in the paper). A fused
layer stands for |g| residual blocks but adds one block's output to the residual stream; the
fused layer's output projections (attention out, MLP down) can be scaled by |g|^γ to restore
the magnitude. γ = 0 (the default) is the paper's fusion; only base weights are scaled, never
the LoRA, so what is transferred back to the real layers is unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from devft.core.grouping import Groups
from devft.core.layerstate import LayerStates, StateDict
from devft.errors import ConfigError

log = logging.getLogger(__name__)

FusionVariant = Literal["differential", "anchor", "average"]


def effective_beta(group_size: int, beta: float) -> float:
    """β for a group of this size after the clamp: min(β, 1/(|g|−1))."""
    return beta if group_size < 2 else min(beta, 1.0 / (group_size - 1))


def residual_scale(group_size: int, exponent: float) -> float:
    """|g|^γ for a fused layer's output projections; 1 for a one-layer group or γ = 0."""
    return 1.0 if group_size < 2 or exponent == 0.0 else float(group_size) ** exponent


def fusion_coefficients(
    group_size: int, beta: float, variant: FusionVariant = "differential"
) -> list[float]:
    """Coefficient of each layer of a group, anchor first; they always sum to 1 and are ≥ 0
    (differential fusion clamps β per group, see the module docstring)."""
    if variant == "differential":
        b = effective_beta(group_size, beta)
        return [max(0.0, 1.0 - b * (group_size - 1))] + [b] * (group_size - 1)
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

    A one-layer group gives that layer's tensors unchanged (cloned). Logs a warning for each
    group whose β is clamped (see `clamped_groups`).
    """
    fused: LayerStates = {}
    for clamp in clamped_groups(groups, beta, variant):
        log.warning(
            "group %s: anchor coefficient 1 - beta*(|g|-1) = %.2f would be negative "
            "(beta=%g, |g|=%d); clamped to beta=%.4f for this group",
            clamp["group"], 1.0 - beta * (clamp["size"] - 1), beta, clamp["size"],
            clamp["beta"],
        )
    for n, group in enumerate(groups):
        coeffs = fusion_coefficients(len(group), beta, variant)
        fused[n] = fuse_group([layers[i] for i in group], coeffs)
    return fused


def clamped_groups(groups: Groups, beta: float,
                   variant: FusionVariant = "differential") -> list[dict[str, object]]:
    """The groups whose β is clamped: [{"group", "size", "beta"}] (β = the one applied)."""
    if variant != "differential":
        return []
    return [{"group": list(g), "size": len(g), "beta": effective_beta(len(g), beta)}
            for g in groups if effective_beta(len(g), beta) < beta]


def check_beta_for_stages(depth: int, stages: list[int], beta: float) -> None:
    """Refuse a β that the even groups of some stage (⌈L/L_s⌉ layers) would clamp."""
    for count in stages:
        size = math.ceil(depth / count)
        if effective_beta(size, beta) < beta:
            raise ConfigError(
                "devft.beta", beta,
                f"at most 1/(|g|-1) = {1.0 / (size - 1):.4g}: the {count}-layer stage of this "
                f"{depth}-layer model has groups of about {size} layers, whose anchor "
                "coefficient 1 - beta*(|g|-1) would be negative; lower devft.beta or use "
                "smaller groups (more layers in the first stages)")
