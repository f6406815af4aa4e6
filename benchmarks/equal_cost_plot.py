"""The equal-cost study's figures: held-out loss against cost, all methods, every model.

Curves hold, per model and method, each seed's run as (seed, round records, finished).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from equal_cost_report import AXES, Records, cost_to, loss  # noqa: E402

SeedRun = tuple[int, Records, bool]
Curves = dict[str, dict[str, list[SeedRun]]]
AXIS_LABELS = {"flops": ("cumulative client FLOPs", 1.0),
               "bytes": ("cumulative MB (up + down)", 1e-6),
               "time": ("wall time (s, excl. evaluation)", 1.0)}


def plot(curves: Curves, targets: dict[str, Any], out: Path) -> list[Path]:
    """Per x axis one PNG, one column per model: thin lines per seed, a bold line for the mean
    over the finished seeds (on the mean x, up to the shortest one's run; over the running
    ones if none is finished), FedIT's targets dashed; the lower row zooms in on the race
    to the 100 % target."""
    paths = []
    for axis, key in AXES.items():
        label, scale = AXIS_LABELS[axis]
        fig, axes = plt.subplots(2, len(curves), figsize=(7 * len(curves), 8), squeeze=False)
        for col, (model, methods) in enumerate(curves.items()):
            for row in (0, 1):
                ax = axes[row][col]
                for i, (method, seeds) in enumerate([(m, r) for m, r in methods.items() if r]):
                    color = f"C{i}"
                    for _, r, _ in seeds:
                        ax.plot([x[key] * scale for x in r], [loss(x) for x in r],
                                color=color, lw=0.6, alpha=0.35)
                    done = [r for _, r, finished in seeds if finished]
                    mean_of = done or [r for _, r, _ in seeds]
                    n = min(len(r) for r in mean_of)
                    xs = np.mean([[r[j][key] for j in range(n)] for r in mean_of], axis=0) * scale
                    ys = np.mean([[loss(r[j]) for j in range(n)] for r in mean_of], axis=0)
                    count = f"{len(seeds)} seed" + ("s" if len(seeds) > 1 else "")
                    running = len(seeds) - len(done)
                    count += f", {running} running" if running else ""
                    ax.plot(xs, ys, color=color, lw=1.6, label=f"{method} ({count})")
                goal = targets.get(model, {}).get("100%")
                if row == 1 and goal is not None:
                    ax.set_ylim(goal - 0.15, goal + 0.6)
                _target_lines(ax, targets.get(model, {}))
                ax.set(xlabel=label, ylabel="held-out loss (full model)",
                       title=model if row == 0 else f"{model}: near the 100 % target")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"equal_cost_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _target_lines(ax, targets: dict[str, float]) -> None:
    low, high = ax.get_ylim()
    for name, value in targets.items():
        if low <= value <= high:
            ax.axhline(value, ls="--", lw=0.7, color="grey")
            ax.annotate(name, (1.0, value), xycoords=("axes fraction", "data"),
                        fontsize=7, ha="right", va="bottom", color="grey")


def seed_panels(curves: Curves) -> list[dict[str, Any]]:
    """One panel per model and seed whose FedIT run has records: that seed's target (FedIT's
    final loss) and each method's (FLOPs ÷ FedIT's FLOPs to first reach it, loss) points, so
    a curve crosses the target line at its cost ratio on that seed (FedIT's at 1)."""
    panels = []
    for model, methods in curves.items():
        for seed, fedit, finished in methods.get("fedit", []):
            target = loss(fedit[-1])
            hit = cost_to(fedit, target)
            unit = float(hit["flops"] if hit else fedit[-1]["cum_client_flops"])
            lines = {}
            for method, runs in methods.items():
                for s, records, done in runs:
                    if s == seed:
                        lines[method] = {"x": [r["cum_client_flops"] / unit for r in records],
                                         "y": [loss(r) for r in records], "finished": done}
            panels.append({"model": model, "seed": seed, "target": target,
                           "target_final": finished, "lines": lines})
    return panels


def plot_by_seed(curves: Curves, out: Path) -> Path | None:
    """equal_cost_by_seed.png: a row per model, a column per seed, like for like (each method
    against FedIT of the same seed), near the target; None when no seed has FedIT records."""
    panels = seed_panels(curves)
    if not panels:
        return None
    models = list(dict.fromkeys(p["model"] for p in panels))
    seeds = sorted({p["seed"] for p in panels})
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(
        m for p in panels for m in p["lines"]))}
    fig, axes = plt.subplots(len(models), len(seeds), figsize=(5.5 * len(seeds),
                             4.2 * len(models)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
        ax.text(0.5, 0.5, "no FedIT round records of this seed\n(not in the study, or its "
                "rows come from the ledger)", ha="center", va="center", fontsize=9, color="grey")
    for p in panels:
        ax = axes[models.index(p["model"])][seeds.index(p["seed"])]
        ax.clear()
        ax.axis("on")
        for method, line in p["lines"].items():
            ax.plot(line["x"], line["y"], color=colors[method],
                    lw=2.0 if method == "fedit" else 1.2, ls="-" if line["finished"] else ":",
                    label=method + ("" if line["finished"] else " (running)"))
        ax.set_ylim(p["target"] - 0.15, p["target"] + 0.6)
        ax.set_xlim(0, max(2.2, *(min(max(ln["x"]), 3.0) for ln in p["lines"].values())))
        _target_lines(ax, {"target" + ("" if p["target_final"] else " (provisional)"):
                           p["target"]})
        ax.axvline(1.0, color="grey", lw=0.7, ls=":")
        ax.set(xlabel="client FLOPs ÷ FedIT's to its plateau loss",
               ylabel="held-out loss (full model)", title=f"{p['model']}, seed {p['seed']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "equal_cost_by_seed.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
