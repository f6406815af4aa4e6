"""Plots of the equal-budget study: smoothed curves per seed, and the cost ratios beside the
noise floor (equal_budget_report.py reads the numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from equal_budget_report import losses_of, smooth  # noqa: E402

Curves = dict[str, dict[int, tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]]]
"""model -> seed -> ({method: round records}, the seed's report entry)."""


def plot_curves(curves: Curves, out: Path) -> Path | None:
    """One panel per model and seed: each run's smoothed held-out loss (raw readings faint)
    against client FLOPs ÷ FedIT's cost to its plateau level (so a curve meets the dashed
    target line at its cost ratio)."""
    panels = [(model, seed, runs, entry) for model, seeds in curves.items()
              for seed, (runs, entry) in sorted(seeds.items())
              if entry.get("plateau_round") is not None]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (model, seed, runs, entry) in zip(axes.flat, panels):
        target = entry["targets"]["100%"]
        unit = entry["methods"]["fedit"]["targets"]["100%"].get("flops") or entry["plateau_flops"]
        for i, (m, records) in enumerate(runs.items()):
            x = [r["cum_client_flops"] / unit for r in records]
            color = f"C{i}"
            ax.plot(x, losses_of(records), color=color, alpha=0.25, lw=0.8)
            ax.plot(x, smooth(losses_of(records)), color=color, lw=1.6,
                    ls="--" if m == "fedit-replicate" else "-", label=m)
        ax.axhline(target, color="k", ls="--", lw=0.8)
        ax.set_ylim(target - 0.25, target + 1.2)
        ax.set_title(f"{model}, seed {seed}", fontsize=9)
        ax.set_xlabel("client FLOPs ÷ FedIT's to its plateau level")
        ax.set_ylabel("held-out loss (3-round mean)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Equal budget: smoothed held-out loss; dashed line = FedIT's plateau level")
    fig.tight_layout()
    path = out / "equal_budget_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratios(results: dict[str, Any], out: Path) -> Path | None:
    """Per model: each method's cost to FedIT's plateau level ÷ FedIT's, one dot a seed,
    the mean with its 90 % interval; the replicate's interval (the noise floor) shaded."""
    models = [(m, r) for m, r in results["models"].items() if r["per_seed"]]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4), squeeze=False)
    for ax, (model, r) in zip(axes.flat, models):
        methods = list(r["summary"])
        floor = r["summary"].get("fedit-replicate", {}).get("100%", {}).get("flops_vs_fedit")
        if floor and floor["ci90"]:
            ax.axvspan(*floor["ci90"], color="0.85", label="noise floor (replicate, 90 %)")
        ax.axvline(1.0, color="k", lw=0.8)
        for y, m in enumerate(methods):
            dots = [s["methods"][m]["targets"]["100%"].get("flops_vs_fedit")
                    for s in r["per_seed"] if m in s.get("methods", {})]
            dots = [d for d in dots if d is not None]
            ax.plot(dots, [y] * len(dots), "o", color="C0", alpha=0.5, ms=4)
            iv = r["summary"][m]["100%"]["flops_vs_fedit"]
            if iv["mean"] is not None:
                ax.plot([iv["mean"]], [y], "D", color="C3", ms=6)
            if iv["ci90"]:
                ax.plot(iv["ci90"], [y, y], color="C3", lw=2)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.set_xlabel("client FLOPs to FedIT's plateau level ÷ FedIT's")
        ax.set_title(model, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "equal_budget_ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_study(curves: Curves, results: dict[str, Any], out: Path) -> list[Path]:
    return [p for p in (plot_curves(curves, out), plot_ratios(results, out)) if p]
