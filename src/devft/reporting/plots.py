"""Plots: one run's losses by round, and several methods against round, bytes and wall time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _stage_bounds(records: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(stage, first round, last round) of each stage, from the round records."""
    bounds: list[tuple[int, int, int]] = []
    for r in records:
        if r["round"] == 0:
            continue
        if bounds and bounds[-1][0] == r["stage"]:
            bounds[-1] = (r["stage"], bounds[-1][1], r["round"])
        else:
            bounds.append((r["stage"], r["round"], r["round"]))
    return bounds


def plot_run(records: list[dict[str, Any]], path: Path) -> None:
    """Held-out loss of the full model (and the submodel, and client train loss) by round."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = [r["round"] for r in records]
    ax.plot(rounds, [r["eval_loss"] for r in records], "o-", label="held-out loss (full model)")
    sub = [(r["round"], r["sub_eval_loss"]) for r in records if r.get("sub_eval_loss") is not None]
    if sub:
        ax.plot(*zip(*sub), "s--", alpha=0.7, label="held-out loss (stage submodel)")
    train = [(r["round"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    if train:
        ax.plot(*zip(*train), ":", alpha=0.7, label="client train loss")
    for i, (stage, first, last) in enumerate(_stage_bounds(records)):
        layers = next(r["layers_trained"] for r in records if r["round"] == first)
        ax.axvspan(first - 0.5, last + 0.5, color=f"C{i % 10}", alpha=0.06)
        ax.text((first + last) / 2, 1.0, f"S{stage}: {layers}L", ha="center", va="bottom",
                transform=ax.get_xaxis_transform(), fontsize=8)
    if sub:
        top = max(r["eval_loss"] for r in records if r["eval_loss"] is not None)
        ax.set_ylim(top=top * 1.5)  # fused submodels can have very high losses
    ax.set_xlabel("round")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(f"{records[0]['method']}", pad=16)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(runs: dict[str, list[dict[str, Any]]], path: Path,
                    target: float | None = None) -> None:
    """Held-out loss of each method against round, cumulative bytes and wall time."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    xs = [("round", "round", 1), ("cum_bytes", "communication (MB, up + down)", 1e6),
          ("wall_time_s", "wall time (s, excl. evaluation)", 1)]
    for ax, (key, label, scale) in zip(axes, xs):
        for i, (method, records) in enumerate(runs.items()):
            ax.plot([r[key] / scale for r in records], [r["eval_loss"] for r in records],
                    "o-", ms=3, color=f"C{i % 10}", label=method)
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=0.8, label="target (FedIT final)")
        ax.set_xlabel(label)
    axes[0].set_ylabel("held-out loss (full model)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
