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
    one; else the run: resumed from its last checkpoint when it was interrupted, or extended
    when it finished under another stop rule, or started afresh (a run of another config is
    first moved aside). Holds the run directory's lock, so a live run there is never read
    half-written."""
    out = Path(run_cfg.output.dir)
    with output_lock(out, f"devft compare: {run_cfg.method}"):
        saved = _saved_config(run_cfg)
        finished, checkpoint = (out / SUMMARY_FILE).is_file(), _has_checkpoint(out)
        if saved == SAME and finished:
            log.info("%s: reusing the finished run in %s", run_cfg.method, out)
            return read_json_object(out / SUMMARY_FILE, ("rounds", "final_eval_loss"))
        if saved == OTHER_STOP and checkpoint and finished:
            _set_aside_summary(run_cfg)
        elif (saved == OTHER_STOP and not checkpoint) or saved == OTHER:
            _set_aside_run(run_cfg)
        if checkpoint and saved in (SAME, OTHER_STOP):
            log.info("%s: resuming the run in %s", run_cfg.method, out)
            run_cfg = run_cfg.replace(**{"output.resume": True})
        return run_method(run_cfg)


NONE, SAME, OTHER_STOP, OTHER = "none", "same", "other stop rule", "other config"
"""What a run directory's config.json is to a run's config: absent, the same (up to
`output`), the same but for its stop rule, or another config."""


def _saved_config(run_cfg: RunConfig) -> str:
    path = Path(run_cfg.output.dir) / "config.json"
    if not path.is_file():
        return NONE
    saved, wanted = read_json_object(path), run_cfg.to_dict()
    if same_config(saved, wanted, ("output",)):
        return SAME
    return OTHER_STOP if same_config(saved, wanted, ("output", "stop")) else OTHER


EXTENDED = "extended-"
"""Prefix of the subfolder that keeps a finished run's summary and scores when the run is
extended under another stop rule (its rounds stay; they are the extended run's first)."""


def _set_aside_summary(run_cfg: RunConfig) -> None:
    """A finished run that differs from run_cfg only in its stop rule, and kept its last
    checkpoint, is extended (resumed under the new rule) instead of run again: its summary
    and MC scores, which no longer describe the run, move to DIR/extended-<time>/."""
    out = Path(run_cfg.output.dir)
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


def _set_aside_run(run_cfg: RunConfig) -> None:
    """Move a run of another config out of run_cfg's directory, into DIR/replaced-<time>/,
    so its summary, adapter and scores are neither read as the new run's nor lost."""
    out = Path(run_cfg.output.dir)
    aside = out / f"{REPLACED}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for entry in out.iterdir():
        if entry != aside and entry.name != LOCK_FILE and not entry.name.startswith(REPLACED):
            entry.rename(aside / entry.name)
    log.warning("%s: %s held a run of another config; moved it to %s", run_cfg.method, out,
                aside)


def _has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINTS / "latest.json").is_file()


def saved_run(run_cfg: RunConfig) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(summary or None while unfinished, round records so far) of the run of exactly this
    config saved in its output dir, without running or locking anything (a report may read
    a live run: a half-written last line is dropped); (None, []) when there is none."""
    out = Path(run_cfg.output.dir)
    if _saved_config(run_cfg) != SAME:
        return None, []
    summary = out / SUMMARY_FILE
    records = read_metrics(out) if (out / METRICS_FILE).is_file() else []
    return (read_json_object(summary, ("rounds", "final_eval_loss"))
            if summary.is_file() else None), records


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
