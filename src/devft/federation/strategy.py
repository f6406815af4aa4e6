"""The Flower strategy: FedAvg's reply handling, DevFT's stage plan, and the method's rule.

Flower restarts `server_round` at 1 on every `Strategy.start`, and the ServerApp calls `start`
once per stage, so the stage and a global round counter travel in the train config. Each
node gets its own message (`Rule.message`: e.g. HetLoRA truncates to the node's rank).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from devft.config import RunConfig
from devft.core.aggregation import bounded_shares
from devft.core.grouping import Groups
from devft.core.layerstate import StateDict
from devft.core.shrink import table_to_wire
from devft.core.validation import check_update
from devft.errors import RunStalledError
from devft.federation.depths import (
    aggregate_depths,
    budget_metrics,
    expected_shrunk,
    reply_budget,
    reply_groups,
    sat_out,
)
from devft.federation.shipping import SHIPPED, LayerShipper
from devft.federation.wire import from_array_record, plan_to_config, to_array_record
from devft.models.submodel import StagePlan
from devft.rules import NodeSlot, Rule

log = logging.getLogger(__name__)


class StagedStrategy(FedAvg):
    """Sends sampled clients the stage plan + the rule's tensors; aggregates with the rule.

    Args:
        on_aggregated: called after each aggregation (the server transfers into the full model).
        personal_eval: for personalized rules, the full-model tensors every client evaluates.
        partition_sizes: the clients' training rows where the server knows them: a reply
            claiming more examples than the largest is rejected.

    FedAvg weight of a reply: its `num-examples` (the client's partition size), as shares
    bounded by federation.max_client_share (`devft.core.aggregation.bounded_shares`).
    """

    def __init__(self, cfg: RunConfig, rule: Rule, on_aggregated: Callable[[], None],
                 personal_eval: Callable[[], StateDict] | None = None,
                 partition_sizes: list[int] | None = None, layer_prefix: str = "") -> None:
        n = cfg.federation.num_clients
        per_round = cfg.federation.clients_per_round or n
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if personal_eval else 0.0,
                         min_train_nodes=per_round, min_available_nodes=n)
        self.cfg, self.rule, self.per_round = cfg, rule, per_round
        self.on_aggregated, self.personal_eval = on_aggregated, personal_eval
        self.plan: StagePlan | None = None
        self.round_offset = self.stage_done = 0
        self.slots: dict[int, NodeSlot] = {}
        self.last_train: dict[str, float] = {}
        self.last_eval: float | None = None
        self.sent = 0
        self.shipper = LayerShipper(cfg, rule) if cfg.model.ship_layers else None
        self.skipped = 0
        """Consecutive rounds without federation.min_replies valid replies."""
        self.max_examples = max(partition_sizes) if partition_sizes else None
        self.prefix = layer_prefix
        self.shrink_table: dict[int, Groups] = {}
        """Spectral groups of every shallower depth of the stage (budgets, recipe spectral)."""

    def begin_stage(self, plan: StagePlan, round_offset: int, stage_done: int = 0) -> None:
        """Rounds of this `start` continue the global count after `round_offset`, and the
        stage's own count after `stage_done` (non-zero when resuming mid-stage)."""
        self.plan, self.round_offset, self.stage_done = plan, round_offset, stage_done
        if self.shipper is not None:
            self.shipper.begin_stage(plan)

    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def stage_round(self, server_round: int) -> int:
        return self.stage_done + server_round

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
        # sample positions, not ids: node ids are 64-bit and numpy would round them to floats
        picks = rng.choice(len(nodes), size=min(self.per_round, len(nodes)), replace=False)
        chosen = sorted(nodes[int(i)] for i in picks)
        messages = []
        self.sent = len(chosen)
        shrink: dict[str, list[int]] = {}
        if self.shrink_table:
            flat, sizes = table_to_wire(self.shrink_table)
            shrink = {"shrink-groups": flat, "shrink-sizes": sizes}
        for node in chosen:
            tensors, extra = self.rule.message(self.slots[int(node)])
            record = RecordDict({
                "arrays": to_array_record(tensors),
                "config": ConfigRecord({**plan_to_config(self.plan), **extra, **shrink,
                                        "server-round": server_round, "global-round": round_}),
            })
            dense = self.shipper.payload(int(node)) if self.shipper is not None else None
            if dense is not None:  # model.ship_layers: dense layers the node does not hold yet
                record[SHIPPED] = dense
            messages.append(Message(content=record, message_type=MessageType.TRAIN,
                                    dst_node_id=int(node)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, aggregate the valid ones (at least federation.min_replies).

        Failed replies (the client raised, timed out or disconnected), missing replies and
        rejected ones (see `devft.core.validation.check_update`) are logged and counted.
        """
        round_ = self.global_round(server_round)
        replies = list(replies)
        valid, rejected, failed, errors = [], [], 0, []
        depths: list[Groups | None] = []  # a valid reply's groups (None: the whole stage)
        budgets, sat = [reply_budget(m) for m in replies], 0
        for msg, budget in zip(replies, budgets):
            if sat_out(budget):
                sat += 1
                continue
            if msg.has_error():
                failed += 1
                errors.append(msg.error.reason)
                log.warning("round %d: client node %s failed: %s", round_,
                            msg.metadata.src_node_id, msg.error.reason)
                continue
            reason, groups = self._check_reply(msg, budget)
            if reason is None:
                valid.append(msg)
                depths.append(groups)
            else:
                rejected.append(f"node {msg.metadata.src_node_id}: {reason}")
                log.warning("round %d: rejected the reply of client node %s: %s", round_,
                            msg.metadata.src_node_id, reason)
        if self.shipper is not None:
            self.shipper.confirm(m.metadata.src_node_id for m in valid)
        missing = max(0, self.sent - len(replies))
        if missing:
            log.warning("round %d: %d client(s) sent no reply in time", round_, missing)
        self.last_train = {"clients_ok": len(valid), "clients_failed": failed + missing,
                           "clients_rejected": len(rejected), "rejections": rejected}
        if any(b is not None for b in budgets):
            self.last_train.update(budget_metrics([b for b in budgets if b is not None], sat))
        if len(valid) < self.cfg.federation.min_replies:
            log.warning("round %d: %d valid replies, fewer than federation.min_replies=%d; "
                        "the global adapter is unchanged", round_, len(valid),
                        self.cfg.federation.min_replies)
            self._stalled(round_, failed + missing, rejected, errors)
            return None, None
        self.skipped = 0
        uploads = [from_array_record(m.content["arrays"]) for m in valid]
        metrics = [m.content["metrics"] for m in valid]
        nodes = [self.slots[m.metadata.src_node_id] for m in valid]
        shares = bounded_shares([float(m["num-examples"]) for m in metrics],
                                self.cfg.federation.max_client_share)
        if any(g is not None for g in depths):  # shrunken replies: layer by layer
            self.rule.global_lora = aggregate_depths(uploads, depths, shares,
                                                     self.rule.global_lora, self.prefix,
                                                     self.plan.num_layers)
        else:
            self.rule.aggregate(uploads, nodes, shares)
        self.on_aggregated()
        self.last_train.update(_client_summary(metrics))
        self.last_train["client_shares"] = [round(p, 6) for p in shares]
        return to_array_record(self.rule.eval_lora()), MetricRecord(
            {k: v for k, v in self.last_train.items() if isinstance(v, (int, float))})

    def _stalled(self, round_: int, failed: int, rejected: list[str], errors: list[str]) -> None:
        """Count a skipped round; stop the run after federation.max_skipped_rounds in a row."""
        self.skipped += 1
        fed = self.cfg.federation
        if self.skipped < fed.max_skipped_rounds:
            return
        first = (errors or rejected or ["no reply within federation.timeout_s"])[0]
        raise RunStalledError(
            f"round {round_}: stopped after {self.skipped} rounds in a row with fewer than "
            f"federation.min_replies={fed.min_replies} valid replies ({failed} of {self.sent} "
            f"clients failed, {len(rejected)} rejected); first client error: {one_line(first)}; "
            f"fix the cause, then `devft run --resume {self.cfg.output.dir}` continues from "
            f"the checkpoint of round {round_ - 1}")

    def _check_reply(self, msg: Message, budget: dict[str, Any] | None
                     ) -> tuple[str | None, Groups | None]:
        """Why a reply cannot be aggregated (None: it can), and a shrunken reply's groups over
        the stage's layers (None: it covers the whole stage)."""
        node = self.slots.get(msg.metadata.src_node_id)
        if node is None:
            return "reply from a node that was not sent this round", None
        arrays, metrics = msg.content.get("arrays"), msg.content.get("metrics")
        if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
            return "reply lacks its 'arrays' or 'metrics' record", None
        for key in _REPLY_METRICS:
            value = metrics.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"metric {key!r} is missing or not a finite number", None
        if metrics["num-examples"] <= 0:
            return "num-examples must be positive", None
        if self.max_examples is not None and metrics["num-examples"] > self.max_examples:
            return (f"num-examples={metrics['num-examples']} exceeds the largest client "
                    f"partition ({self.max_examples} training rows)"), None
        try:
            update = from_array_record(arrays)
        except Exception as err:  # a malformed array must not stop the round
            return f"unreadable arrays ({type(err).__name__}: {err})", None
        expected = self.rule.expected_upload(node)
        try:
            groups = reply_groups(budget, self.plan.num_layers)  # type: ignore[union-attr]
        except (ValueError, KeyError, TypeError) as err:
            return str(err), None
        if groups is not None:
            if not self.cfg.federation.shrinks:
                return "a shrunken reply in a run whose clients may not shrink", None
            expected = expected_shrunk(expected, len(groups), self.prefix)
        return check_update(update, expected, self.cfg.federation.max_update_norm), groups

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
        held = [m for m in replies if not sat_out(reply_budget(m))]  # budget: model too big
        valid, _ = self._check_and_log_replies(held, is_train=False)
        if not valid:
            return None
        losses = [float(m.content["metrics"]["eval-loss"]) for m in valid]
        self.last_eval = sum(losses) / len(losses)  # unweighted mean over clients
        return MetricRecord({"eval_loss": self.last_eval, "clients": len(losses)})


_REPLY_METRICS = ("num-examples", "train-loss", "flops", "tokens", "train-time-s",
                  "peak-mem-bytes", "mem-delta-bytes")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(: .*)?")


def one_line(reason: str, limit: int = 200) -> str:
    """A client error on one short line: Flower's `<class 'X'>:<'msg'>` wrapper dropped; for a
    traceback (Ray's replies carry one), its first exception line, i.e. the root cause; then
    whitespace collapsed and the text cut at `limit` characters."""
    text = _ANSI.sub("", reason).strip()
    wrapped = re.fullmatch(r"<class '[^']+'>:<'(.*)'>", text, flags=re.S)
    if wrapped:
        text = wrapped.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any(ln.startswith(("Traceback (most recent call last)", 'File "')) for ln in lines):
        raised = [ln for ln in lines if _EXCEPTION_LINE.fullmatch(ln)]
        lines = raised[:1] or lines[-1:]
    text = " ".join(" ".join(lines).split())
    text = re.sub(r"^Exception ClientAppException occurred\. Message:\s*", "", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _client_summary(metrics: list[MetricRecord]) -> dict[str, float]:
    """Round-level view of the clients' reply metrics (train loss: the mean over the
    examples processed this round, `examples-processed`; older clients: `num-examples`)."""
    done = [float(m.get("examples-processed", m["num-examples"])) for m in metrics]
    return {
        "train_loss": sum(float(m["train-loss"]) * n for m, n in zip(metrics, done))
        / sum(done),
        "examples_processed": sum(done),
        "client_flops": sum(int(m["flops"]) for m in metrics),
        "client_peak_mem_bytes": max(int(m["peak-mem-bytes"]) for m in metrics),
        "client_mem_delta_bytes": max(int(m["mem-delta-bytes"]) for m in metrics),
        "client_time_sum_s": sum(float(m["train-time-s"]) for m in metrics),
        "client_time_max_s": max(float(m["train-time-s"]) for m in metrics),
        "client_tokens": sum(int(m["tokens"]) for m in metrics),
    }
