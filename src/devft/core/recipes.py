"""Stage recipes: which original layers each submodel layer stands for.

- `spectral`: DevFT's deconfliction-guided grouping on a layer-similarity matrix;
- `contiguous`: k contiguous groups of equal size (the paper's "EVEN" ablation);
- `random`: a seeded random partition into k non-empty groups (the paper's random ablation);
- `prefix`: the first k layers, one each (ProgFed-style growth; later layers untrained);
- `layerdrop`: k evenly spaced layers, one each (LayerDrop-style submodel, no fusion);
- `boundary`: the first `bottom` and last `top` layers are singletons, the middle is grouped
  spectrally into the remaining k − bottom − top groups (devft-boundary, devft+offsite).
Every recipe gives the identity grouping when k equals the depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from devft.core.grouping import Groups, Laplacian, contiguous_groups, group_layers
from devft.errors import ConfigError

Recipe = Literal["spectral", "contiguous", "random", "prefix", "layerdrop", "boundary",
                 "offsite"]
RECIPES: tuple[str, ...] = ("spectral", "contiguous", "random", "prefix", "layerdrop",
                            "boundary", "offsite")
FUSING_RECIPES: tuple[str, ...] = ("spectral", "contiguous", "random", "boundary")
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


def boundary_groups(num_layers: int, k: int, bottom: int, top: int,
                    middle: Callable[[int, int], Groups]) -> Groups:
    """k groups: layers 0..bottom−1 and L−top..L−1 one each, and `middle(M, k')` grouping the
    M = L − bottom − top middle layers (numbered 0..M−1) into k' = k − bottom − top groups."""
    inner = num_layers - bottom - top
    k_inner = k - bottom - top
    if inner < 0 or k_inner < (1 if inner else 0) or k_inner > inner:
        raise ValueError(f"a {k}-group stage of {num_layers} layers cannot keep {bottom} "
                         f"bottom and {top} top layers as singletons")
    head = [[i] for i in range(bottom)]
    tail = [[i] for i in range(num_layers - top, num_layers)]
    mid = [[bottom + i for i in g] for g in middle(inner, k_inner)] if inner else []
    return head + mid + tail


def check_boundary_stages(num_layers: int, stages: list[int], bottom: int, top: int,
                          field: str) -> None:
    """Refuse a stage too small to keep `bottom` + `top` singletons and one middle group."""
    need = bottom + top + (1 if num_layers > bottom + top else 0)
    small = [k for k in stages if k < need]
    if small or bottom + top > num_layers:
        raise ConfigError(field, bottom if field.endswith("bottom") else max(bottom, top),
                          f"boundary layers that leave every stage (layer counts {stages}) "
                          f"room for one middle group: {bottom} + {top} singletons + 1 <= "
                          f"the smallest stage; raise devft.stages or lower it")


def stage_groups(recipe: Recipe, num_layers: int, k: int,
                 similarity: Callable[[], np.ndarray], laplacian: Laplacian = "normalized",
                 seed: int = 0, boundary: tuple[int, int] = (1, 1)) -> Groups:
    """The groups of a k-layer stage; `similarity` is called only by the spectral recipes;
    `boundary` = (bottom, top) singletons of the `boundary` recipe."""
    if k == num_layers:
        return [[i] for i in range(num_layers)]
    if recipe == "spectral":
        return group_layers(similarity(), k, laplacian, seed=seed)
    if recipe == "boundary":
        bottom, top = boundary

        def middle(m: int, kk: int) -> Groups:
            sim = np.asarray(similarity())[bottom:bottom + m, bottom:bottom + m]
            return group_layers(sim, kk, laplacian, seed=seed)

        return boundary_groups(num_layers, k, bottom, top, middle)
    if recipe == "contiguous":
        return contiguous_groups(num_layers, k)
    if recipe == "random":
        return random_groups(num_layers, k, seed + k)
    if recipe == "prefix":
        return [[i] for i in range(k)]
    if recipe == "layerdrop":
        return [[i] for i in evenly_spaced(num_layers, k)]
    raise ValueError(f"unknown stage recipe {recipe!r}")
