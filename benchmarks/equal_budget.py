"""Equal-budget study (issue 31): every run, FedIT included, trains to one client-FLOPs budget.

The equal-cost study (equal_cost.py) stopped each staged run the moment it touched FedIT's
final reading, so a method exactly as good as FedIT scored about 1.2-1.5x. Here no run stops
at a target: per model, every method trains to the same client-FLOPs budget (at least 1.5x
what FedIT needs to reach its plateau on every seed), and the costs to the 50/90/100 %
targets are read afterwards from the saved curves, on smoothed curves, by
equal_budget_report.py. A FedIT *replicate* (the same initial LoRA, partitions and schedule,
other batches: train.batch_seed) gives the noise floor.

Per model and seed, into OUT/<model>/seed-<s>/<method>/ (reused when finished, resumed when
cut, and *extended* when finished under a smaller budget: devft.comparison.run_or_reuse).
Every run keeps its last checkpoint, so a larger budget later costs only the new rounds.
The per-round budget, learning rate and evaluation rows are the equal-cost study's (STUDY),
so the new runs repeat the old ones' rounds on the same kind of CPU.

    python benchmarks/equal_budget.py --models smollm2-135m-instruct --seeds 0 \\
        --methods fedit,fedit-replicate,devft --out results/equal-budget
    python benchmarks/equal_budget.py --smoke --models TINY_DIR --set data.name=FILE \\
        --budget 1e9 --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from common import flops_budget, int_list, run_script
from equal_budget_plot import plot_study
from equal_budget_report import (
    READING,
    layer_matmul_params,
    markdown,
    reproduction,
    seed_entry,
    server_flops,
    summarize,
)
from equal_cost import SMOKE, STUDY

from devft.cli import setup_logging
from devft.comparison import run_or_reuse
from devft.config import RunConfig, load_config
from devft.errors import ConfigError
from devft.methods import METHODS
from devft.reporting.recorder import METRICS_FILE, SUMMARY_FILE, read_metrics

REPLICATE = "fedit-replicate"
"""FedIT with another batch order: train.batch_seed = REPLICATE_SEED_OFFSET + seed."""
REPLICATE_SEED_OFFSET = 1000
BUDGETS = {"smollm2-135m-instruct": 1.25e14, "gemma3-270m": 9.0e13}
"""Client FLOPs per run. SmolLM2: 48 FedIT rounds (~2.6e12 each), 1.5x the 31 rounds of the
slowest FedIT plateau in the equal-cost study (seed 1); Gemma 3: 38 rounds (~2.35e12 each),
1.5x its 24-round plateaus. A seed whose FedIT needs more is extended, not rerun."""
SMOLLM2 = ("fedit", REPLICATE, "devft", "devft-boundary", "devft+offsite",
           "devft-notransfer", "layerdrop")
MAX_ROUNDS = 400
BUDGET_FACTOR = 1.5
"""The budget must be at least this multiple of FedIT's cost to its plateau, per seed."""
log = logging.getLogger("equal_budget")


def method_list(text: str) -> list[str]:
    """--methods: FedIT, its replicate, or any staged method; FedIT always runs first."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m != REPLICATE and (m not in METHODS or
                                                   (m != "fedit" and not METHODS[m].staged))]
    if not names or bad:
        raise ConfigError("--methods", text, f"comma-separated names from fedit, {REPLICATE} "
                          f"and the staged methods, e.g. {','.join(SMOLLM2)}")
    return list(dict.fromkeys(["fedit", *names]))


def budget_for(model: str, given: float) -> float:
    """--budget when given, else the model's BUDGETS entry."""
    return flops_budget(model, given, BUDGETS)


def run_config(base: RunConfig, run_dir: Path, method: str, budget: float) -> RunConfig:
    """`method`'s run in run_dir/<method>/: no target, stop at the FLOPs budget."""
    extra: dict[str, Any] = {}
    if method == REPLICATE:
        extra["train.batch_seed"] = REPLICATE_SEED_OFFSET + base.seed
    return base.replace(**{"method": "fedit" if method == REPLICATE else method,
                           "output.dir": str(run_dir / method), "stop.rule": "target",
                           "stop.target_loss": 0.0, "stop.flops_budget": budget,
                           "stop.min_rounds": 1, "stop.max_rounds": MAX_ROUNDS, **extra})


def seed_configs(config: str, preset: list[str], overrides: list[str], model: str, seed: int,
                 out: Path, methods: list[str], budget: float) -> dict[str, RunConfig]:
    """Every method's run config for one model and seed."""
    base = load_config(config, [*preset, *overrides, f"seed={seed}", f"model.path={model}"])
    run_dir = out / Path(model).name / f"seed-{seed}"
    return {m: run_config(base, run_dir, m, budget) for m in methods}


def calibration_shape(cfg: RunConfig) -> tuple[int, int]:
    """(examples, padded tokens) of the batch the server's layer similarity runs on."""
    from devft.data import collate, encode, federated_data
    from devft.models.loading import load_tokenizer, resolve_model_path

    data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
    tok = load_tokenizer(resolve_model_path(cfg.model.path))
    rows = [encode(data.records[i], tok, cfg.data.max_seq_len)
            for i in data.calibration_indices(cfg.devft.calibration_examples)]
    shape = collate(rows, tok.pad_token_id)["input_ids"].shape
    return int(shape[0]), int(shape[1])


def read_seed(configs: dict[str, RunConfig], budget: float, old: Path | None = None
              ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]] | None:
    """(one seed's entry, its runs' round records) from its saved runs, live or finished
    (None: no FedIT rounds yet). The entry is equal_budget_report.seed_entry's, with each
    run's status and server-side FLOPs; `old`: the equal-cost study's FedIT run of this
    seed, whose rounds the new FedIT should repeat."""
    from devft.models.loading import check_model_config
    from devft.training.accounting import attention_width

    runs = {m: read_metrics(c.output.dir) for m, c in configs.items()
            if (Path(c.output.dir) / METRICS_FILE).is_file()}
    runs = {m: r for m, r in runs.items() if len(r) >= 2}
    if "fedit" not in runs:
        return None
    any_cfg = next(iter(configs.values()))
    model_cfg = check_model_config(any_cfg.model.path)
    layer_params, width = layer_matmul_params(model_cfg), attention_width(model_cfg)
    shape = calibration_shape(any_cfg)
    server = {m: server_flops(r, METHODS[configs[m].method].recipe, model_cfg.num_hidden_layers,
                              layer_params, shape, width) for m, r in runs.items()}
    entry = seed_entry(runs, budget, server) or {"fedit_rounds": len(runs["fedit"]) - 1,
                                                  "plateau_round": None, "methods": {}}
    if old is not None and (old / METRICS_FILE).is_file():  # the equal-cost study's FedIT
        entry["fedit_vs_equal_cost_run"] = reproduction(runs["fedit"], read_metrics(old))
    if entry["plateau_round"] is None:
        return entry, runs
    for m, e in entry["methods"].items():
        done = (Path(configs[m].output.dir) / SUMMARY_FILE).is_file()
        e["status"] = "finished" if done else "running"
        e["server_flops_total"] = server[m][-1]
    entry["budget_ok"] = budget >= BUDGET_FACTOR * entry["plateau_flops"]
    return entry, runs


def report(args: argparse.Namespace, out: Path, preset: list[str],
           methods: list[str]) -> dict[str, Any]:
    """equal_budget.json, equal_budget.md and the plots, from what is saved under `out`."""
    results: dict[str, Any] = {"settings": preset + args.set, "budget_factor": BUDGET_FACTOR,
                               "reading": READING, "models": {}}
    curves: dict[str, Any] = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        budget, name = budget_for(model, args.budget), Path(model).name
        per_seed = []
        for seed in args.seeds:
            configs = seed_configs(args.config, preset, args.set, model, seed, out, methods,
                                   budget)
            old = Path(args.old) / name / f"seed-{seed}" / "fedit" if args.old else None
            got = read_seed(configs, budget, old)
            if got is None:
                continue
            entry, runs = got
            entry["seed"] = seed
            per_seed.append(entry)
            curves.setdefault(name, {})[seed] = (runs, entry)
        readable = [s for s in per_seed if s.get("plateau_round") is not None]
        results["models"][name] = {
            "budget": budget, "per_seed": per_seed,
            "summary": {m: summarize(readable, m) for m in methods}}
    (out / "equal_budget.md").write_text(markdown(results))
    results["plots"] = [str(p) for p in plot_study(curves, results, out)]
    (out / "equal_budget.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--models", default="smollm2-135m-instruct",
                    help="comma-separated bundled names or model directories")
    ap.add_argument("--seeds", type=int_list, default="0,1,2,3,4")
    ap.add_argument("--methods", default=",".join(SMOLLM2))
    ap.add_argument("--budget", type=float, default=0.0,
                    help="client FLOPs of every run (default: per model, BUDGETS)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (tests, tiny models)")
    ap.add_argument("--out", default="results/equal-budget")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: read every saved run under --out (live ones too) "
                         "into equal_budget.json, equal_budget.md and plots")
    ap.add_argument("--old", default="results/equal-cost",
                    help="--report-only: the equal-cost study's runs, to check that the new "
                         "FedIT runs repeat their losses over the common rounds ('' : skip)")
    args = ap.parse_args(argv)
    setup_logging(verbose=False)
    methods, out = method_list(args.methods), Path(args.out)
    preset = SMOKE if args.smoke else STUDY
    if args.report_only:
        if not out.is_dir():
            raise ConfigError("--out", str(out), "a folder holding the study's runs")
        return report(args, out, preset, methods)
    done: dict[str, Any] = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        budget = budget_for(model, args.budget)
        for seed in args.seeds:
            configs = seed_configs(args.config, preset, args.set, model, seed, out, methods,
                                   budget)
            for method, cfg in configs.items():
                summary = run_or_reuse(cfg)
                done[cfg.output.dir] = summary["final_eval_loss"]
                print(f"{Path(model).name} seed {seed} {method}: {summary['rounds']} rounds, "
                      f"final loss {summary['final_eval_loss']:.4f}, stop "
                      f"{summary.get('stop', {}).get('reason')}", flush=True)
    return done


if __name__ == "__main__":
    run_script(main)
