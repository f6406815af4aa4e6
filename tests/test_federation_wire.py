"""What crosses the wire: conversions, stage plans, and byte counts against the tensors sent."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from devft.federation.grid import MeteredGrid
from devft.federation.wire import (
    from_array_record,
    plan_from_config,
    plan_to_config,
    to_array_record,
    wire_bytes,
)
from devft.models.submodel import StagePlan

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.lora_A.weight": torch.randn(4, 64, generator=g),
        "layers.0.lora_B.weight": torch.randn(64, 4, generator=g),
    }


def test_array_record_round_trip_is_float32_and_exact():
    state = {k: v.to(torch.bfloat16) for k, v in _state().items()}
    back = from_array_record(to_array_record(state))
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key], value.float())


def test_stage_plan_round_trips_through_config_record():
    plan = StagePlan(2, ((0, 1, 5), (2,), (3, 4)), 0.15, "differential")
    config = ConfigRecord(plan_to_config(plan))
    assert plan_from_config(config) == plan


def test_wire_bytes_cover_the_tensors_sent_plus_small_overhead():
    state = _state()
    payload = sum(v.numel() * 4 for v in state.values())
    msg = Message(
        RecordDict({"arrays": to_array_record(state)}), dst_node_id=1, message_type="train"
    )
    size = wire_bytes(msg)
    assert payload <= size <= payload + 2000


class _EchoGrid:
    """Minimal grid: every message gets a reply carrying `reply_state`."""

    def __init__(self, reply_state):
        self.reply_state = reply_state

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"id{m.metadata.dst_node_id}"
            content = RecordDict(
                {
                    "arrays": to_array_record(self.reply_state),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            )
            replies.append(Message(content, reply_to=m))
        return replies


def test_metered_grid_counts_every_message_both_ways():
    down_state, up_state = _state(0), {"x": torch.zeros(1000)}
    grid = MeteredGrid(_EchoGrid(up_state))
    msgs = [
        Message(
            RecordDict({"arrays": to_array_record(down_state)}), dst_node_id=n, message_type="train"
        )
        for n in (1, 2, 3)
    ]
    expected_down = sum(wire_bytes(m) for m in msgs)
    replies = list(grid.send_and_receive(msgs))
    counts = grid.take_counts()
    down, up, failed = counts.down, counts.up, counts.failed
    assert down == expected_down
    assert up == sum(wire_bytes(r) for r in replies)
    assert down >= 3 * sum(v.numel() * 4 for v in down_state.values())
    assert up >= 3 * 4000 and failed == 0
    again = grid.take_counts()
    assert (again.down, again.up, again.failed) == (0, 0, 0)


def test_array_record_counts_match_flowers_own_count():
    state = _state()
    record = to_array_record(state)
    assert record.count_bytes() >= sum(v.numel() * 4 for v in state.values())
    assert isinstance(record, ArrayRecord)
