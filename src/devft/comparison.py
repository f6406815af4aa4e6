"""`devft compare`: run several methods on the same seed, partitions and per-round budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from devft.config import RunConfig
from devft.errors import ConfigError
from devft.federation.runner import run_method
from devft.methods import METHOD_NAMES
from devft.reporting.compare import against_baseline
from devft.reporting.plots import plot_comparison
from devft.reporting.recorder import read_metrics

BASELINE = "fedit"


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
    """Run each method into out_dir/<method>/ and write comparison.json and comparison.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, runs = {}, {}
    for method in methods:
        run_cfg = cfg.replace(**{"method": method, "output.dir": str(out_dir / method)})
        summaries[method] = run_method(run_cfg)
        runs[method] = read_metrics(out_dir / method)
    baseline = runs[BASELINE]
    comparison = {
        "baseline": BASELINE,
        "target_eval_loss": baseline[-1]["eval_loss"],
        "methods": {
            m: {"summary": summaries[m], "vs_fedit": against_baseline(runs[m], baseline)}
            for m in methods
        },
    }
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    plot_comparison(runs, out_dir / "comparison.png", target=comparison["target_eval_loss"])
    return comparison


def comparison_table(comparison: dict[str, Any]) -> Table:
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
        "wall s",
        "time→target",
        "bytes→target",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, entry in comparison["methods"].items():
        s, v = entry["summary"], entry["vs_fedit"]
        table.add_row(
            method,
            str(s["rounds"]),
            f"{s['initial_eval_loss']:.4f}",
            f"{s['final_eval_loss']:.4f}",
            f"{v['final_eval_loss_delta']:+.4f}",
            f"{s['total_bytes_up'] / 1e6:.1f}",
            f"{s['total_bytes_down'] / 1e6:.1f}",
            f"{s['wall_time_s']:.0f}",
            _ratio(v["time_to_target_speedup"]),
            _ratio(v["bytes_to_target_reduction"]),
        )
    return table


def _ratio(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}x"
