"""How much the fusion's β and residual scale change a fused submodel, before any training.

For each stage of `devft-calibrated` on the config (default: the bundled SmolLM2-135M), the
server's own GlobalModel plans the stage: it groups the layers, then searches every
(β, γ) of --betas × --residuals on its calibration rows, exactly as a run does. This script
then scores every grid point on the evaluation rows too, to show whether the calibration
rows pick what the evaluation rows would (they are disjoint). All submodels carry the
stage's initial LoRA (B = 0), so this is the fused base alone; later stages are grouped on
the untrained model, not after training as in a run. Writes calibration_grid.json and
calibration_grid.png (loss against β, one line per γ, per stage).

    python benchmarks/calibration_grid.py --out runs/bench/calibration-grid
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import run_script  # noqa: E402

from devft.cli import setup_logging  # noqa: E402
from devft.config import load_config  # noqa: E402
from devft.federation.global_model import GlobalModel  # noqa: E402
from devft.federation.runner import prepare  # noqa: E402
from devft.rules import make_rule  # noqa: E402


def stage_grid(model: GlobalModel, stage) -> dict[str, Any]:
    """One stage: the chosen point and every grid point's calibration and evaluation loss."""
    start = time.perf_counter()
    plan, _ = model.plan_stage(stage)
    report = model.stage_report
    points = []
    for row in report["calibration_grid"]:
        point = replace(plan, beta=row["beta"], residual=row["residual"])
        sub, _ = model.initial_adapter(point)
        points.append({**row, "eval_loss": model.eval_submodel(point, sub)})
    best_eval = min(points, key=lambda p: p["eval_loss"])
    chosen = next(p for p in points if (p["beta"], p["residual"]) == (plan.beta, plan.residual))
    return {"stage": stage.index, "layers": stage.num_layers,
            "groups": [list(g) for g in plan.groups],
            "chosen": {"beta": plan.beta, "residual": plan.residual},
            "chosen_eval_loss": chosen["eval_loss"],
            "best_on_eval": {"beta": best_eval["beta"], "residual": best_eval["residual"],
                             "eval_loss": best_eval["eval_loss"]},
            "calibration_time_s": report["calibration_time_s"], "points": points,
            "time_s": round(time.perf_counter() - start, 1)}


def plot(stages: list[dict[str, Any]], full_loss: float, path: Path) -> None:
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for i, gamma in enumerate(sorted({p["residual"] for p in stage["points"]})):
            rows = [p for p in stage["points"] if p["residual"] == gamma]
            betas = [p["beta"] for p in rows]
            ax.plot(betas, [p["eval_loss"] for p in rows], "o-", color=f"C{i}",
                    label=f"γ={gamma:g}, eval rows")
            ax.plot(betas, [p["calib_loss"] for p in rows], "x--", color=f"C{i}", alpha=0.5,
                    label=f"γ={gamma:g}, calibration rows")
        ax.axhline(full_loss, color="k", lw=0.8, ls=":", label="full model")
        c = stage["chosen"]
        ax.set_title(f"{stage['layers']}-layer stage: chose β={c['beta']:g}, γ={c['residual']:g}",
                     fontsize=9)
        ax.set_xlabel("β")
        ax.set_ylabel("held-out response loss (nats)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--betas", default="0,0.05,0.1,0.2,0.3")
    ap.add_argument("--residuals", default="0,0.5,1")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/bench/calibration-grid")
    args = ap.parse_args(argv)
    setup_logging(verbose=False)
    cfg = load_config(args.config, ["method=devft-calibrated", f"calibrate.betas={args.betas}",
                                    f"calibrate.residual_exponents={args.residuals}",
                                    *args.set, "output.progress=false"])
    prepare(cfg)
    model = GlobalModel(cfg, make_rule(cfg))
    full_loss = model.eval_full()
    stages = [stage_grid(model, s) for s in model.schedule()[:-1]]  # the last is unfused
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": args.config, "overrides": args.set, "full_model_eval_loss": full_loss,
              "stages": stages}
    (out / "calibration_grid.json").write_text(json.dumps(report, indent=2))
    plot(stages, full_loss, out / "calibration_grid.png")
    for s in stages:
        print(f"{s['layers']:>3} layers: chose {s['chosen']} (eval loss "
              f"{s['chosen_eval_loss']:.3f}); best on the eval rows {s['best_on_eval']}")
    return report


if __name__ == "__main__":
    run_script(main)
