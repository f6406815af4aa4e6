"""Moving a flat LoRA state between the full model and a stage submodel.

`fuse_state` builds the submodel's adapter from the full model's (one fused layer per
group); `transfer_state` writes a trained submodel adapter back into the full model's. Both
the server (global LoRA) and clients (private parts such as FedSA-LoRA's B) use them.
"""

from __future__ import annotations

import torch

from devft.core.fusion import FusionVariant, fuse_layers
from devft.core.grouping import Groups
from devft.core.layerstate import StateDict, join_layers, split_by_layer
from devft.core.transfer import TransferVariant, transfer_layers


def fuse_state(full: StateDict, groups: Groups, beta: float, fusion: FusionVariant,
               prefix: str, missing: StateDict | None = None) -> StateDict:
    """Submodel adapter: layer n = fusion of the full model's layers in group n.

    Layers absent from `full` count as zeros shaped like `missing`'s layer n (e.g. a client's
    private B before it ever trained that layer).
    """
    layers, rest = split_by_layer(full, prefix)
    fill = split_by_layer(missing, prefix)[0] if missing is not None else {}
    for n, group in enumerate(groups):
        for j in group:
            if j not in layers:
                if n not in fill:
                    raise KeyError(f"layer {j} missing from the full state and no template")
                layers[j] = {k: torch.zeros_like(v) for k, v in fill[n].items()}
    return join_layers(fuse_layers(layers, groups, beta, fusion), prefix, rest)


def transfer_state(sub: StateDict, groups: Groups, variant: TransferVariant, prefix: str,
                   into: StateDict | None = None) -> StateDict:
    """Full-model adapter: `into` with the submodel's layers transferred over it."""
    sub_layers, rest = split_by_layer(sub, prefix)
    full_layers, full_rest = split_by_layer(into or {}, prefix)
    full_layers.update(transfer_layers(sub_layers, groups, variant))
    return join_layers(full_layers, prefix, {**full_rest, **rest})
