"""`devft compare`: run several methods on the same seed, partitions and per-round budget."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from devft.config import RunConfig
from devft.config.compat import same_config
from devft.errors import ConfigError, RunFileError
from devft.federation.checkpoint import CHECKPOINTS
from devft.federation.runner import run_method
from devft.files import atomic_write_json, read_json_object
from devft.lock import LOCK_FILE, output_lock
from devft.methods import METHOD_NAMES
from devft.reporting.compare import against_baseline
from devft.reporting.plots import plot_comparison
from devft.reporting.recorder import METRICS_FILE, SUMMARY_FILE, read_metrics

BASELINE = "fedit"
log = logging.getLogger(__name__)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if not methods or unknown:
        raise ConfigError(
            "--methods", text, f"comma-separated names from {', '.join(METHOD_NAMES)}"
        )
    if BASELINE not in methods:
        methods.append(BASELINE)  # every comparison is against FedIT
    return list(dict.fromkeys(methods))


def compare_methods(cfg: RunConfig, methods: list[str], out_dir: Path) -> dict[str, Any]:
    """Run each method into out_dir/<method>/ and write comparison.json and comparison.png.

    No lost work: a method whose run directory already holds a finished run of the same
    config is reused, and an interrupted one is resumed from its last checkpoint. Holds
    out_dir's lock throughout (each run also locks its own directory).
    """
    with output_lock(out_dir, "devft compare"):
        return _compare(cfg, methods, out_dir)


def _compare(cfg: RunConfig, methods: list[str], out_dir: Path) -> dict[str, Any]:
    summaries, runs = {}, {}
    for method in methods:
        run_cfg = cfg.replace(**{"method": method, "output.dir": str(out_dir / method)})
        summaries[method] = run_or_reuse(run_cfg)
        runs[method] = read_metrics(out_dir / method)
        if not runs[method] or runs[method][-1]["round"] != summaries[method]["rounds"]:
            raise RunFileError(f"{out_dir / method / 'metrics.jsonl'} ends before round "
                               f"{summaries[method]['rounds']} of its summary.json: remove "
                               f"{out_dir / method} and run again")
    baseline = runs[BASELINE]
    comparison = {
        "baseline": BASELINE,
        "target_eval_loss": baseline[-1]["eval_loss"],
        "methods": {
            m: {"summary": summaries[m], "vs_fedit": against_baseline(runs[m], baseline)}
            for m in methods
        },
    }
    atomic_write_json(out_dir / "comparison.json", comparison)
    plot_comparison(runs, out_dir / "comparison.png", target=comparison["target_eval_loss"])
    return comparison


def run_or_reuse(run_cfg: RunConfig) -> dict[str, Any]:
    """The summary of a finished run of exactly this config in its output dir, if there is
    one; else the run, resumed from its last checkpoint when it was interrupted. Holds the
    run directory's lock, so a live run there is never read half-written."""
    with output_lock(run_cfg.output.dir, f"devft compare: {run_cfg.method}"):
        return _finished(run_cfg) or run_method(_maybe_resume(_set_aside_other(run_cfg)))


EXTENDED = "extended-"
"""Prefix of the subfolder that keeps a finished run's summary and scores when the run is
extended under another stop rule (its rounds stay; they are the extended run's first)."""


def _extend_finished(run_cfg: RunConfig) -> None:
    """A finished run here that differs from run_cfg only in its stop rule, and kept its last
    checkpoint, is extended (resumed under the new rule) instead of run again: its summary
    and MC scores, which no longer describe the run, move to DIR/extended-<time>/."""
    out = Path(run_cfg.output.dir)
    if not (out / SUMMARY_FILE).is_file() or _same_config(run_cfg) or not _same_config(
            run_cfg, ignore=("output", "stop")) or not _has_checkpoint(out):
        return
    aside = out / f"{EXTENDED}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    shutil.copy2(out / "config.json", aside / "config.json")  # the new run rewrites it
    for name in (SUMMARY_FILE, "mc_eval.json"):
        if (out / name).is_file():
            (out / name).rename(aside / name)
    log.warning("%s: extending the finished run in %s under stop=%s (its summary moved to "
                "%s)", run_cfg.method, out, run_cfg.stop, aside)


REPLACED = "replaced-"
"""Prefix of the subfolder a run of another config is moved into before a new run starts
in its directory (its records, adapter and scores kept, out of the new run's way)."""


def _set_aside_other(run_cfg: RunConfig) -> RunConfig:
    """Move a run of another config out of run_cfg's directory, into DIR/replaced-<time>/,
    so its summary, adapter and scores are neither read as the new run's nor lost."""
    out = Path(run_cfg.output.dir)
    _extend_finished(run_cfg)
    if not (out / "config.json").is_file() or _same_config(run_cfg):
        return run_cfg
    if _has_checkpoint(out) and _same_config(run_cfg, ignore=("output", "stop")):
        return run_cfg  # an interrupted run under another stop rule: resumed, extended
    aside = out / f"{REPLACED}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for entry in out.iterdir():
        if entry != aside and entry.name != LOCK_FILE and not entry.name.startswith(REPLACED):
            entry.rename(aside / entry.name)
    log.warning("%s: %s held a run of another config; moved it to %s", run_cfg.method, out,
                aside)
    return run_cfg


def _has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINTS / "latest.json").is_file()


def _same_config(run_cfg: RunConfig, ignore: tuple[str, ...] = ("output",)) -> bool:
    """Whether the dir's config.json is this config (devft.config.compat.same_config)."""
    path = Path(run_cfg.output.dir) / "config.json"
    return path.is_file() and same_config(read_json_object(path), run_cfg.to_dict(), ignore)


def _finished(run_cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of an already finished run of exactly this config, if any."""
    summary = Path(run_cfg.output.dir) / SUMMARY_FILE
    if summary.is_file() and _same_config(run_cfg):
        log.info("%s: reusing the finished run in %s", run_cfg.method, run_cfg.output.dir)
        return read_json_object(summary, ("rounds", "final_eval_loss"))
    return None


def saved_run(run_cfg: RunConfig) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(summary or None while unfinished, round records so far) of the run of exactly this
    config saved in its output dir, without running or locking anything (a report may read
    a live run: a half-written last line is dropped); (None, []) when there is none."""
    out = Path(run_cfg.output.dir)
    if not _same_config(run_cfg):
        return None, []
    summary = out / SUMMARY_FILE
    records = read_metrics(out) if (out / METRICS_FILE).is_file() else []
    return (read_json_object(summary, ("rounds", "final_eval_loss"))
            if summary.is_file() else None), records


def _maybe_resume(run_cfg: RunConfig) -> RunConfig:
    """Resume an interrupted run of this config; otherwise start afresh."""
    out = Path(run_cfg.output.dir)
    if _has_checkpoint(out) and _same_config(run_cfg, ignore=("output", "stop")):
        log.info("%s: resuming the run in %s", run_cfg.method, run_cfg.output.dir)
        return run_cfg.replace(**{"output.resume": True})
    return run_cfg


def comparison_table(comparison: dict[str, Any]) -> Table:
    """One row per method; with model.ship_layers, a column of the dense bytes shipped down
    (already part of "MB down")."""
    shipped = any(e["summary"].get("total_dense_bytes_down") for e in
                  comparison["methods"].values())
    table = Table(
        title=f"held-out loss target = {BASELINE}'s final ({comparison['target_eval_loss']:.4f})"
    )
    for col in (
        "method",
        "rounds",
        "initial loss",
        "final loss",
        "Δ vs fedit",
        "MB up",
        "MB down",
        *(["of which dense"] if shipped else []),
        "wall s",
        "time→target",
        "bytes→target",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, entry in comparison["methods"].items():
        s, v = entry["summary"], entry["vs_fedit"]
        dense = [f"{s.get('total_dense_bytes_down', 0) / 1e6:.1f}"] if shipped else []
        table.add_row(
            method,
            str(s["rounds"]),
            f"{s['initial_eval_loss']:.4f}",
            f"{s['final_eval_loss']:.4f}",
            f"{v['final_eval_loss_delta']:+.4f}",
            f"{s['total_bytes_up'] / 1e6:.1f}",
            f"{s['total_bytes_down'] / 1e6:.1f}",
            *dense,
            f"{s['wall_time_s']:.0f}",
            _ratio(v["time_to_target_speedup"]),
            _ratio(v["bytes_to_target_reduction"]),
        )
    return table


def _ratio(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}x"
