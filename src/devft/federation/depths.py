"""The server's side of per-client budgets (issue 34): replies of several depths.

A client with a budget adds a `budget` ConfigRecord to its reply (`devft.federation.budgets`):
its partition, budget, depth, levers, predicted peak, floor and measured process peak, and,
when shrunken, its groups over the stage's layers. Here the strategy reads that record, checks
a shrunken reply's groups and keys, averages replies of several depths layer by layer
(`devft.core.mixed_depth`: transfer by copy, n_k-weighted over the replies covering each
layer, A and B separately), and summarizes the round's budgets for metrics.jsonl.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.app import ConfigRecord, Message

from devft.core.grouping import Groups
from devft.core.layerstate import StateDict, split_by_layer
from devft.core.mixed_depth import DepthReply, mixed_depth_average
from devft.core.shrink import check_groups, split_groups

BUDGET_RECORD = "budget"


def reply_budget(msg: Message) -> dict[str, Any] | None:
    """The reply's budget record as a dict (None: the client has no budget record)."""
    record = msg.content.get(BUDGET_RECORD) if not msg.has_error() else None
    return dict(record) if isinstance(record, ConfigRecord) else None


def sat_out(budget: dict[str, Any] | None) -> bool:
    """Whether the client sat the round out (`budget_policy=exclude`)."""
    return budget is not None and int(budget.get("depth", -1)) == 0


def reply_groups(budget: dict[str, Any] | None, stage_layers: int) -> Groups | None:
    """A shrunken reply's groups over the stage's layers (None: the whole stage)."""
    if budget is None or "groups" not in budget:
        return None
    groups = split_groups(list(budget["groups"]), list(budget["group-sizes"]))
    reason = check_groups(groups, stage_layers)
    if reason is not None:
        raise ValueError(f"shrunken reply: {reason}")
    return groups


def expected_shrunk(expected: dict[str, tuple[int, ...]], depth: int,
                    prefix: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a `depth`-layer reply: the stage's first `depth` layers' keys (a
    shrunken submodel numbers its layers 0..depth−1; every layer has one layer's shapes)."""
    layers, rest = split_by_layer(expected, prefix)  # type: ignore[arg-type]
    out = dict(rest)
    for i in range(depth):
        for suffix, shape in layers.get(i, {}).items():
            out[f"{prefix}{i}.{suffix}"] = shape  # type: ignore[assignment]
    return out  # type: ignore[return-value]


def aggregate_depths(uploads: Sequence[StateDict], groups: Sequence[Groups | None],
                     shares: Sequence[float], global_state: StateDict, prefix: str,
                     stage_layers: int) -> StateDict:
    """The stage's new LoRA from replies of several depths (a full-stage reply's groups are
    the identity)."""
    identity = [[i] for i in range(stage_layers)]
    replies = [DepthReply(u, g if g is not None else identity, w)
               for u, g, w in zip(uploads, groups, shares)]
    return mixed_depth_average(replies, global_state, prefix, "copy")


def budget_metrics(budgets: Sequence[dict[str, Any]], sat_out_count: int) -> dict[str, Any]:
    """The round's per-client budget view for metrics.jsonl, by partition."""
    rows = sorted(budgets, key=lambda b: int(b["partition"]))

    def col(key: str, cast: Any = float) -> list[Any]:
        return [cast(b[key]) if key in b else None for b in rows]

    return {
        "clients_sat_out": sat_out_count,
        "client_partition": col("partition", int),
        "client_budget_mb": col("budget-mb", int),
        "client_depth": col("depth", int),
        "client_levers": col("levers", str),
        "client_predicted_peak_mb": [round(v, 1) for v in col("predicted-peak-mb")],
        "client_process_peak_mb": [round(v, 1) for v in col("process-peak-mb")],
        "client_floor_mb": [round(v, 1) for v in col("floor-mb")],
        "client_covered_layers": [list(map(int, b.get("covered-layers", []))) for b in rows],
    }
