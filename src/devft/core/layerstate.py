"""Split flat state dicts into per-layer dicts and back.

A flat key such as `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` is
`<prefix><index>.<suffix>` with prefix `base_model.model.model.layers.`; fusion and transfer
work on the per-layer form {index: {suffix: tensor}} and never need to know the model family.
"""

from __future__ import annotations

from torch import Tensor

StateDict = dict[str, Tensor]
LayerStates = dict[int, StateDict]


def split_by_layer(state: StateDict, prefix: str) -> tuple[LayerStates, StateDict]:
    """(per-layer states keyed by layer index, everything outside the layer list)."""
    layers: LayerStates = {}
    rest: StateDict = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, _, suffix = key[len(prefix) :].partition(".")
            if index.isdigit():
                layers.setdefault(int(index), {})[suffix] = value
                continue
        rest[key] = value
    return layers, rest


def join_layers(layers: LayerStates, prefix: str, rest: StateDict | None = None) -> StateDict:
    """Inverse of `split_by_layer`; layers in index order."""
    out: StateDict = dict(rest or {})
    for index in sorted(layers):
        for suffix, value in layers[index].items():
            out[f"{prefix}{index}.{suffix}"] = value
    return out
