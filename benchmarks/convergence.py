"""Convergence of DevFT against FedIT (and any other methods) over seeds and partitions.

For each partition (IID, Dirichlet non-IID over the task category) and each seed, runs
`devft compare` (same seed, partitions and per-round client budget for every method) into
OUT/<partition>/seed-<s>/, then optionally scores each final adapter on multiple-choice tasks
with the log-likelihood harness (`devft eval`'s library function). Finished runs are reused and
interrupted ones resumed, so an interrupted benchmark loses nothing. Writes OUT/convergence.json
(per method and partition: mean and standard deviation over seeds of time-to-target speedup,
bytes-to-target reduction, final held-out loss and its delta to FedIT, MC accuracy) and
OUT/convergence.png (held-out loss against round, bytes and wall time; mean over seeds with the
min-max band).

    python benchmarks/convergence.py --out runs/bench/convergence                  # 3 seeds x 2
    python benchmarks/convergence.py --seeds 0 --partitions iid --mc-limit 0 --out /tmp/c
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import int_list, run_script  # noqa: E402

from devft.cli import setup_logging  # noqa: E402
from devft.comparison import compare_methods, parse_methods  # noqa: E402
from devft.config import RunConfig, load_config  # noqa: E402
from devft.reporting.recorder import read_metrics  # noqa: E402

MC_TASKS = ("arc_easy", "arc_challenge", "mmlu", "piqa", "sciq")
X_AXES = (("round", "round", 1.0), ("cum_bytes", "cumulative MB (up + down)", 1e-6),
          ("wall_time_s", "wall time (s)", 1.0))


def mc_accuracy(run_dir: Path, cfg: RunConfig, limit: int) -> dict[str, Any]:
    """Mean acc / acc_norm over MC_TASKS of the run's final adapter, by group."""
    from devft.evaluation import evaluate_tasks, load_eval_model

    loaded = load_eval_model(run_dir / "adapter", device="cpu")
    report = evaluate_tasks(loaded.model, loaded.tokenizer, MC_TASKS, limit, cfg.seed,
                            heldout_fraction=cfg.data.heldout_fraction)
    return {"tasks": {t: {k: r[k] for k in ("acc", "acc_norm", "n", "group")}
                      for t, r in report["tasks"].items()},
            "groups": {g: {k: v[k] for k in ("acc", "acc_norm", "n")}
                       for g, v in report["groups"].items() if v["tasks"]},
            "acc": statistics.fmean(r["acc"] for r in report["tasks"].values()),
            "acc_norm": statistics.fmean(r["acc_norm"] for r in report["tasks"].values())}


def _spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, standard deviation, min and max over the seeds where the value exists."""
    xs = [v for v in values if v is not None]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0 if xs else None,
            "min": min(xs, default=None), "max": max(xs, default=None),
            "reached": len(xs), "of": len(values)}


def summarize(per_seed: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method: the spread over seeds of each figure of merit."""
    out = {}
    for m in methods:
        entries = [c["methods"][m] for c in per_seed]
        out[m] = {
            "time_to_target_speedup": _spread([e["vs_fedit"]["time_to_target_speedup"]
                                               for e in entries]),
            "bytes_to_target_reduction": _spread([e["vs_fedit"]["bytes_to_target_reduction"]
                                                  for e in entries]),
            "final_eval_loss": _spread([e["summary"]["final_eval_loss"] for e in entries]),
            "final_eval_loss_delta": _spread([e["vs_fedit"]["final_eval_loss_delta"]
                                              for e in entries]),
            "total_mb": _spread([e["summary"]["total_bytes"] / 1e6 for e in entries]),
            "wall_time_s": _spread([e["summary"]["wall_time_s"] for e in entries]),
        }
        if all("mc" in e for e in entries):
            out[m]["mc_acc"] = _spread([e["mc"]["acc"] for e in entries])
            out[m]["mc_acc_norm"] = _spread([e["mc"]["acc_norm"] for e in entries])
    return out


def plot(runs: dict[str, dict[str, list[list[dict[str, Any]]]]], path: Path) -> None:
    """One row per partition, one column per x axis; mean curve and min-max band per method."""
    parts = list(runs)
    fig, axes = plt.subplots(len(parts), 3, figsize=(15, 4 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        for ax, (key, label, scale) in zip(row, X_AXES):
            for method, seeds in runs[part].items():
                n = min(len(r) for r in seeds)
                xs = [statistics.fmean(r[i][key] for r in seeds) * scale for i in range(n)]
                ys = [[r[i]["eval_loss"] for r in seeds] for i in range(n)]
                line, = ax.plot(xs, [statistics.fmean(y) for y in ys], label=method)
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys],
                                color=line.get_color(), alpha=0.15)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out loss (full model)")
            ax.set_title(f"{part}, {len(next(iter(runs[part].values())))} seed(s)")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--methods", default="devft,fedit")
    ap.add_argument("--seeds", type=int_list, default="0,1,2")
    ap.add_argument("--partitions", default="iid,dirichlet")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--mc-limit", type=int, default=100,
                    help="items per MC task for the final adapters (0 = no MC evaluation)")
    ap.add_argument("--out", default="runs/bench/convergence")
    args = ap.parse_args()
    setup_logging(verbose=False)  # devft's own log format; Flower's notices quieted
    methods = parse_methods(args.methods)
    seeds = args.seeds
    out = Path(args.out)
    results: dict[str, Any] = {"methods": methods, "seeds": seeds, "partitions": {}}
    curves: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for part in args.partitions.split(","):
        per_seed = []
        curves[part] = {m: [] for m in methods}
        for seed in seeds:
            overrides = [*args.set, f"seed={seed}", f"data.partition={part}",
                         "output.progress=false"]
            cfg = load_config(args.config, overrides)
            run_dir = out / part / f"seed-{seed}"
            comparison = compare_methods(cfg, methods, run_dir)
            for m in methods:
                curves[part][m].append(read_metrics(run_dir / m))
                if args.mc_limit:
                    mc_file = run_dir / m / "mc_eval.json"
                    if not mc_file.is_file():  # reuse: an interrupted benchmark loses nothing
                        mc_file.write_text(json.dumps(
                            mc_accuracy(run_dir / m, cfg, args.mc_limit), indent=2))
                    comparison["methods"][m]["mc"] = json.loads(mc_file.read_text())
            per_seed.append(comparison)
        results["partitions"][part] = {"per_seed": per_seed,
                                       "summary": summarize(per_seed, methods)}
        (out / "convergence.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(curves, out / "convergence.png")
    for part, r in results["partitions"].items():
        for m, s in r["summary"].items():
            t, b, d = (s[k] for k in ("time_to_target_speedup", "bytes_to_target_reduction",
                                       "final_eval_loss_delta"))
            print(f"{part:9s} {m:14s} final loss {s['final_eval_loss']['mean']:.4f} "
                  f"(delta {d['mean']:+.4f} ± {d['std']:.4f}); time->target reached "
                  f"{t['reached']}/{t['of']}, bytes->target reached {b['reached']}/{b['of']}"
                  + (f"; MC acc {s['mc_acc']['mean']:.3f}" if "mc_acc" in s else ""))
    print(f"convergence.json and convergence.png in {out}")


if __name__ == "__main__":
    run_script(main)
