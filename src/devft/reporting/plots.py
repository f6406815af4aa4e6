"""Plots: one run's losses by round, and several methods against round, bytes and wall time.

matplotlib (the [server] extra) is imported on the first plot, so importing this module works
on a core-only install, where plotting is refused with one line naming the extra."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from devft.extras import require_extra
from devft.files import atomic_path


@functools.cache
def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    require_extra("server", "plotting (loss.png, comparison.png)", modules=("matplotlib",))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """PNG written atomically (devft.files), so a kill never leaves half an image."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


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


def _shade_stages(ax, records: list[dict[str, Any]]) -> None:
    for i, (stage, first, last) in enumerate(_stage_bounds(records)):
        layers = next(r["layers_trained"] for r in records if r["round"] == first)
        ax.axvspan(first - 0.5, last + 0.5, color=f"C{i % 10}", alpha=0.06)
        ax.text(
            (first + last) / 2,
            1.0,
            f"S{stage}: {layers}L",
            ha="center",
            va="bottom",
            transform=ax.get_xaxis_transform(),
            fontsize=8,
        )


def plot_run(records: list[dict[str, Any]], path: Path) -> None:
    """Left: held-out loss of the full model (after transfer) by round. Middle: the model the
    clients actually train (the stage submodel): its held-out loss and the clients' train loss.
    Right (when recorded): mean per-layer ‖A‖_F relative to a fresh init, and mean ‖B‖_F.
    """
    plt = _pyplot()
    norms = any("A_rel_fresh" in r.get("adapter_norms", {}).get("full", {}) for r in records)
    fig, axes = plt.subplots(1, 3 if norms else 2, figsize=(17 if norms else 12, 4.2))
    full_ax, sub_ax = axes[0], axes[1]
    if norms:
        _plot_norms(axes[2], records)
    full_ax.plot(
        [r["round"] for r in records],
        [r["eval_loss"] for r in records],
        "o-",
        label="held-out loss, full model + global LoRA",
    )
    sub = [
        (r["round"], r["sub_eval_loss"] if r.get("sub_eval_loss") is not None else r["eval_loss"])
        for r in records
    ]
    sub_ax.plot(*zip(*sub), "s-", label="held-out loss, trained (sub)model")
    train = [(r["round"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    if train:
        sub_ax.plot(*zip(*train), ":", marker=".", label="client train loss")
    sub_ax.set_yscale("log")
    for ax, title in ((full_ax, "full model"), (sub_ax, "what the clients train")):
        _shade_stages(ax, records)
        ax.set_xlabel("round")
        ax.set_ylabel("loss per response token")
        ax.set_title(title, pad=16)
        ax.legend(fontsize=8)
    fig.suptitle(records[0]["method"])
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _plot_norms(ax, records: list[dict[str, Any]]) -> None:
    """The adapter's scale by round: ‖A‖ / fresh init (left axis) and ‖B‖ (right axis)."""
    top = 1.3
    for part, style in (("full", "o-"), ("submodel", "s--")):
        pts = [(r["round"], r["adapter_norms"][part]["A_rel_fresh"]["mean"]) for r in records
               if "A_rel_fresh" in r.get("adapter_norms", {}).get(part, {})]
        if pts:
            ax.plot(*zip(*pts), style, ms=4, label=f"‖A‖ / fresh init, {part}")
            top = max(top, 1.1 * max(v for _, v in pts))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, top)
    ax.set_ylabel("mean per-layer ‖A‖_F / √(r/3)")
    b_ax = ax.twinx()
    pts = [(r["round"], r["adapter_norms"]["full"]["B"]["mean"]) for r in records
           if "B" in r.get("adapter_norms", {}).get("full", {})]
    if pts:
        b_ax.plot(*zip(*pts), "^:", color="C3", ms=4, label="‖B‖_F, full model")
    b_ax.set_ylabel("mean per-layer ‖B‖_F")
    _shade_stages(ax, records)
    ax.set_xlabel("round")
    ax.set_title("adapter norms", pad=16)
    lines = ax.get_legend_handles_labels()
    more = b_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")


def plot_comparison(
    runs: dict[str, list[dict[str, Any]]], path: Path, target: float | None = None
) -> None:
    """Held-out loss of each method against round, cumulative bytes and wall time."""
    plt = _pyplot()
    many = len(runs) > 10  # beyond one colour cycle: tab20 plus a line style per cycle
    fig, axes = plt.subplots(1, 3, figsize=(18 if many else 15, 4.8 if many else 4.2),
                             sharey=True)
    xs = [
        ("round", "round", 1),
        ("cum_bytes", "communication (MB, up + down)", 1e6),
        ("wall_time_s", "wall time (s, excl. evaluation)", 1),
    ]
    for ax, (key, label, scale) in zip(axes, xs):
        for i, (method, records) in enumerate(runs.items()):
            ax.plot(
                [r[key] / scale for r in records],
                [r["eval_loss"] for r in records],
                "o-" if i < 20 else "s--",
                ms=3,
                lw=2.2 if method == "fedit" else 1.2,
                color=plt.get_cmap("tab20")(i % 20) if many else f"C{i % 10}",
                label=method,
            )
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=0.8, label="target (FedIT final)")
        ax.set_xlabel(label)
    axes[0].set_ylabel("held-out loss (full model)")
    if many:
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
