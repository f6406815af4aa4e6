"""Budget study (issue 34): can a device that cannot hold the model teach it its data?

SmolLM2-135M, 8 clients: clients 0-3 are large (no memory limit), clients 4-7 small (SMALL_MB,
about a quarter of the layers in fp32). The data is split by task group
(`data.partition=groups`, `data.client_groups=4x0,4x1`): the 12 sorted categories are cut
into two groups of 6; the large clients hold group 0's training rows, the small clients group
1's, which no large client holds. The server's 64 held-out rows are stratified over all 12
categories (5-6 rows each, 32 per group), and it records the loss per category every round
(`eval_loss_by_category`). Runs, per seed, into OUT/<model>/seed-<s>/<run>/ (reused when
finished, resumed when cut, extended to a larger budget: devft.comparison.run_or_reuse):

- `fedit-all`: FedIT ignoring the budgets (the infeasible upper bound);
- `exclude`: FedIT under the budgets, `budget_policy=exclude`, no lever: the small clients sit
  out every round (what users have today);
- `shrink-<recipe>` (spectral, layerdrop, prefix, random): FedIT under the budgets, the small
  clients shrink to the deepest submodel that fits (`budget_levers=shrink`);
- `devft-budget`: DevFT's stages under the budgets (shrink, spectral);
- `levers`: the small clients on the whole model with `budget_levers=quantize,checkpoint`
  under `exclude`: nf4 base weights and gradient checkpointing, or sitting out if even that
  does not fit (the planner says it fits: 1414 MiB predicted, below SMALL_MB).

Every run has the equal-cost study's per-round budget (STUDY: 2 local steps of batch 4, lr
5e-4, 64 evaluation rows), all clients every round, and trains to one client-FLOPs budget
(BUDGETS: stop.rule=target, stop.target_loss=0, stop.flops_budget), so `exclude`, whose small
clients spend nothing, runs twice as many rounds as `fedit-all`. budget_study_report.py
reads the curves per task group.

**SMALL_MB.** The smallest whole MiB that holds `small_layers(30)` = ceil(30 / 4) = 8 layers
of SmolLM2 in fp32, as the small clients of the in-process grid plan it (`small_budget_mb`):
the planner (devft.models.memory_plan) at batch 4 x 192 tokens (configs/default.yaml), no
checkpointing, with the nominal floor of a client process (609 MiB):
`ceil(planner_for(model, lora, 4, 192, "fp32").predict(8, "none", False,
NOMINAL_FLOOR_BYTES).total / MiB)` = ceil(1752.44) = 1753 MiB (7 layers: 1685.1, 9: 1819.8;
one layer adds ~67 MiB, mostly activations). The whole model needs 3233.6 MiB in fp32,
1766.2 with checkpointing alone (just above SMALL_MB), 1413.6 in nf4 with checkpointing
(the planner of 2026-12-07; it is being refined: `plan` recomputes every number, and the
report records them beside SMALL_MB, which stays fixed so saved runs keep their config).
This is the bound of full 192-token rows, all response; a client plans on its round's own
batches (rounded up to 64-token widths and quarters of response: federation.budgets), which
are shorter, so it may fit a few more layers; `client_depth` records what each trained.

**Size.** From the equal-budget study: a 4-client FedIT round is about 76 s uncontended on one
thread, about 53 s of client training (13.4 s a client, run one after another in the
in-process grid) and 23 s of evaluation; its client FLOPs are ~2.6e12. A round's clients run
in turn, so an 8-client FedIT round is about 8 x 13.4 + 23 = 130 s, 1.7x a 4-client round
(not 1.25x: that would need the clients to run in parallel). A client shrunk to 8 layers
costs ~0.3 of a full one (head and 8 of 30 layers); one in nf4 with checkpointing ~1.8x the
time (nf4 CPU matmuls ~1.35x, recomputation ~1.33x) but the same counted FLOPs. At the
budget of 2.5e14 client FLOPs (48 fedit-all rounds of ~5.2e12, 1.5x the slowest 4-client
FedIT plateau, 31 rounds):

| run | rounds | s a round | hours |
|---|---|---|---|
| fedit-all | 48 | 130 | 1.7 |
| exclude | 96 | 76 | 2.0 |
| shrink-<recipe>, each of 4 | ~74 | ~94 | 1.9 |
| devft-budget | ~80 | ~88 | 1.9 |
| levers | 48 | ~172 | 2.3 |

Budget runs also rebuild the in-process grid's one held stage when a round moves from large
to small clients (twice a round; `shrink-random`: once per small client, its layers differ),
a few seconds a round. About 15.5 h a seed on one uncontended thread, 46 h for 3 seeds:
above the issue's 20 h. So: seed 0 for all 8 runs first (15.5 h, about 8 h on the two lanes
the equal-budget study shares), then seeds 1 and 2 only for fedit-all, exclude and the two
runs not clearly dominated on seed 0 (about 7.5 h a seed): about 30 h in all; say which
were cut and why.

    python benchmarks/budget_study.py --seeds 0 --out results/budget-study
    python benchmarks/budget_study.py --report-only --out results/budget-study
    python benchmarks/budget_study.py --smoke --models TINY_DIR --set data.name=FILE \\
        --budget 1e9 --out /tmp/b
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from budget_study_report import report
from common import flops_budget, int_list, run_script
from equal_cost import SMOKE, STUDY

from devft.cli import setup_logging
from devft.comparison import run_or_reuse
from devft.config import RunConfig, load_config
from devft.errors import ConfigError

MODEL = "smollm2-135m-instruct"
CLIENT_GROUPS = "4x0,4x1"
"""Clients 0-3 (group 0, large) and 4-7 (group 1, small)."""
LARGE_CLIENTS, SMALL_CLIENTS = 4, 4
SMALL_MB = {MODEL: 1753}
"""The small clients' budget, MiB (module docstring: `small_budget_mb` at `small_layers`)."""
BUDGETS = {MODEL: 2.5e14}
"""Client FLOPs per run: 48 fedit-all rounds of ~5.2e12."""
RECIPES = ("spectral", "layerdrop", "prefix", "random")
RUNS = ("fedit-all", "exclude", *(f"shrink-{r}" for r in RECIPES), "devft-budget", "levers")
GROUPS_PRESET = [f"federation.num_clients={LARGE_CLIENTS + SMALL_CLIENTS}",
                 "data.partition=groups", f"data.client_groups={CLIENT_GROUPS}"]
"""After STUDY (or SMOKE): 8 clients split by task group."""
MAX_ROUNDS = 400
log = logging.getLogger("budget_study")


def small_layers(depth: int) -> int:
    """The small clients' depth: about a quarter of the model's layers (SmolLM2: 8 of 30)."""
    return max(1, math.ceil(depth / 4))


def planner(cfg: RunConfig) -> Any:
    """The memory planner of the study's clients (their batch x sequence, precision)."""
    from devft.models.memory_plan import planner_for

    return planner_for(cfg.model, cfg.lora, cfg.train.batch_size, cfg.data.max_seq_len,
                       cfg.train.precision)


def small_budget_mb(cfg: RunConfig, layers: int) -> int:
    """The smallest whole MiB holding `layers` layers in fp32 without checkpointing, with the
    nominal floor of a client process (as the in-process grid's clients plan)."""
    from devft.models.memory_plan import MIB, NOMINAL_FLOOR_BYTES

    peak = planner(cfg).predict(layers, "none", False, NOMINAL_FLOOR_BYTES).total
    return math.ceil(peak / MIB)


def plan(cfg: RunConfig, small: int) -> dict[str, Any]:
    """What the planner predicts for the study's clients (MiB, nominal floor): the small
    clients' budget against the whole model in fp32, with checkpointing, in nf4 with
    checkpointing, and the depth a shrunken small client gets."""
    import importlib.util

    from devft.models.loading import check_model_config
    from devft.models.memory_plan import MIB, NOMINAL_FLOOR_BYTES

    depth = int(check_model_config(cfg.model.path).num_hidden_layers)
    p, floor = planner(cfg), NOMINAL_FLOOR_BYTES
    out: dict[str, Any] = {
        "depth": depth, "small_layers": small_layers(depth), "small_mb": small,
        "small_mb_now": small_budget_mb(cfg, small_layers(depth)),
        "floor_mb": floor / MIB,
        "full_fp32_mb": p.predict(depth, "none", False, floor).total / MIB,
        "full_checkpointed_mb": p.predict(depth, "none", True, floor).total / MIB,
        "shrunk_depth": p.deepest_fit(small * MIB, depth, "none", False, floor)}
    if importlib.util.find_spec("bitsandbytes") is not None:
        out["full_nf4_checkpointed_mb"] = p.predict(depth, "nf4", True, floor).total / MIB
        out["levers_fit"] = out["full_nf4_checkpointed_mb"] <= small
    return out


def small_for(cfg: RunConfig, given: int) -> int:
    """--small when given, else SMALL_MB for the study's model, else computed (tiny models)."""
    if given > 0:
        return given
    name = Path(cfg.model.path).name
    if name in SMALL_MB:
        return SMALL_MB[name]
    from devft.models.loading import check_model_config

    return small_budget_mb(cfg, small_layers(check_model_config(cfg.model.path)
                                             .num_hidden_layers))


def budget_for(model: str, given: float) -> float:
    """--budget when given, else the model's BUDGETS entry."""
    return flops_budget(model, given, BUDGETS)


def run_list(text: str) -> list[str]:
    """--runs: names from RUNS, in RUNS' order."""
    names = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in names if r not in RUNS]
    if not names or bad:
        raise ConfigError("--runs", text, f"comma-separated names from {', '.join(RUNS)}")
    return [r for r in RUNS if r in names]


def run_overrides(run: str, small: int) -> dict[str, Any]:
    """The run's settings on top of the base config."""
    budgets = {"federation.client_memory_mb": f"{LARGE_CLIENTS}x0,{SMALL_CLIENTS}x{small}"}
    if run == "fedit-all":
        return {"method": "fedit"}
    if run == "exclude":
        return {"method": "fedit", **budgets, "federation.budget_policy": "exclude",
                "federation.budget_levers": "none"}
    if run == "levers":
        return {"method": "fedit", **budgets, "federation.budget_policy": "exclude",
                "federation.budget_levers": "quantize,checkpoint"}
    recipe = "spectral" if run == "devft-budget" else run.removeprefix("shrink-")
    return {"method": "devft" if run == "devft-budget" else "fedit", **budgets,
            "federation.budget_policy": "shrink", "federation.budget_levers": "shrink",
            "federation.shrink_recipe": recipe}


def preset(smoke: bool) -> list[str]:
    """Every run's settings before --set: STUDY's per-round budget (SMOKE's for a tiny
    model), 8 clients split by task group."""
    return (SMOKE if smoke else STUDY) + GROUPS_PRESET


def seed_configs(args: argparse.Namespace, model: str, seed: int, out: Path,
                 runs: list[str]) -> tuple[dict[str, RunConfig], int]:
    """({run: config} for one model and seed, the small clients' budget in MiB)."""
    base = load_config(args.config, [*preset(args.smoke), *args.set, f"seed={seed}",
                                     f"model.path={model}"])
    small, budget = small_for(base, args.small), budget_for(model, args.budget)
    run_dir = out / Path(model).name / f"seed-{seed}"
    stop = {"stop.rule": "target", "stop.target_loss": 0.0, "stop.flops_budget": budget,
            "stop.min_rounds": 1, "stop.max_rounds": MAX_ROUNDS}
    return {r: base.replace(**{**run_overrides(r, small), **stop,
                               "output.dir": str(run_dir / r)}) for r in runs}, small


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--models", default=MODEL,
                    help="comma-separated bundled names or model directories")
    ap.add_argument("--seeds", type=int_list, default="0")
    ap.add_argument("--runs", "--methods", dest="runs", default=",".join(RUNS),
                    help="comma-separated run names (--methods: as study_lane.sh passes them)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="client FLOPs of every run (default: per model, BUDGETS)")
    ap.add_argument("--small", type=int, default=0,
                    help="the small clients' budget, MiB (default: SMALL_MB, or computed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="tiny budget (tests, tiny models)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study: 1)")
    ap.add_argument("--out", default="results/budget-study")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: read every saved run under --out (live ones too) "
                         "into budget_study.json, budget_study.md and plots")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging(verbose=False)
    runs, out = run_list(args.runs), Path(args.out)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    configs = {(m, s): seed_configs(args, m, s, out, runs) for m in models for s in args.seeds}
    if args.report_only:
        if not out.is_dir():
            raise ConfigError("--out", str(out), "a folder holding the study's runs")
    else:
        import torch

        torch.set_num_threads(args.threads)
        for (model, seed), (cfgs, _) in configs.items():
            for run, cfg in cfgs.items():
                summary = run_or_reuse(cfg)
                print(f"{Path(model).name} seed {seed} {run}: {summary['rounds']} rounds, "
                      f"final loss {summary['final_eval_loss']:.4f}, stop "
                      f"{summary.get('stop', {}).get('reason')}", flush=True)
    plans = {Path(m).name: plan(configs[(m, args.seeds[0])][0][runs[0]],
                                configs[(m, args.seeds[0])][1]) for m in models}
    return report(configs, plans, out, settings=[*preset(args.smoke), *args.set],
                  smoke=args.smoke)


if __name__ == "__main__":
    run_script(main)
