"""The stage submodel's initial LoRA: fused from the full model's, except where nothing trained.

The paper fuses every parameter of a group with θ_a + β·Σ(θ_j − θ_a) (core/fusion.py). Its
formula is written for *trained* parameters: a group's layers carry knowledge and fusion
keeps the anchor plus each layer's difference. A group whose LoRA has never been trained
carries none. Its B is 0, so its update B·A is 0 whatever A is, and its A is only the random
init, drawn independently per layer. Fusing independent random matrices shrinks them:
‖Σ c_i A_i‖ ≈ √(Σ c_i²)·‖A‖, about 0.3–0.6× a fresh init on DevFT's first stage. Transfer then
copies that shrunken A into every layer of the group, and the rest of the run trains with a
smaller effective step. That is an artifact of applying the formula to noise, not part of
the method.

The rule here (`untrained="fresh"`, the default):
- a group whose layers all still hold the run's initial adapter gets a *fresh* standard init
  (PEFT's: A ~ kaiming-uniform(a=√5), B = 0), drawn from a generator seeded by (seed, stage,
  group). Its update is 0 either way, so the submodel computes exactly what the paper's
  formula gives; only the optimizer's starting point differs;
- every group with at least one trained layer is fused with the paper's formula, A and B
  alike, as written. When a new group straddles old groups whose trained As differ, the fused
  A is shrunken too, and fused(B)·fused(A) differs from fused(B·A). Both effects are logged
  per stage (devft.core.adapter_stats) rather than corrected: a trained A carries the
  update's row space, and rescaling it would change what the paper's formula transfers.

`untrained="fused"` applies the formula to the untrained init as well (the ablation method
`devft-fusedinit`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from devft.core.fusion import FusionVariant
from devft.core.grouping import Groups
from devft.core.layerstate import StateDict, split_by_layer
from devft.core.stagemaps import fuse_state

UntrainedInit = Literal["fresh", "fused"]
UNTRAINED_INITS: tuple[str, ...] = ("fresh", "fused")


def standard_lora_a(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's default LoRA A init, kaiming-uniform(a=√5), i.e. U(−1/√fan_in, 1/√fan_in).

    Its expected Frobenius norm is √(r/3) for an (r, fan_in) matrix, whatever fan_in is.
    """
    a = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def fresh_lora_norm(rank: int) -> float:
    """Expected ‖A‖_F of `standard_lora_a` for rank r: √(r/3)."""
    return math.sqrt(rank / 3.0)


def group_generator(seed: int, stage: int, group: int) -> torch.Generator:
    """A private generator for one group's fresh init (independent of the global torch RNG)."""
    state = np.random.SeedSequence([seed, stage, group]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def untrained_layers(current: StateDict, initial: StateDict, prefix: str) -> set[int]:
    """Full-model layers whose every LoRA tensor still equals the run's initial adapter."""
    now, _ = split_by_layer(current, prefix)
    start, _ = split_by_layer(initial, prefix)
    return {
        j for j, state in now.items()
        if j in start and all(torch.equal(v, start[j][k]) for k, v in state.items())
    }


def initial_submodel_adapter(
    full: StateDict,
    initial: StateDict,
    groups: Groups,
    beta: float,
    fusion: FusionVariant,
    prefix: str,
    *,
    untrained: UntrainedInit = "fresh",
    seed: int = 0,
    stage: int = 0,
) -> tuple[StateDict, list[int]]:
    """The submodel's initial adapter and the indices of the groups that got a fresh init.

    `full` is the full model's current adapter, `initial` the run's initial one (both PEFT
    state dicts of the full model). One-layer groups keep their layer's own tensors: an
    untrained one already is a standard init.
    """
    sub = fuse_state(full, groups, beta, fusion, prefix)
    if untrained == "fused":
        return sub, []
    if untrained != "fresh":
        raise ValueError(f"unknown untrained-group init {untrained!r}")
    idle = untrained_layers(full, initial, prefix)
    fresh = [n for n, g in enumerate(groups) if len(g) > 1 and all(j in idle for j in g)]
    for n in fresh:
        gen = group_generator(seed, stage, n)
        head = f"{prefix}{n}."
        for key in sorted(k for k in sub if k.startswith(head)):
            value = sub[key]
            if ".lora_A." in key:
                sub[key] = standard_lora_a(tuple(value.shape), gen).to(value.dtype)
            elif ".lora_B." in key:
                sub[key] = torch.zeros_like(value)
    return sub, fresh
