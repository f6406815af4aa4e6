"""Per-round metrics of a run, written as each round ends (metrics.jsonl), and its summary.

Each line is flushed and fsynced when the round ends, so a crash at round k loses nothing
before k; a line cut short by a kill is dropped when read, and `summary.json` is written
atomically (`devft.files`). Wall time excludes the server's measurement-only evaluation (it
is reported separately as eval_time_s) so methods are compared on the cost of training itself.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from devft.files import (
    append_line,
    atomic_write_json,
    atomic_write_text,
    file_digests,
    read_jsonl,
)
from devft.reporting.host import UNRECORDED, host_fingerprint, with_host

METRICS_FILE, SUMMARY_FILE, ADAPTER_DIR = "metrics.jsonl", "summary.json", "adapter"


class RunRecorder:
    def __init__(self, out_dir: Path, method: str, total_rounds: int, progress: bool,
                 fresh: bool = True) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        if fresh:  # an older run's summary here must not pass for this run's
            (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
            atomic_write_text(self.path, "")
        self.method, self.total_rounds = method, total_rounds
        self.records: list[dict[str, Any]] = []
        self.stages: list[dict[str, Any]] = []
        self.cum = {"bytes_down": 0, "bytes_up": 0, "client_flops": 0}
        self.eval_time = 0.0
        self.hosts = [host_fingerprint()]
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_rounds, desc=f"{method} rounds", disable=not progress)

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue this recorder."""
        return {"stages": self.stages, "cum": self.cum, "eval_time": self.eval_time,
                "wall_time": self.wall_time(), "hosts": self.hosts}

    def restore(self, state: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint: its records (metrics.jsonl is rewritten to them),
        counters and clock (downtime between the crash and the resume is not counted)."""
        self.stages, self.cum = state["stages"], dict(state["cum"])
        self.eval_time = state["eval_time"]
        self.hosts = with_host(list(state.get("hosts") or [UNRECORDED]), self.hosts[-1])
        self.start = time.perf_counter() - state["wall_time"] - self.eval_time
        self.records = list(records)
        atomic_write_text(self.path, "".join(json.dumps(_finite(r)) + "\n" for r in records))
        self.bar.update(records[-1]["round"] if records else 0)

    def wall_time(self) -> float:
        """Seconds since the run started, minus measurement-only evaluation."""
        return time.perf_counter() - self.start - self.eval_time

    def timed_eval(self, fn, *args: Any) -> Any:
        """Run an evaluation whose time is not charged to the method."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.eval_time += time.perf_counter() - t

    def stage_started(
        self, stage: int, num_layers: int, rounds: int, groups: list[list[int]],
        report: dict[str, Any] | None = None,
    ) -> None:
        """A stage's entry in the summary; `report` is GlobalModel.stage_report (norms,
        fusion cross term, fresh and clamped groups)."""
        self.stages.append({"stage": stage, "num_layers": num_layers, "rounds": rounds,
                            "groups": groups, **(report or {})})

    def record_round(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add cumulative counters and timing to `record` and append it to metrics.jsonl."""
        for key in self.cum:
            self.cum[key] += int(record.get(key, 0) or 0)
            record[f"cum_{key}"] = self.cum[key]
        record["cum_bytes"] = self.cum["bytes_down"] + self.cum["bytes_up"]
        record["wall_time_s"] = round(self.wall_time(), 3)
        record["eval_time_s"] = round(self.eval_time, 3)
        record = {"method": self.method, **record}
        self.records.append(record)
        append_line(self.path, json.dumps(_finite(record)))
        if record["round"] > 0:
            self.bar.update(1)
            self.bar.set_postfix(stage=record.get("stage"), loss=f"{record['eval_loss']:.3f}")
        return record

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (after the adapter: it records the SHA-256 of each of its files,
        which `devft fetch` checks a copy against)."""
        self.bar.close()
        last = self.records[-1]
        summary = {
            "method": self.method,
            "rounds": last["round"],
            "initial_eval_loss": self.records[0]["eval_loss"],
            "final_eval_loss": last["eval_loss"],
            "total_bytes_up": self.cum["bytes_up"],
            "total_bytes_down": self.cum["bytes_down"],
            "total_bytes": self.cum["bytes_up"] + self.cum["bytes_down"],
            "total_client_flops": self.cum["client_flops"],
            "wall_time_s": last["wall_time_s"],
            "eval_time_s": round(self.eval_time, 3),
            "stages": self.stages,
            "hosts": self.hosts,
            **extra,
        }
        if (self.out_dir / ADAPTER_DIR).is_dir():
            summary["adapter_sha256"] = file_digests(self.out_dir / ADAPTER_DIR)
        atomic_write_json(self.out_dir / SUMMARY_FILE, _finite(summary))
        return summary


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The round records of a run directory (a truncated last line is dropped, with a
    warning; any other bad line is a RunFileError naming the file)."""
    return read_jsonl(Path(out_dir) / METRICS_FILE)
