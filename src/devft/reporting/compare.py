"""Compare methods against FedIT: time and bytes to reach FedIT's final held-out loss."""

from __future__ import annotations

from typing import Any


def first_reaching(records: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first round record whose held-out loss is at or below `target` (None if never)."""
    for r in records:
        if r["round"] > 0 and r["eval_loss"] is not None and r["eval_loss"] <= target:
            return r
    return None


def against_baseline(
    records: list[dict[str, Any]], baseline: list[dict[str, Any]]
) -> dict[str, Any]:
    """Speed-up and byte reduction to the baseline's final loss, and the final-loss delta.

    time_to_target_speedup = baseline's time to target / this method's time to target, where
    the target is the baseline's final held-out loss (so the baseline reaches it by its last
    round, or earlier); bytes_to_target_reduction likewise with cumulative bytes. Both are
    None when this method never reaches the target.
    """
    target = baseline[-1]["eval_loss"]
    base_hit, hit = first_reaching(baseline, target), first_reaching(records, target)
    result: dict[str, Any] = {
        "target_eval_loss": target,
        "final_eval_loss_delta": records[-1]["eval_loss"] - target,
        "time_to_target_s": hit["wall_time_s"] if hit else None,
        "bytes_to_target": hit["cum_bytes"] if hit else None,
        "round_to_target": hit["round"] if hit else None,
        "time_to_target_speedup": None,
        "bytes_to_target_reduction": None,
    }
    if hit and base_hit:
        result["time_to_target_speedup"] = base_hit["wall_time_s"] / max(hit["wall_time_s"], 1e-9)
        result["bytes_to_target_reduction"] = base_hit["cum_bytes"] / max(hit["cum_bytes"], 1)
    return result
