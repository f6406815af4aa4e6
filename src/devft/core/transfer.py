"""LoRA transfer between stages (DevFT paper, Sec. "knowledge transfer"; devft_paper.md §4).

After stage s, the trained LoRA of submodel layer n is written into every original layer of
group n; base weights are untouched. Later stages then fuse from these transferred adapters.

Variants (the paper uses `copy`; the others are ablations):
- `copy`: every layer of the group gets the representative's LoRA (the same update |g| times);
- `scaled`: every layer gets A and B/|g|, so the group's summed update equals the trained one;
- `anchor`: only the group's anchor (lowest) layer gets it; the others keep their LoRA;
- `none`: nothing is written back (each stage starts from the previous global LoRA).
"""

from __future__ import annotations

from typing import Literal

from devft.core.grouping import Groups
from devft.core.layerstate import LayerStates

TransferVariant = Literal["copy", "scaled", "anchor", "none"]
TRANSFER_VARIANTS: tuple[str, ...] = ("copy", "scaled", "anchor", "none")


def transfer_layers(sub_layers: LayerStates, groups: Groups,
                    variant: TransferVariant = "copy") -> LayerStates:
    """The full-model layers that receive LoRA from the submodel, by layer index.

    Layers not in the result (e.g. outside every group, or non-anchors under `anchor`) keep
    whatever LoRA they had; callers overlay the result on the current global state.
    """
    full: LayerStates = {}
    if variant == "none":
        return full
    for n, group in enumerate(groups):
        targets = group[:1] if variant == "anchor" else group
        for j in targets:
            full[j] = {}
            for key, value in sub_layers[n].items():
                scale = 1.0 / len(group) if variant == "scaled" and "lora_B" in key else 1.0
                full[j][key] = value.clone() if scale == 1.0 else value * scale
    return full
