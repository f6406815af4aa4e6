"""Frozen submodel layers (an emulator's): their LoRA is neither trained nor sent.

A stage plan may name submodel layers as frozen (`StagePlan.frozen`: Offsite-tuning's
emulator, the fused middle of devft+offsite). Their keys are left out of everything that
crosses the wire and of the aggregation; where a model needs a complete adapter, they are
filled with B = 0 (so a frozen layer computes exactly its frozen base weights) and never
transferred back into the full model.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from devft.core.grouping import Groups
from devft.core.layerstate import StateDict


def in_layers(key: str, layers: Collection[int], prefix: str) -> bool:
    """True when `key` (a LoRA state key or parameter name) belongs to one of `layers`."""
    if not layers or not key.startswith(prefix):
        return False
    index = key[len(prefix):].partition(".")[0]
    return index.isdigit() and int(index) in layers


def drop_layers(state: StateDict, layers: Collection[int], prefix: str) -> StateDict:
    """`state` without the keys of `layers`."""
    return {k: v for k, v in state.items() if not in_layers(k, layers, prefix)}


def fill_frozen(state: StateDict, template: StateDict, layers: Collection[int],
                prefix: str) -> StateDict:
    """`state` with every key of `layers` set from `template`, B = 0 (a zero update)."""
    out = drop_layers(state, layers, prefix)
    for key, value in template.items():
        if in_layers(key, layers, prefix):
            out[key] = torch.zeros_like(value) if ".lora_B." in key else value.clone()
    return out


def transfer_groups(groups: Groups, layers: Collection[int]) -> Groups:
    """Groups for transfer back: frozen groups become empty (they write nothing)."""
    return [[] if n in layers else list(g) for n, g in enumerate(groups)]
