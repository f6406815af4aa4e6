"""The Flower strategy: FedAvg's reply handling with DevFT's stage plan and our aggregation rules.

Flower restarts `server_round` at 1 on every `Strategy.start`, and the ServerApp calls `start`
once per stage, so the stage and a global round counter travel in the train config.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from devft.config import RunConfig
from devft.core.aggregation import fedavg
from devft.federation.wire import from_array_record, plan_to_config, to_array_record
from devft.methods import get_method
from devft.models.submodel import StagePlan

log = logging.getLogger(__name__)

RULES = {"fedavg": fedavg}


class StagedStrategy(FedAvg):
    """Sends sampled clients the stage plan + global adapter; aggregates with the method rule."""

    def __init__(self, cfg: RunConfig) -> None:
        n = cfg.federation.num_clients
        per_round = cfg.federation.clients_per_round or n
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=per_round,
            min_available_nodes=n,
        )
        self.cfg = cfg
        self.rule = RULES[get_method(cfg.method).aggregation]
        self.per_round = per_round
        self.plan: StagePlan | None = None
        self.round_offset = 0
        self.last_train: dict[str, float] = {}

    def begin_stage(self, plan: StagePlan, round_offset: int) -> None:
        self.plan, self.round_offset = plan, round_offset

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        assert self.plan is not None, "begin_stage() must be called before start()"
        round_ = self.global_round(server_round)
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.min_available_nodes:
            log.warning("only %d of %d clients connected", len(nodes), self.min_available_nodes)
        rng = np.random.default_rng([self.cfg.seed, round_])
        chosen = sorted(rng.choice(nodes, size=min(self.per_round, len(nodes)), replace=False))
        record = RecordDict(
            {
                "arrays": arrays,
                "config": ConfigRecord(
                    {
                        **plan_to_config(self.plan),
                        "server-round": server_round,
                        "global-round": round_,
                    }
                ),
            }
        )
        return [
            Message(content=record, message_type=MessageType.TRAIN, dst_node_id=int(node))
            for node in chosen
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(replies, is_train=True)
        self.last_train = {"clients_ok": len(valid), "clients_failed": len(failed)}
        if not valid:
            log.warning(
                "round %d: no valid replies; the global adapter is unchanged",
                self.global_round(server_round),
            )
            return None, None
        states = [from_array_record(m.content["arrays"]) for m in valid]
        metrics = [m.content["metrics"] for m in valid]
        weights = [float(m["num-examples"]) for m in metrics]
        aggregated = self.rule(states, weights)
        self.last_train.update(_client_summary(metrics))
        return to_array_record(aggregated), MetricRecord(
            {k: v for k, v in self.last_train.items() if isinstance(v, (int, float))}
        )


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
