"""A method's stages and each stage's groups, from the method spec and the run config.

One place for what the recipes need beyond a layer count: the boundary singletons of
`devft-boundary` (devft.boundary_layers) and `devft+offsite` (offsite.k_bottom/k_top),
Offsite-tuning's one emulator stage, and the adaptive stage length's budget check. Both the
pre-run check (federation.runner.prepare) and the server (GlobalModel) call it.

`frozen`: submodel layers that carry no trained or sent LoRA (an emulator). `offsite`: the
emulator's layers. `devft+offsite` (adapter="boundary"): in every stage but the last (the
full model, trained whole as in DevFT) the fused middle groups are the emulator and only the
real boundary layers train.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from devft.config import RunConfig
from devft.core.adaptive import check_budget
from devft.core.grouping import Groups
from devft.core.offsite import offsite_groups
from devft.core.recipes import check_boundary_stages, stage_groups
from devft.core.schedule import Stage, build_schedule, full_model_schedule
from devft.methods import MethodSpec


def boundary_sizes(method: MethodSpec, cfg: RunConfig) -> tuple[int, int]:
    """(bottom, top) singleton layers of the `boundary` recipe."""
    if method.adapter == "boundary":
        return cfg.offsite.k_bottom, cfg.offsite.k_top
    return cfg.devft.boundary_layers, cfg.devft.boundary_layers


def method_schedule(method: MethodSpec, cfg: RunConfig, depth: int) -> list[Stage]:
    """The stages of `method` on a `depth`-layer model; ConfigError for what cannot fit."""
    rounds = cfg.federation.rounds
    if not method.staged:
        return full_model_schedule(depth, rounds)
    if method.recipe == "offsite":
        o = cfg.offsite
        groups, _ = offsite_groups(depth, o.k_bottom, o.k_top, o.emulator_fraction,
                                   o.emulator_layers)
        return [Stage(0, len(groups), rounds)]
    d = cfg.devft
    per_stage = [] if method.stage_length == "adaptive" else d.rounds_per_stage
    schedule = build_schedule(depth, d.stages, d.num_stages, per_stage, rounds)
    counts = [s.num_layers for s in schedule]
    if method.recipe == "boundary":
        bottom, top = boundary_sizes(method, cfg)
        field = "offsite.k_bottom" if method.adapter == "boundary" else "devft.boundary_layers"
        check_boundary_stages(depth, counts[:-1], bottom, top, field)
    if method.stage_length == "adaptive":
        check_budget(rounds, len(schedule), cfg.adaptive.min_rounds)
    return schedule


def method_groups(method: MethodSpec, cfg: RunConfig, depth: int, k: int,
                  similarity: Callable[[], np.ndarray]) -> tuple[Groups, tuple[int, ...]]:
    """(the k groups of a stage, its frozen submodel layers)."""
    if method.recipe == "offsite":
        o = cfg.offsite
        return offsite_groups(depth, o.k_bottom, o.k_top, o.emulator_fraction,
                              o.emulator_layers)
    bottom, top = boundary_sizes(method, cfg)
    groups = stage_groups(method.recipe, depth, k, similarity, cfg.devft.laplacian,
                          seed=cfg.seed, boundary=(bottom, top))
    frozen: tuple[int, ...] = ()
    if method.adapter == "boundary" and k < depth:
        frozen = tuple(range(bottom, k - top))
    return groups, frozen
