"""LoRA transfer between stages (DevFT paper, Sec. "knowledge transfer"; devft_paper.md §4).

After stage s, the trained LoRA of submodel layer n is written into every original layer of
group n; base weights are untouched. Later stages then fuse from these transferred adapters.
"""

from __future__ import annotations

from devft.core.grouping import Groups
from devft.core.layerstate import LayerStates


def transfer_layers(sub_layers: LayerStates, groups: Groups) -> LayerStates:
    """Full-model per-layer LoRA: layer j of group n gets a copy of submodel layer n's LoRA."""
    full: LayerStates = {}
    for n, group in enumerate(groups):
        for j in group:
            full[j] = {key: value.clone() for key, value in sub_layers[n].items()}
    return full
