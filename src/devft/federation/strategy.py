"""The Flower strategy: FedAvg's reply handling, DevFT's stage plan, and the method's rule.

Flower restarts `server_round` at 1 on every `Strategy.start`, and the ServerApp calls `start`
once per stage, so the stage and a global round counter travel in the train config. Each
node gets its own message (`Rule.message`: e.g. HetLoRA truncates to the node's rank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from devft.config import RunConfig
from devft.core.layerstate import StateDict
from devft.federation.wire import from_array_record, plan_to_config, to_array_record
from devft.models.submodel import StagePlan
from devft.rules import NodeSlot, Rule

log = logging.getLogger(__name__)


class StagedStrategy(FedAvg):
    """Sends sampled clients the stage plan + the rule's tensors; aggregates with the rule.

    Args:
        on_aggregated: called after each aggregation (the server transfers into the full model).
        personal_eval: for personalized rules, the full-model tensors every client evaluates.
    """

    def __init__(self, cfg: RunConfig, rule: Rule, on_aggregated: Callable[[], None],
                 personal_eval: Callable[[], StateDict] | None = None) -> None:
        n = cfg.federation.num_clients
        per_round = cfg.federation.clients_per_round or n
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if personal_eval else 0.0,
                         min_train_nodes=per_round, min_available_nodes=n)
        self.cfg, self.rule, self.per_round = cfg, rule, per_round
        self.on_aggregated, self.personal_eval = on_aggregated, personal_eval
        self.plan: StagePlan | None = None
        self.round_offset = 0
        self.slots: dict[int, NodeSlot] = {}
        self.last_train: dict[str, float] = {}
        self.last_eval: float | None = None

    def begin_stage(self, plan: StagePlan, round_offset: int) -> None:
        self.plan, self.round_offset = plan, round_offset

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def _nodes(self, grid: Grid) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.min_available_nodes:
            log.warning("only %d of %d clients connected", len(nodes), self.min_available_nodes)
        self.slots = {nid: NodeSlot(nid, i, len(nodes)) for i, nid in enumerate(nodes)}
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        assert self.plan is not None, "begin_stage() must be called before start()"
        round_ = self.global_round(server_round)
        nodes = self._nodes(grid)
        rng = np.random.default_rng([self.cfg.seed, round_])
        chosen = sorted(rng.choice(nodes, size=min(self.per_round, len(nodes)), replace=False))
        messages = []
        for node in chosen:
            tensors, extra = self.rule.message(self.slots[int(node)])
            record = RecordDict({
                "arrays": to_array_record(tensors),
                "config": ConfigRecord({**plan_to_config(self.plan), **extra,
                                        "server-round": server_round, "global-round": round_}),
            })
            messages.append(Message(content=record, message_type=MessageType.TRAIN,
                                    dst_node_id=int(node)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(replies, is_train=True)
        self.last_train = {"clients_ok": len(valid), "clients_failed": len(failed)}
        if not valid:
            log.warning("round %d: no valid replies; the global adapter is unchanged",
                        self.global_round(server_round))
            return None, None
        uploads = [from_array_record(m.content["arrays"]) for m in valid]
        metrics = [m.content["metrics"] for m in valid]
        nodes = [self.slots[m.metadata.src_node_id] for m in valid]
        self.rule.aggregate(uploads, nodes, [float(m["num-examples"]) for m in metrics])
        self.on_aggregated()
        self.last_train.update(_client_summary(metrics))
        return to_array_record(self.rule.eval_lora()), MetricRecord(
            {k: v for k, v in self.last_train.items() if isinstance(v, (int, float))})

    # ---- personalized evaluation (rules whose model includes client-private tensors) ------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.last_eval = None
        if self.personal_eval is None:
            return []
        record = RecordDict({
            "arrays": to_array_record(self.personal_eval()),
            "config": ConfigRecord({"global-round": self.global_round(server_round)}),
        })
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=node)
                for node in self._nodes(grid)]

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        valid, _ = self._check_and_log_replies(replies, is_train=False)
        if not valid:
            return None
        losses = [float(m.content["metrics"]["eval-loss"]) for m in valid]
        self.last_eval = sum(losses) / len(losses)  # unweighted mean over clients
        return MetricRecord({"eval_loss": self.last_eval, "clients": len(losses)})


def _client_summary(metrics: list[MetricRecord]) -> dict[str, float]:
    """Round-level view of the clients' reply metrics."""
    total = sum(float(m["num-examples"]) for m in metrics)
    return {
        "train_loss": sum(float(m["train-loss"]) * float(m["num-examples"]) for m in metrics)
        / total,
        "client_flops": sum(int(m["flops"]) for m in metrics),
        "client_peak_mem_bytes": max(int(m["peak-mem-bytes"]) for m in metrics),
        "client_mem_delta_bytes": max(int(m["mem-delta-bytes"]) for m in metrics),
        "client_time_sum_s": sum(float(m["train-time-s"]) for m in metrics),
        "client_time_max_s": max(float(m["train-time-s"]) for m in metrics),
        "client_tokens": sum(int(m["tokens"]) for m in metrics),
    }
