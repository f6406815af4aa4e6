"""Shrinking a round's submodel to a client's memory (issue 34): which layers a client of
depth d < L_s trains when its round's submodel has L_s layers.

A shrunken client's groups are over the *round's submodel layers* (stage indices 0..L_s−1),
so its reply maps back onto the stage by transfer (`devft.core.mixed_depth`); over the full
model's layers each of its layers stands for the union of the stage groups it covers
(`union_groups`). Recipes:
- `spectral`: DevFT's grouping at depth d (spectral clustering of layer similarity) on the
  stage's layers; each group is fused, and its LoRA goes back by copy;
- `layerdrop`: d evenly spaced stage layers, one each;
- `prefix`: the first d stage layers, like DepthFL;
- `random`: d stage layers drawn per client and per round, like FedRA.
The spectral groups of every depth d < L_s are computed once per stage by the server
(`spectral_table`) and sent with the plan; the others need nothing from the server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from devft.core.grouping import Groups, Laplacian, group_layers
from devft.core.recipes import evenly_spaced

SHRINK_RECIPES: tuple[str, ...] = ("spectral", "layerdrop", "prefix", "random")


def stage_similarity(similarity: np.ndarray, stage_groups: Groups) -> np.ndarray:
    """(L_s, L_s) similarity between a stage's layers: the mean similarity of their members
    (the full model's (L, L) matrix itself when every group is one layer)."""
    sim = np.asarray(similarity, dtype=np.float64)
    n = len(stage_groups)
    out = np.empty((n, n))
    for a, ga in enumerate(stage_groups):
        for b, gb in enumerate(stage_groups):
            out[a, b] = sim[np.ix_(list(ga), list(gb))].mean()
    return out


def spectral_table(similarity: np.ndarray, stage_groups: Groups, laplacian: Laplacian,
                   seed: int) -> dict[int, Groups]:
    """For every depth 1 ≤ d < L_s, DevFT's d groups of the stage's layers."""
    n = len(stage_groups)
    if n < 2:
        return {}
    sim = stage_similarity(similarity, stage_groups)
    table: dict[int, Groups] = {1: [list(range(n))]}
    for d in range(2, n):
        table[d] = [sorted(g) for g in group_layers(sim, d, laplacian, seed=seed)]
    return table


def shrink_groups(recipe: str, stage_layers: int, depth: int,
                  spectral: Mapping[int, Groups] | None = None,
                  draw: Sequence[int] = (0,)) -> Groups:
    """The groups (over stage indices) a client of `depth` < `stage_layers` trains.

    `spectral`: the server's table (recipe `spectral`); `draw`: the entropy of a `random`
    client's draw (seed, partition, round), so every client and round draws its own."""
    if not 1 <= depth < stage_layers:
        raise ValueError(f"a shrunken depth must be in 1..{stage_layers - 1}, not {depth}")
    if recipe == "spectral":
        if spectral is None or depth not in spectral:
            raise ValueError(f"no spectral groups of depth {depth} were sent for this stage")
        return [list(g) for g in spectral[depth]]
    if recipe == "layerdrop":
        return [[i] for i in evenly_spaced(stage_layers, depth)]
    if recipe == "prefix":
        return [[i] for i in range(depth)]
    if recipe == "random":
        rng = np.random.default_rng(np.random.SeedSequence(list(draw)))
        return [[int(i)] for i in sorted(rng.choice(stage_layers, size=depth, replace=False))]
    raise ValueError(f"unknown shrink recipe {recipe!r}; allowed: {', '.join(SHRINK_RECIPES)}")


def union_groups(stage_groups: Groups, sub: Groups) -> Groups:
    """Over the full model's layers: each shrunken layer stands for its stage layers' groups."""
    return [sorted(j for k in group for j in stage_groups[k]) for group in sub]


def check_groups(groups: Groups, stage_layers: int) -> str | None:
    """Why a reply's groups are not a valid shrinking of a stage of `stage_layers`, or None."""
    if not groups or len(groups) >= stage_layers:
        return (f"{len(groups)} groups for a stage of {stage_layers} layers "
                f"(need 1..{stage_layers - 1})")
    seen: set[int] = set()
    for g in groups:
        if not g:
            return "an empty group"
        if any(not 0 <= i < stage_layers for i in g):
            return f"group {list(g)} names layers outside 0..{stage_layers - 1}"
        if seen & set(g):
            return f"group {list(g)} overlaps another group"
        seen |= set(g)
    return None


def flatten_groups(groups: Groups) -> tuple[list[int], list[int]]:
    """(flat members, group sizes): the wire form of a list of groups."""
    return [int(i) for g in groups for i in g], [len(g) for g in groups]


def split_groups(flat: Sequence[int], sizes: Sequence[int]) -> Groups:
    """Inverse of `flatten_groups`."""
    if sum(sizes) != len(flat) or any(s <= 0 for s in sizes):
        raise ValueError(f"group sizes {list(sizes)} do not split {len(flat)} members")
    out, start = [], 0
    for size in sizes:
        out.append([int(i) for i in flat[start:start + size]])
        start += size
    return out


def table_to_wire(table: Mapping[int, Groups]) -> tuple[list[int], list[int]]:
    """The spectral table as (flat members, group sizes), depths 1, 2, … in order (depth d
    contributes d groups)."""
    flat: list[int] = []
    sizes: list[int] = []
    for d in sorted(table):
        f, s = flatten_groups(table[d])
        flat += f
        sizes += s
    return flat, sizes


def table_from_wire(flat: Sequence[int], sizes: Sequence[int]) -> dict[int, Groups]:
    """Inverse of `table_to_wire`."""
    groups = split_groups(flat, sizes)
    table, start, d = {}, 0, 1
    while start < len(groups):
        if start + d > len(groups):
            raise ValueError("the spectral table's groups do not add up to depths 1, 2, …")
        table[d] = groups[start:start + d]
        start, d = start + d, d + 1
    return table
