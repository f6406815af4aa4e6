"""Aggregation across clients of different depths (issue 34: per-client memory budgets).

A client whose memory holds only a d-layer submodel replies with that submodel's LoRA and
its *groups*: for each submodel layer, the full model's layers it stands for (a fused group
under the `spectral` recipe, one real layer under `layerdrop`, `prefix` or `random`). The
server maps every reply onto the full model's layers by transfer (`devft.core.transfer`;
identity for a one-layer group), then averages each layer over the replies that cover it,
weighted by the clients' n_k. A layer no reply covers keeps the global LoRA it had. A and B
are averaged separately, as FedIT does (so the product B·A of the mean is not the mean of
the products, exactly as in FedIT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from devft.core.aggregation import normalized_weights, weighted_mean
from devft.core.grouping import Groups
from devft.core.layerstate import StateDict, join_layers, split_by_layer
from devft.core.transfer import TransferVariant, transfer_layers


@dataclass(frozen=True)
class DepthReply:
    """One client's reply: its submodel's LoRA, the groups it trained and its weight n_k."""

    state: StateDict
    groups: Groups
    weight: float


def covered_layers(groups: Groups) -> list[int]:
    """The full model's layers a reply with these groups covers, sorted."""
    return sorted({j for group in groups for j in group})


def mixed_depth_average(replies: Sequence[DepthReply], global_state: StateDict, prefix: str,
                        variant: TransferVariant = "copy") -> StateDict:
    """The new full-model LoRA: per layer, the n_k-weighted mean of the replies covering it
    (after mapping each onto the full model by `variant` transfer); uncovered layers and
    keys keep `global_state`'s values. Keys outside the layer list are averaged over every
    reply that has them."""
    if not replies:
        raise ValueError("no client replies to aggregate")
    if variant == "none":
        raise ValueError("transfer variant 'none' maps no reply onto the full model")
    normalized_weights([r.weight for r in replies])  # validates: >= 0, positive sum
    mapped = []
    for r in replies:
        sub_layers, rest = split_by_layer(r.state, prefix)
        if sorted(sub_layers) != list(range(len(r.groups))):
            raise ValueError(f"a reply has submodel layers {sorted(sub_layers)} for "
                             f"{len(r.groups)} groups")
        mapped.append((transfer_layers(sub_layers, r.groups, variant), rest, r.weight))
    layers, rest = split_by_layer(global_state, prefix)
    out_layers = {j: dict(v) for j, v in layers.items()}
    for j in sorted({j for full, _, _ in mapped for j in full}):
        covering = [(full[j], w) for full, _, w in mapped if j in full]
        out_layers[j] = {**out_layers.get(j, {}), **_mean([s for s, _ in covering],
                                                          [w for _, w in covering])}
    out_rest = dict(rest)
    for key in {k for _, r, _ in mapped for k in r}:
        having = [(r[key], w) for _, r, w in mapped if key in r]
        out_rest[key] = _mean([{key: t} for t, _ in having], [w for _, w in having])[key]
    return join_layers(out_layers, prefix, out_rest)


def _mean(states: list[StateDict], weights: list[float]) -> StateDict:
    """FedAvg's weighted mean; all-zero weights (only empty clients cover it) give the plain
    mean."""
    return weighted_mean(states, weights if sum(weights) > 0 else [1.0] * len(states))
