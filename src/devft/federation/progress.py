"""What an operator reads in a deployment's logs: one line per round, a summary, the data served.

Flower's own lines restart at "ROUND 1/1" for every DevFT stage (one `Strategy.start` per
stage), so the ServerApp logs its own line per global round: stage, layers, held-out loss,
bytes and failed/rejected clients; then one summary line with the output directory. A
ClientApp logs which data its node serves. The lines go to the `devft.operator` logger,
which stays silent unless `enable_operator_log()` gave it a handler: the ServerApp and
ClientApp of `flwr run` do (their stdout is what `flwr log` and `flwr run --stream` show, and
what the SuperNode prints), in-process runs keep their progress bars instead.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

OPERATOR = logging.getLogger("devft.operator")
OPERATOR.propagate = False
OPERATOR.addHandler(logging.NullHandler())
_FORMAT = "%(levelname)s devft: %(message)s"


def enable_operator_log() -> None:
    """Print operator lines, and devft's own INFO logs, on stdout (idempotent).

    Called in the ServerApp and ClientApp processes of a Flower deployment, whose stdout
    Flower forwards to `flwr log` (ServerApp) or the SuperNode's log (ClientApp)."""
    for logger in (OPERATOR, logging.getLogger("devft")):
        if not any(getattr(h, "_devft_operator", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter(_FORMAT))
            handler._devft_operator = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)


def _mb(n: Any) -> str:
    return f"{(n or 0) / 1e6:.2f} MB"


def _loss(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def round_line(record: dict[str, Any], total_rounds: int, num_stages: int) -> str:
    """One global round: `round 3/8 | stage 2/4 (8 layers, round 1 of it) | ...`."""
    head = (f"round {record['round']}/{total_rounds} | stage {record['stage'] + 1}/{num_stages} "
            f"({record['layers_trained']} layers")
    if record["round"] == 0:
        return f"{head}, initial) | held-out loss {_loss(record.get('eval_loss'))}"
    return (f"{head}, round {record.get('stage_round', 0)} of it) | held-out loss "
            f"{_loss(record.get('eval_loss'))} | bytes down {_mb(record.get('bytes_down'))} "
            f"up {_mb(record.get('bytes_up'))} (total {_mb(record.get('cum_bytes'))}) | "
            f"clients ok {record.get('clients_ok', 0)} failed {record.get('clients_failed', 0)} "
            f"rejected {record.get('clients_rejected', 0)}")


def summary_line(summary: dict[str, Any], out_dir: str) -> str:
    """The run's end: rounds, losses, bytes, wall time and where the outputs are."""
    return (f"finished {summary['method']}: {summary['rounds']} rounds, held-out loss "
            f"{_loss(summary.get('initial_eval_loss'))} -> {_loss(summary.get('final_eval_loss'))}"
            f", {_mb(summary.get('total_bytes'))} exchanged, {summary.get('wall_time_s', 0):.0f} s;"
            f" outputs in {out_dir} (adapter/, summary.json, metrics.jsonl, loss.png)")


def data_line(partition: int, num_partitions: int, rows: int, shard: str | None,
              data_name: str) -> str:
    """Which data a ClientApp trains on: its shard file, or its partition of the data set."""
    source = f"shard {shard}" if shard else f"its partition of {data_name}"
    return f"client partition {partition} of {num_partitions}: {rows} training rows from {source}"
