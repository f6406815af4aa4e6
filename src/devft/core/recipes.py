"""Stage recipes: which original layers each submodel layer stands for.

- `spectral`: DevFT's deconfliction-guided grouping on a layer-similarity matrix;
- `contiguous`: k contiguous groups of equal size (the paper's "EVEN" ablation);
- `random`: a seeded random partition into k non-empty groups (the paper's random ablation);
- `prefix`: the first k layers, one each (ProgFed-style growth; later layers untrained);
- `layerdrop`: k evenly spaced layers, one each (LayerDrop-style submodel, no fusion).
Every recipe gives the identity grouping when k equals the depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from devft.core.grouping import Groups, Laplacian, contiguous_groups, group_layers

Recipe = Literal["spectral", "contiguous", "random", "prefix", "layerdrop"]
RECIPES: tuple[str, ...] = ("spectral", "contiguous", "random", "prefix", "layerdrop")
FUSING_RECIPES: tuple[str, ...] = ("spectral", "contiguous", "random")
"""Recipes whose groups have several layers (the others train single real layers)."""


def random_groups(num_layers: int, k: int, seed: int) -> Groups:
    """A seeded random partition of range(L) into k non-empty groups of near-equal size."""
    perm = np.random.default_rng(seed).permutation(num_layers).tolist()
    bounds = np.linspace(0, num_layers, k + 1).round().astype(int)
    groups = [sorted(perm[a:b]) for a, b in zip(bounds, bounds[1:])]
    return sorted(groups, key=lambda g: g[0])


def evenly_spaced(num_layers: int, k: int) -> list[int]:
    """k distinct layer indices spread evenly from the first to the last layer."""
    return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, k)})


def stage_groups(recipe: Recipe, num_layers: int, k: int,
                 similarity: Callable[[], np.ndarray], laplacian: Laplacian = "normalized",
                 seed: int = 0) -> Groups:
    """The groups of a k-layer stage; `similarity` is called only by the spectral recipe."""
    if k == num_layers:
        return [[i] for i in range(num_layers)]
    if recipe == "spectral":
        return group_layers(similarity(), k, laplacian, seed=seed)
    if recipe == "contiguous":
        return contiguous_groups(num_layers, k)
    if recipe == "random":
        return random_groups(num_layers, k, seed + k)
    if recipe == "prefix":
        return [[i] for i in range(k)]
    if recipe == "layerdrop":
        return [[i] for i in evenly_spaced(num_layers, k)]
    raise ValueError(f"unknown stage recipe {recipe!r}")
