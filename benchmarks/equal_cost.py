"""Equal-cost study (issue 13): does staged training pay off over a long horizon?

Per model and seed, into OUT/<model>/seed-<s>/<method>/ (each run reused when finished and
resumed when interrupted, `devft.comparison.run_or_reuse`):
1. FedIT until its held-out loss plateaus (stop.rule=plateau: < 1 % relative improvement
   over 4 rounds, at least 24 and at most 64 rounds). Its final loss is *the target*.
2. Every staged method: its early stages as configured (devft.rounds_per_stage), then its
   last stage until the target or 1.5 × FedIT's total client FLOPs (stop.rule=target).
Every method shares STUDY's per-round budget: 4 clients, all of them every round, 2 local
steps of batch 4 each, and a constant learning rate (AdamW at train.lr, fresh each round;
no schedule). Writes OUT/equal_cost.json (per seed: cost to 50/90/100 % of FedIT's
improvement as ratios to FedIT's, per-stage breakdown, the early-stage comparison against
`devft-notransfer`; per model: mean and spread over seeds) and three plots of held-out loss
against cumulative client FLOPs, bytes (up + down) and wall time (OUT/equal_cost_<axis>.png),
and one panel per model and seed against FLOPs as a ratio to FedIT's (equal_cost_by_seed.png).

    python benchmarks/equal_cost.py --models smollm2-135m-instruct --seeds 0 \\
        --methods devft,progfed --out runs/bench/equal-cost          # one piece of the study
    python benchmarks/equal_cost.py --smoke --models TINY_DIR --set data.name=FILE --out /tmp/e
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from common import int_list, run_script
from equal_cost_ledger import LEDGER, load_ledger, with_ledger
from equal_cost_plot import Curves, plot, plot_by_seed
from equal_cost_report import (
    Records,
    cost_ratios,
    early_stages,
    markdown,
    partial_summary,
    reads_early_stages,
    stage_breakdown,
    summarize,
    target_losses,
)

from devft.cli import setup_logging
from devft.comparison import run_or_reuse, saved_run
from devft.config import RunConfig, load_config
from devft.errors import ConfigError
from devft.evaluation.adapters import SAFE_WEIGHTS
from devft.methods import METHODS
from devft.reporting.recorder import read_metrics

STAGED = ("devft", "progfed", "layerdrop", "devft-boundary", "devft-adaptive",
          "devft-calibrated", "offsite", "devft+offsite", "devft-notransfer")
CONTROL = "devft-notransfer"
"""The run whose last stage starts from a fresh LoRA (no transfer from the early stages)."""
STUDY = ["federation.num_clients=4", "federation.clients_per_round=0", "train.local_steps=2",
         "train.batch_size=4", "train.lr=5e-4", "devft.rounds_per_stage=4",
         "federation.rounds=16", "adaptive.max_rounds=6", "data.eval_examples=64",
         "calibrate.residual_exponents=0,1", "output.progress=false"]
"""Per-round budget and schedule shared by every method (before --set); devft-calibrated
searches β and the residual scale (γ 0 or 1) jointly."""
SMOKE = ["federation.num_clients=4", "train.local_steps=2", "train.batch_size=2",
         "train.lr=0.01", "devft.rounds_per_stage=1", "federation.rounds=4",
         "adaptive.max_rounds=1", "data.eval_examples=6", "data.max_seq_len=64",
         "stop.min_rounds=2", "stop.max_rounds=4", "stop.window=1", "output.progress=false"]
"""--smoke: a tiny budget for a test on a tiny model (replaces STUDY)."""
FLOPS_FACTOR = 1.5
log = logging.getLogger("equal_cost")


def method_list(text: str) -> list[str]:
    """--methods: staged method names (FedIT always runs first, as the reference)."""
    names = [m.strip() for m in text.split(",") if m.strip() and m.strip() != "fedit"]
    bad = [m for m in names if m not in METHODS or not METHODS[m].staged]
    if not names or bad:
        raise ConfigError("--methods", text, f"comma-separated staged methods, e.g. "
                          f"{','.join(STAGED)}")
    return names


def fedit_config(base: RunConfig, run_dir: Path) -> RunConfig:
    return base.replace(**{"method": "fedit", "output.dir": str(run_dir / "fedit"),
                           "stop.rule": "plateau"})


def staged_config(base: RunConfig, run_dir: Path, method: str, target: float,
                  budget: float, max_rounds: int) -> RunConfig:
    return base.replace(**{"method": method, "output.dir": str(run_dir / method),
                           "stop.rule": "target", "stop.target_loss": target,
                           "stop.flops_budget": budget, "stop.min_rounds": 1,
                           "stop.max_rounds": max_rounds})


def obtain(cfg: RunConfig, report_only: bool) -> tuple[dict[str, Any], Records] | None:
    """(summary, round records) of cfg's run: run, reused or resumed; with report_only only
    what is saved, an unfinished run's summary built from its rounds so far (stop reason
    "unfinished"); None when nothing of it is saved."""
    if not report_only:
        summary = run_or_reuse(cfg)
        return summary, read_metrics(cfg.output.dir)
    summary, records = saved_run(cfg)
    if summary is None:
        if len(records) < 2:
            return None
        summary = partial_summary(records)
    return summary, records


def run_seed(base: RunConfig, run_dir: Path, methods: list[str], max_rounds: int,
             report_only: bool = False) -> tuple[dict[str, Any], dict[str, Records]] | None:
    """FedIT to plateau, then every staged method to the target or the FLOPs budget (None:
    report_only and no FedIT rounds saved; while FedIT is unfinished its target is
    provisional and no staged run can match it yet)."""
    got = obtain(fedit_config(base, run_dir), report_only)
    if got is None:
        return None
    summaries, runs = {"fedit": got[0]}, {"fedit": got[1]}
    target = float(got[0]["final_eval_loss"])
    budget = FLOPS_FACTOR * float(got[0]["total_client_flops"])
    for m in methods:
        got = obtain(staged_config(base, run_dir, m, target, budget, max_rounds), report_only)
        if got is not None:
            summaries[m], runs[m] = got
    fedit, full = runs["fedit"], runs["fedit"][-1].get("layers_trained")
    readable = {m: reads_early_stages(r, full, summaries[m].get("stop", {}).get("reason")
                                      != "unfinished") for m, r in runs.items()}
    control = runs.get(CONTROL) if readable.get(CONTROL) else None
    entry: dict[str, Any] = {"target_eval_loss": target, "flops_budget": budget,
                             "target_final": summaries["fedit"]["stop"]["reason"] != "unfinished",
                             "targets": target_losses(fedit), "methods": {}}
    for m, records in runs.items():
        s = summaries[m]
        e = {k: s[k] for k in ("rounds", "initial_eval_loss", "final_eval_loss",
                               "total_client_flops", "total_bytes", "wall_time_s")}
        e["stop"] = s.get("stop", {"reason": "unknown"})
        e["hosts"] = s.get("hosts")
        e["ratios"] = cost_ratios(records, fedit)
        e["stages"] = stage_breakdown(records)
        if m != "fedit" and readable[m]:
            e["early"] = early_stages(records, fedit, control if m != CONTROL else None)
        entry["methods"][m] = e
    return entry, runs


def finished_methods(entry: dict[str, Any] | None) -> list[str]:
    """The methods of a seed's entry that reached their stop rule (not cut off)."""
    return [m for m, e in entry["methods"].items()
            if e["stop"]["reason"] != "unfinished"] if entry else []


def mc_for(run_dir: Path, cfg: RunConfig, methods: list[str], limit: int,
           compute: bool = True) -> dict[str, Any]:
    """MC accuracy of the final adapters (benchmarks/convergence.py's harness), cached in
    the run's mc_eval.json; with compute False only the cached ones. A run whose adapter
    weights are not here (records from another checkout) is skipped, with a warning."""
    from convergence import mc_accuracy

    out = {}
    for m in methods:
        path = run_dir / m / "mc_eval.json"
        if not path.is_file() and compute:
            if not (run_dir / m / "adapter" / SAFE_WEIGHTS).is_file():
                log.warning("%s: no adapter weights in %s, no MC accuracy", m, run_dir / m)
                continue
            path.write_text(json.dumps(mc_accuracy(run_dir / m, cfg, limit), indent=2))
        if path.is_file():
            out[m] = json.loads(path.read_text())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--models", default="smollm2-135m-instruct",
                    help="comma-separated bundled names or model directories")
    ap.add_argument("--seeds", type=int_list, default="0,1,2")
    ap.add_argument("--methods", default=",".join(STAGED))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-rounds", type=int, default=256,
                    help="staged runs: a cap on rounds besides the target and FLOPs budget")
    ap.add_argument("--mc-limit", type=int, default=0,
                    help="items per MC task for --mc-methods' final adapters (study: 300)")
    ap.add_argument("--mc-methods", default="fedit,devft")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (tests, tiny models)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report every saved run of the study under --out, "
                         "finished or not (a live study may be read); with --mc-limit, "
                         "also score the finished runs' adapters that have no MC yet")
    ap.add_argument("--out", default="runs/bench/equal-cost")
    ap.add_argument("--ledger", default=None,
                    help="a frozen earlier report whose entries stand in for runs whose "
                         f"records are lost (equal_cost_ledger.py; default {LEDGER} where "
                         "it exists); 'none': records only")
    args = ap.parse_args(argv)
    setup_logging(verbose=False)
    methods, out = method_list(args.methods), Path(args.out)
    if args.ledger not in (None, "none") and not Path(args.ledger).is_file():
        raise ConfigError("--ledger", args.ledger, "an equal_cost.json report, or 'none'")
    ledger = None if args.ledger == "none" else Path(args.ledger or LEDGER)
    out.mkdir(parents=True, exist_ok=True)
    preset = SMOKE if args.smoke else STUDY
    results: dict[str, Any] = {"settings": preset + args.set, "flops_factor": FLOPS_FACTOR,
                               "methods": ["fedit", *methods], "models": {}}
    curves: Curves = {}
    targets: dict[str, Any] = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        name = Path(model).name
        per_seed, curves[name] = [], {m: [] for m in ["fedit", *methods]}
        held = load_ledger(ledger, name)
        for seed in args.seeds:
            base = load_config(args.config, [*preset, *args.set, f"seed={seed}",
                                             f"model.path={model}"])
            run_dir = out / name / f"seed-{seed}"
            got = run_seed(base, run_dir, methods, args.max_rounds, args.report_only)
            entry, runs = got if got is not None else (None, {})
            finished = finished_methods(entry)
            for m, records in runs.items():
                curves[name][m].append((seed, records, m in finished))
            entry = with_ledger(entry, held.get(seed))
            if entry is None:
                continue
            if args.mc_limit or args.report_only:  # a ledger seed's scores: from reruns
                done = finished_methods(entry)
                mc = [m for m in args.mc_methods.split(",") if m in done]
                entry["mc"] = mc_for(run_dir, base, mc, args.mc_limit, args.mc_limit > 0)
            entry["seed"] = seed
            entry["methods"] = {m: e for m, e in entry["methods"].items()
                                if m in ("fedit", *methods)}
            per_seed.append(entry)
        if not per_seed:
            del curves[name]
            continue
        targets[name] = {k: float(np.mean([s["targets"][k] for s in per_seed]))
                         for k in per_seed[0]["targets"]}
        results["models"][name] = {
            "per_seed": per_seed,
            "summary": {m: summarize(per_seed, m) for m in ["fedit", *methods]}}
        (out / "equal_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    if not results["models"]:
        raise ConfigError("--out", str(out), "a directory holding the study's runs "
                          "(--report-only found no FedIT rounds for these models and seeds)")
    by_seed = plot_by_seed(curves, out)
    results["plots"] = [str(p) for p in [*plot(curves, targets, out), by_seed] if p]
    (out / "equal_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "equal_cost.md").write_text(markdown(results))
    _print(results)
    return results


def _print(results: dict[str, Any]) -> None:
    for model, r in results["models"].items():
        for m, s in [(m, s) for m, s in r["summary"].items() if s["seeds"]]:
            hit = s["ratios"].get("100%", {}).get("flops_ratio", {})
            mean = hit.get("mean")
            print(f"{model:24s} {m:18s} final loss {s['final_eval_loss']['mean']:.4f} "
                  f"± {s['final_eval_loss']['std']:.4f}; FLOPs to FedIT's plateau: "
                  + (f"{mean:.2f}x" if mean is not None else "not reached")
                  + f" ({hit.get('reached', 0)}/{hit.get('of', 0)} seeds); stop "
                  f"{','.join(s['stop_reasons'])}")
    where = Path(results["plots"][0]).parent
    print(f"equal_cost.json and equal_cost_{{flops,bytes,time}}.png in {where}")


if __name__ == "__main__":
    run_script(main)
