"""StagedStrategy: messages carry the stage plan; FedIT aggregation is the weighted mean."""

import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from devft.config import load_config
from devft.federation.strategy import StagedStrategy
from devft.federation.wire import from_array_record, plan_from_config, to_array_record
from devft.models.submodel import StagePlan
from devft.rules import make_rule

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


GLOBAL = {"lora_A": torch.ones(1, 2), "lora_B": torch.zeros(2, 1)}


def _strategy(*overrides):
    cfg = load_config(None, ["federation.num_clients=3", *overrides])
    rule = make_rule(cfg)
    strategy = StagedStrategy(cfg, rule, on_aggregated=lambda: None)
    plan = StagePlan(1, ((0, 1), (2,)), 0.1)
    rule.start_stage(GLOBAL, plan)
    strategy.begin_stage(plan, round_offset=5)
    strategy._nodes(_Grid([1, 2, 9]))
    return strategy


def _reply(state, n, loss=1.0, node=1):
    msg = Message(RecordDict({}), dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m{node}"
    metrics = MetricRecord(
        {
            "num-examples": n,
            "train-loss": loss,
            "flops": 10,
            "tokens": 5,
            "peak-mem-bytes": 100 * node,
            "mem-delta-bytes": 1,
            "train-time-s": 0.5,
            "steps": 2,
        }
    )
    return Message(RecordDict({"arrays": to_array_record(state), "metrics": metrics}), reply_to=msg)


def test_configure_train_sends_plan_and_global_round_to_every_client():
    strategy = _strategy()
    arrays = to_array_record({"a": torch.ones(2)})
    msgs = list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid([11, 12, 13])))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12, 13]
    for m in msgs:
        config = m.content["config"]
        assert config["global-round"] == 7 and config["server-round"] == 2
        assert plan_from_config(config) == strategy.plan
        sent = from_array_record(m.content["arrays"])  # the rule's global tensors
        assert set(sent) == set(GLOBAL) and torch.equal(sent["lora_A"], GLOBAL["lora_A"])


def test_configure_train_samples_clients_per_round_deterministically():
    strategy = _strategy("federation.clients_per_round=2")
    picks = [
        sorted(
            m.metadata.dst_node_id
            for m in strategy.configure_train(
                1, to_array_record({"a": torch.ones(1)}), ConfigRecord(), _Grid([3, 1, 2])
            )
        )
        for _ in range(2)
    ]
    assert len(picks[0]) == 2 and picks[0] == picks[1]


def test_fedit_aggregation_is_the_hand_computed_weighted_mean():
    a = {"lora_A": torch.tensor([[1.0, 2.0]]), "lora_B": torch.tensor([[4.0], [0.0]])}
    b = {"lora_A": torch.tensor([[3.0, 6.0]]), "lora_B": torch.tensor([[0.0], [8.0]])}
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(1, [_reply(a, 1, 2.0, 1), _reply(b, 3, 4.0, 2)])
    out = from_array_record(arrays)
    # weights 1/4 and 3/4
    assert torch.allclose(out["lora_A"], torch.tensor([[2.5, 5.0]]))
    assert torch.allclose(out["lora_B"], torch.tensor([[1.0], [6.0]]))
    assert abs(metrics["train_loss"] - (2.0 * 1 + 4.0 * 3) / 4) < 1e-9
    assert strategy.last_train["client_peak_mem_bytes"] == 200
    assert strategy.last_train["clients_ok"] == 2


def test_failed_replies_are_counted_and_left_out():
    a = {"lora_A": torch.full((1, 2), 2.0), "lora_B": torch.ones(2, 1)}
    msg = Message(RecordDict({}), dst_node_id=9, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m9"
    failed = Message(Error(code=1, reason="boom"), reply_to=msg)
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, [_reply(a, 2), failed])
    assert torch.equal(from_array_record(arrays)["lora_A"], torch.full((1, 2), 2.0))
    assert strategy.last_train["clients_failed"] == 1


def test_no_valid_reply_keeps_the_global_adapter():
    msg = Message(RecordDict({}), dst_node_id=9, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m9"
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(
        1, [Message(Error(code=1, reason="x"), reply_to=msg)]
    )
    assert arrays is None and metrics is None
