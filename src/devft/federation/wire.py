"""What crosses the wire: state dicts <-> ArrayRecords, stage plans <-> ConfigRecords, and
the serialized size of a message."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from devft.core.layerstate import StateDict
from devft.models.submodel import StagePlan


def to_array_record(state: StateDict) -> ArrayRecord:
    """float32, contiguous, on CPU (Flower cannot carry bfloat16)."""
    return ArrayRecord(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    )


def from_array_record(record: ArrayRecord) -> StateDict:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def plan_to_config(plan: StagePlan) -> dict[str, int | float | str | list[int]]:
    """The stage plan as ConfigRecord values (groups flattened, with their sizes)."""
    out: dict[str, int | float | str | list[int]] = {
        "stage": plan.stage,
        "groups": [i for g in plan.groups for i in g],
        "group-sizes": [len(g) for g in plan.groups],
        "beta": float(plan.beta),
        "fusion": plan.fusion,
        "residual": float(plan.residual),
    }
    if plan.frozen:  # ConfigRecord lists must not be empty
        out["frozen"] = list(plan.frozen)
    return out


def plan_from_config(config: ConfigRecord) -> StagePlan:
    flat, sizes = list(config["groups"]), list(config["group-sizes"])
    groups, start = [], 0
    for size in sizes:
        groups.append(tuple(int(i) for i in flat[start : start + size]))
        start += size
    frozen = tuple(int(i) for i in config["frozen"]) if "frozen" in config else ()
    residual = float(config["residual"]) if "residual" in config else 0.0
    return StagePlan(
        int(config["stage"]), tuple(groups), float(config["beta"]), str(config["fusion"]),
        frozen, residual,
    )


def wire_bytes(message: Message) -> int:
    """Serialized size of a message as Flower 1.42 ships it: the deflated bytes of every
    object in its tree (message, record dict, records, arrays and their chunks)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
