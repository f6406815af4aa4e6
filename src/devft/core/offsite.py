"""Offsite-tuning's split of the layers (Xiao et al., 2023) as a stage's groups.

The L layers split into a bottom adapter (layers 0..k_b−1), a top adapter (the last k_t) and
the middle. The middle becomes a frozen *emulator* by uniform layer drop: `keep` evenly spaced
middle layers stay, the rest are dropped (Offsite-tuning's choice; no distillation here).
Every submodel layer is one real layer of the full model, so the adapters' LoRA goes back
into the same layers exactly (singleton groups, `copy` transfer). The emulator layers carry
no trained or sent LoRA: they are the submodel's *frozen* layers (StagePlan.frozen).
"""

from __future__ import annotations

import numpy as np

from devft.core.grouping import Groups
from devft.errors import ConfigError


def emulator_size(middle: int, fraction: float, count: int = 0) -> int:
    """Middle layers the emulator keeps: `count` if positive, else round(fraction · middle),
    at least one while the middle is not empty."""
    if middle <= 0:
        return 0
    keep = count if count > 0 else int(round(fraction * middle))
    return min(middle, max(1, keep))


def kept_middle(num_layers: int, k_bottom: int, k_top: int, keep: int) -> list[int]:
    """`keep` evenly spaced layers of the middle k_b..L−k_t−1 (first and last middle included
    when keep ≥ 2)."""
    middle = list(range(k_bottom, num_layers - k_top))
    if keep <= 0 or not middle:
        return []
    picks = np.linspace(0, len(middle) - 1, keep)
    return sorted({middle[int(round(x))] for x in picks})


def offsite_groups(num_layers: int, k_bottom: int, k_top: int, fraction: float,
                   count: int = 0) -> tuple[Groups, tuple[int, ...]]:
    """(singleton groups: bottom adapter, emulator, top adapter; submodel indices of the
    emulator's layers, i.e. the frozen ones)."""
    if k_bottom + k_top >= num_layers:
        raise ConfigError("offsite.k_top", k_top,
                          f"offsite.k_bottom + offsite.k_top < the model's depth ({num_layers}),"
                          f" so that a middle remains for the emulator (k_bottom={k_bottom})")
    middle = num_layers - k_bottom - k_top
    emulator = kept_middle(num_layers, k_bottom, k_top, emulator_size(middle, fraction, count))
    layers = list(range(k_bottom)) + emulator + list(range(num_layers - k_top, num_layers))
    frozen = tuple(range(k_bottom, k_bottom + len(emulator)))
    return [[i] for i in layers], frozen


def adapter_layers(groups: Groups, frozen: tuple[int, ...]) -> list[int]:
    """Full-model layers whose LoRA the stage trains (the groups not frozen)."""
    return [j for n, g in enumerate(groups) if n not in frozen for j in g]
