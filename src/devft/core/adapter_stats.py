"""Quantities that explain a staged run: adapter norms per layer, and fusion's cross term.

- `adapter_norms`: per layer, the RMS over its modules of ‖A‖_F and of ‖B‖_F; then mean, min
  and max over layers, with A also relative to a fresh init's expected norm √(r/3). A shrunken
  initial A (core/initial_adapter.py) or a blown-up one shows here.
- `fusion_cross_term`: fusion is applied to A and B separately (PEFT trains factors), so a
  fused layer's update is fused(B)·fused(A), not fused(B·A). The two agree when the group's
  layers carry the same LoRA (a group inside one old group, after copy transfer) and differ
  when a group straddles old groups. This gives ‖fused(B)·fused(A) − fused(B·A)‖_F over
  ‖fused(B·A)‖_F, summed over every module of every multi-layer group.
"""

from __future__ import annotations

import math

from devft.core.fusion import FusionVariant, fusion_coefficients
from devft.core.grouping import Groups
from devft.core.layerstate import StateDict, split_by_layer


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def adapter_norms(state: StateDict, prefix: str, rank: int | None = None) -> dict[str, object]:
    """{"layers", "A": {mean,min,max}, "B": {...}, "A_rel_fresh": {...}} over the layers."""
    layers, _ = split_by_layer(state, prefix)
    per: dict[str, list[float]] = {"A": [], "B": []}
    for j in sorted(layers):
        for part in per:
            sq = [float(v.float().pow(2).sum()) for k, v in layers[j].items()
                  if f"lora_{part}" in k]
            if sq:
                per[part].append(math.sqrt(sum(sq) / len(sq)))
    out: dict[str, object] = {"layers": len(layers)}
    for part, values in per.items():
        if values:
            out[part] = _stats(values)
    if rank and per["A"]:
        fresh = math.sqrt(rank / 3.0)
        out["A_rel_fresh"] = _stats([v / fresh for v in per["A"]])
    return out


def fusion_cross_term(full: StateDict, groups: Groups, beta: float, fusion: FusionVariant,
                      prefix: str) -> float | None:
    """Relative size of fused(B)·fused(A) − fused(B·A); None when there is nothing to
    compare (no multi-layer group, or every fused update is 0, as before any training)."""
    layers, _ = split_by_layer(full, prefix)
    diff_sq = ref_sq = 0.0
    for group in groups:
        if len(group) < 2:
            continue
        coeffs = fusion_coefficients(len(group), beta, fusion)
        for key_a in (k for k in layers[group[0]] if ".lora_A." in k):
            key_b = key_a.replace(".lora_A.", ".lora_B.")
            if key_b not in layers[group[0]]:
                continue
            a = [layers[j][key_a].double() for j in group]
            b = [layers[j][key_b].double() for j in group]
            fused_a = sum(c * t for c, t in zip(coeffs, a))
            fused_b = sum(c * t for c, t in zip(coeffs, b))
            fused_update = sum(c * (tb @ ta) for c, ta, tb in zip(coeffs, a, b))
            diff_sq += float((fused_b @ fused_a - fused_update).pow(2).sum())
            ref_sq += float(fused_update.pow(2).sum())
    if ref_sq == 0.0:
        return None
    return math.sqrt(diff_sq / ref_sq)


def stage_start_report(full: StateDict, sub: StateDict, groups: Groups, beta: float,
                       fusion: FusionVariant, prefix: str, rank: int) -> dict[str, object]:
    """What `metrics.jsonl` records at a stage boundary (see the module docstring)."""
    return {
        "full_adapter_norms": adapter_norms(full, prefix, rank),
        "submodel_adapter_norms": adapter_norms(sub, prefix, rank),
        "fusion_cross_term": fusion_cross_term(full, groups, beta, fusion, prefix),
    }

