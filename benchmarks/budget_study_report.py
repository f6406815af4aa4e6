"""Read the budget study (issue 34) per task group: held-out loss on the small clients' tasks
(group 1) and on the large clients' tasks (group 0), the gap closed, and each small client's
memory against its budget.

The reading rule, the same for every run:
- **Group loss:** per round, the mean of `eval_loss_by_category` over the group's categories
  (each category weighs the same; 5-6 evaluation rows each), smoothed by a trailing 3-round
  mean (equal_budget_report.smooth: causal, so extending a run never moves a reading).
- **Readings:** at each run's last round (every finished run stops at the FLOPs budget); at
  equal client FLOPs, FRACTIONS of the budget (the last round whose cumulative client FLOPs
  are within it; none while a run has not spent it); and at equal rounds, the last round
  every run of the seed has.
- **Gap closed** on the small clients' tasks: (exclude − run) / (exclude − fedit-all), read
  only where fedit-all is at least MIN_GAP below exclude. The goal: ≥ GOAL_GAP.
- **Large clients' tasks:** run − exclude on group 0; the goal: ≤ GOAL_LARGE nats.
- **Memory:** per small client, the depths, levers and rounds sat out, its largest predicted
  peak and largest process peak (VmHWM) against its budget. In the in-process grid the
  clients share the server's process: budgets are modelled, and the process peak is the
  shared process's, not the client's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from budget_study_plot import plot_study
from equal_budget_report import interval, smooth

from devft.comparison import saved_run
from devft.config import RunConfig
from devft.config.budgets import parse_budgets
from devft.config.groups import num_groups, parse_client_groups

Record = dict[str, Any]
FRACTIONS = (0.25, 0.5, 1.0)
MIN_GAP, GOAL_GAP, GOAL_LARGE = 0.02, 0.5, 0.02
READING = __doc__


def category_groups_of(cfg: RunConfig) -> dict[str, int]:
    """{category: its task group} of the run's data (`data.partition=groups`)."""
    from devft.data import category_groups, federated_data

    data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
    chunks = category_groups(data.categories, num_groups(parse_client_groups(
        cfg.data.client_groups)))
    return {c: g for g, chunk in enumerate(chunks) for c in chunk}


def group_losses(records: Sequence[Record], groups: dict[str, int]) -> list[list[float]]:
    """Per group, per round: the mean loss over the group's categories (nan where the round
    has no `eval_loss_by_category`)."""
    out: list[list[float]] = [[] for _ in range(max(groups.values()) + 1)]
    for r in records:
        by = r.get("eval_loss_by_category") or {}
        for g, losses in enumerate(out):
            values = [v for c, v in by.items() if groups.get(c) == g and v is not None]
            losses.append(sum(values) / len(values) if values else math.nan)
    return out


def curve(records: Sequence[Record], groups: dict[str, int]) -> dict[str, Any]:
    """A run's rounds, cumulative client FLOPs, and per group its raw and smoothed loss."""
    raw = group_losses(records, groups)
    return {"round": [int(r["round"]) for r in records],
            "flops": [float(r.get("cum_client_flops", 0.0)) for r in records],
            "raw": raw, "smoothed": [smooth(g) for g in raw]}


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def at_flops(c: dict[str, Any], group: int, flops: float) -> float | None:
    """The smoothed group loss at the last round within `flops` (None until the run has
    spent them)."""
    if not c["flops"] or c["flops"][-1] < flops:
        return None
    last = max(i for i, f in enumerate(c["flops"]) if f <= flops)
    return _finite(c["smoothed"][group][last])


def at_round(c: dict[str, Any], group: int, round_: int) -> float | None:
    """The smoothed group loss at `round_` (None when the run has not got there)."""
    if round_ not in c["round"]:
        return None
    return _finite(c["smoothed"][group][c["round"].index(round_)])


def gap_closed(exclude: float | None, fedit_all: float | None,
               run: float | None) -> float | None:
    """(exclude − run) / (exclude − fedit-all); None when a reading is missing or fedit-all
    is less than MIN_GAP below exclude."""
    if exclude is None or fedit_all is None or run is None or exclude - fedit_all < MIN_GAP:
        return None
    return (exclude - run) / (exclude - fedit_all)


def small_clients_memory(records: Sequence[Record], cfg: RunConfig) -> list[dict[str, Any]]:
    """Per client with a budget: its depths, levers, rounds sat out, and its largest
    predicted and process peak against the budget (MiB)."""
    budgets = parse_budgets(cfg.federation.client_memory_mb, cfg.federation.num_clients) or []
    rows = [r for r in records if r.get("client_partition")]
    out = []
    for k, budget in enumerate(budgets):
        if not budget:
            continue
        mine = [(r, r["client_partition"].index(k)) for r in rows if k in r["client_partition"]]

        def col(key: str, mine=mine) -> list[Any]:
            return [r[key][i] for r, i in mine if r.get(key) and r[key][i] is not None]

        predicted, process = col("client_predicted_peak_mb"), col("client_process_peak_mb")
        depths = col("client_depth")
        out.append({"client": k, "budget_mb": budget, "rounds": len(mine),
                    "depths": sorted(set(depths)), "sat_out": depths.count(0),
                    "levers": sorted(set(col("client_levers"))),
                    "max_predicted_mb": max(predicted, default=None),
                    "max_process_mb": max(process, default=None),
                    "predicted_within": all(p <= budget for p in predicted),
                    "process_within": all(p <= budget for p in process)})
    return out


def seed_entry(runs: dict[str, tuple[dict[str, Any] | None, list[Record]]],
               configs: dict[str, RunConfig], groups: dict[str, int],
               budget: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(one seed's readings per run, its curves) from the saved runs."""
    curves = {m: curve(recs, groups) for m, (_, recs) in runs.items() if len(recs) >= 2}
    common = min((c["round"][-1] for c in curves.values()), default=0)
    points: dict[str, float | int] = {"final": -1, "equal_round": common,
                                      **{f"flops_{f:.0%}": f * budget for f in FRACTIONS}}

    def read(m: str, g: int, point: str) -> float | None:
        c = curves[m]
        if point == "final":
            return _finite(c["smoothed"][g][-1])
        if point == "equal_round":
            return at_round(c, g, int(points[point]))
        return at_flops(c, g, float(points[point]))

    entry: dict[str, Any] = {"common_round": common, "runs": {}}
    for m, c in curves.items():
        summary = runs[m][0]
        e: dict[str, Any] = {
            "status": "finished" if summary else "running", "rounds": c["round"][-1],
            "final_flops": c["flops"][-1],
            "stop": (summary or {}).get("stop", {}).get("reason"),
            "per_category_recorded": not math.isnan(c["raw"][0][-1]),
            "readings": {}, "small_clients": small_clients_memory(runs[m][1], configs[m]),
            "curve": {"round": c["round"], "client_flops": c["flops"],
                      **{f"{k}_tasks": [_finite(x) for x in c["raw"][g]]
                         for k, g in (("small", 1), ("large", 0))}}}
        for point in points:
            small, large = read(m, 1, point), read(m, 0, point)
            reading = {"small_tasks": small, "large_tasks": large}
            if "exclude" in curves and "fedit-all" in curves:
                reading["gap_closed"] = gap_closed(read("exclude", 1, point),
                                                   read("fedit-all", 1, point), small)
                ex = read("exclude", 0, point)
                reading["large_vs_exclude"] = (None if ex is None or large is None
                                               else large - ex)
            e["readings"][point] = reading
        entry["runs"][m] = e
    return entry, curves


def summarize(per_seed: Sequence[dict[str, Any]], run: str) -> dict[str, Any]:
    """Over seeds, at the final round: gap closed and the large tasks' difference."""
    finals = [s["runs"][run]["readings"]["final"] for s in per_seed if run in s["runs"]]
    gaps = [f["gap_closed"] for f in finals if f.get("gap_closed") is not None]
    large = [f["large_vs_exclude"] for f in finals if f.get("large_vs_exclude") is not None]
    g, d = interval(gaps), interval(large)
    return {"gap_closed": g, "large_vs_exclude": d,
            "meets_goal": (g["mean"] is not None and d["mean"] is not None
                           and g["mean"] >= GOAL_GAP and d["mean"] <= GOAL_LARGE)}


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(results: dict[str, Any]) -> str:
    """Tables: per model, the summary over seeds; per seed and run, the readings; the small
    clients' memory against their budget."""
    lines = ["# Budget study (issue 34)", "",
             "Held-out loss (3-round mean of the per-category means) on the small clients' "
             "tasks (group 1) and the large clients' tasks (group 0). Gap closed: (exclude − "
             f"run) ÷ (exclude − fedit-all) on group 1, goal ≥ {GOAL_GAP}; large: run − "
             f"exclude on group 0, goal ≤ {GOAL_LARGE}.", ""]
    for model, r in results["models"].items():
        p = r["plan"]
        lines += [f"## {model}", "",
                  f"Budget {r['budget']:.3g} client FLOPs per run. Small clients: "
                  f"{p['small_mb']} MiB (now computed: {p['small_mb_now']} MiB for "
                  f"{p['small_layers']} of {p['depth']} layers); a shrunken small client gets "
                  f"{p['shrunk_depth']} layers; the whole model needs {p['full_fp32_mb']:.0f} "
                  f"MiB (fp32), {p['full_checkpointed_mb']:.0f} (checkpointing), "
                  f"{_num(p.get('full_nf4_checkpointed_mb'), '.0f')} (nf4 + checkpointing).",
                  "", "| run | gap closed (final) | large − exclude (final) | meets goal |",
                  "|---|---|---|---|"]
        for m, s in r["summary"].items():
            g, d = s["gap_closed"], s["large_vs_exclude"]
            lines.append(f"| {m} | {_num(g['mean'], '.2f')} (n={g['n']}) | "
                         f"{_num(d['mean'], '+.4f')} (n={d['n']}) | "
                         f"{'yes' if s['meets_goal'] else 'no'} |")
        for s in r["per_seed"]:
            heads = list(next(iter(s["runs"].values()))["readings"]) if s["runs"] else []
            lines += ["", f"### seed {s['seed']} (equal rounds: round {s['common_round']})", "",
                      "| run | status | rounds | " + " | ".join(
                          f"{h}: small / large / gap / Δlarge" for h in heads) + " |",
                      "|---|---|---|" + "---|" * len(heads)]
            for m, e in s["runs"].items():
                cells = [f"{_num(x['small_tasks'])} / {_num(x['large_tasks'])} / "
                         f"{_num(x.get('gap_closed'), '.2f')} / "
                         f"{_num(x.get('large_vs_exclude'), '+.4f')}"
                         for x in e["readings"].values()]
                lines.append(f"| {m} | {e['status']} | {e['rounds']} | " + " | ".join(cells)
                             + " |")
            lines += ["", "| run | client | budget MiB | depths | levers | sat out | max "
                      "predicted MiB | max process MiB |", "|---|---|---|---|---|---|---|---|"]
            for m, e in s["runs"].items():
                for c in e["small_clients"]:
                    lines.append(f"| {m} | {c['client']} | {c['budget_mb']} | "
                                 f"{c['depths']} | {'; '.join(c['levers']) or '—'} | "
                                 f"{c['sat_out']}/{c['rounds']} | "
                                 f"{_num(c['max_predicted_mb'], '.0f')} | "
                                 f"{_num(c['max_process_mb'], '.0f')} |")
        lines.append("")
    lines.append(results["runtime_note"])
    return "\n".join(lines) + "\n"


def report(configs: dict[tuple[str, int], tuple[dict[str, RunConfig], int]],
           plans: dict[str, dict[str, Any]], out: Path, settings: list[str],
           smoke: bool = False) -> dict[str, Any]:
    """budget_study.json, budget_study.md and the plots, from what is saved under `out`."""
    results: dict[str, Any] = {"settings": settings, "smoke": smoke, "reading": READING,
                               "fractions": list(FRACTIONS), "models": {}}
    curves: dict[str, dict[int, Any]] = {}
    inprocess = False
    for (model, seed), (cfgs, _) in configs.items():
        name = Path(model).name
        any_cfg = next(iter(cfgs.values()))
        inprocess |= any_cfg.federation.runtime == "inprocess"
        entry_model = results["models"].setdefault(name, {
            "budget": any_cfg.stop.flops_budget, "plan": plans[name], "per_seed": []})
        runs = {m: saved_run(c) for m, c in cfgs.items()}
        runs = {m: got for m, got in runs.items() if len(got[1]) >= 2}
        if not runs:
            continue
        entry, seed_curves = seed_entry(runs, cfgs, category_groups_of(any_cfg),
                                        any_cfg.stop.flops_budget)
        entry["seed"] = seed
        entry_model["per_seed"].append(entry)
        curves.setdefault(name, {})[seed] = (seed_curves, entry)
    for r in results["models"].values():
        names = list(dict.fromkeys(m for s in r["per_seed"] for m in s["runs"]))
        r["summary"] = {m: summarize(r["per_seed"], m) for m in names}
    results["runtime_note"] = (
        "In-process grid: the clients share the server's process, so budgets are modelled "
        "(planned with the nominal floor), not enforced, and 'max process MiB' is the shared "
        "process's peak." if inprocess else
        "Each client is its own process: 'max process MiB' is its VmHWM.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget_study.md").write_text(markdown(results))
    results["plots"] = [str(p) for p in plot_study(curves, results, out)]
    (out / "budget_study.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
