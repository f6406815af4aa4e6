"""Plots of the budget study: loss per task group against rounds and client FLOPs, and the
memory-quality frontier (budget_study_report.py reads the numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Curves = dict[str, dict[int, tuple[dict[str, dict[str, Any]], dict[str, Any]]]]
"""model -> seed -> ({run: curve}, the seed's report entry)."""
GROUP_TITLES = {1: "small clients' tasks (group 1)", 0: "large clients' tasks (group 0)"}
STYLE = {"fedit-all": ("k", "-"), "exclude": ("0.45", "--")}


def _style(run: str, i: int) -> tuple[str, str]:
    return STYLE.get(run, (f"C{i}", "-"))


def plot_curves(curves: Curves, out: Path) -> list[Path]:
    """Per model and seed: the smoothed loss of each task group (rows) against rounds and
    cumulative client FLOPs (columns), raw readings faint."""
    paths = []
    for model, seeds in curves.items():
        for seed, (runs, _) in sorted(seeds.items()):
            if not runs:
                continue
            fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
            for row, group in enumerate((1, 0)):
                for col, axis in enumerate(("round", "flops")):
                    ax = axes[row][col]
                    for i, (run, c) in enumerate(runs.items()):
                        color, ls = _style(run, i)
                        x = c[axis]
                        ax.plot(x, c["raw"][group], color=color, alpha=0.2, lw=0.7)
                        ax.plot(x, c["smoothed"][group], color=color, ls=ls, lw=1.5,
                                label=run)
                    ax.set_title(GROUP_TITLES[group], fontsize=9)
                    ax.set_xlabel("round" if axis == "round" else "cumulative client FLOPs")
                    ax.set_ylabel("held-out loss (3-round mean)")
            axes[0][0].legend(fontsize=7)
            fig.suptitle(f"Budget study, {model}, seed {seed}")
            fig.tight_layout()
            path = out / f"budget_study_curves_{model}_seed{seed}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def frontier_points(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed and run: the small clients' largest predicted peak (MiB; fedit-all: the
    whole model in fp32, planned) and the final smoothed loss on their tasks. Runs whose
    small clients sat out every round have no peak (None)."""
    points = []
    for s in model["per_seed"]:
        for run, e in s["runs"].items():
            loss = e["readings"]["final"]["small_tasks"]
            trained = [c for c in e["small_clients"] if c["sat_out"] < c["rounds"]]
            peak = (model["plan"]["full_fp32_mb"] if run == "fedit-all" else
                    max((c["max_predicted_mb"] or 0 for c in trained), default=None))
            points.append({"seed": s["seed"], "run": run, "peak_mb": peak, "loss": loss})
    return points


def plot_frontier(results: dict[str, Any], out: Path) -> Path | None:
    """Per model: each run's small-client peak against the loss reached on the small clients'
    tasks; the budget as a vertical line, runs whose small clients sat out as horizontal
    lines."""
    models = [(m, r) for m, r in results["models"].items() if r["per_seed"]]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, (model, r) in zip(axes.flat, models):
        runs = list(dict.fromkeys(p["run"] for p in frontier_points(r)))
        for p in frontier_points(r):
            if p["loss"] is None:
                continue
            color, ls = _style(p["run"], runs.index(p["run"]))
            if p["peak_mb"] is None:
                ax.axhline(p["loss"], color=color, ls=":", lw=1,
                           label=f"{p['run']} (sat out), seed {p['seed']}")
            else:
                ax.plot([p["peak_mb"]], [p["loss"]], "o", color=color)
                ax.annotate(f"{p['run']} s{p['seed']}", (p["peak_mb"], p["loss"]),
                            fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.axvline(r["plan"]["small_mb"], color="C3", lw=0.8, label="small clients' budget")
        ax.set_xlabel("small clients' largest predicted peak, MiB")
        ax.set_ylabel("final loss on the small clients' tasks")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "budget_study_frontier.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_study(curves: Curves, results: dict[str, Any], out: Path) -> list[Path]:
    frontier = plot_frontier(results, out)
    return plot_curves(curves, out) + ([frontier] if frontier else [])
