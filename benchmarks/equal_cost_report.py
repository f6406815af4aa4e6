"""The equal-cost study's figures of merit, from runs' round records (no I/O, no torch).

Records are a run's metrics.jsonl rows: `round`, `stage`, `eval_loss` (full model, held out),
`cum_client_flops`, `cum_bytes` (up + down), `wall_time_s`, `client_flops`, `bytes_up`,
`bytes_down`. Record 0 is the model before training.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from devft.methods import METHODS

Records = list[dict[str, Any]]
FRACTIONS = (0.5, 0.9, 1.0)
"""Targets: these shares of FedIT's improvement (initial loss − plateau loss)."""
AXES = {"flops": "cum_client_flops", "bytes": "cum_bytes", "time": "wall_time_s"}
LAST_STAGE_ROUNDS = (1, 2, 4, 8)
"""Rounds into the last stage at which the early-stage comparison reads the loss."""


def loss(r: dict[str, Any]) -> float:
    value = r.get("eval_loss")
    return math.nan if value is None else float(value)


def target_losses(fedit: Records) -> dict[str, float]:
    """{"50%": loss, ...}: FedIT's initial loss minus each fraction of its improvement."""
    start, end = loss(fedit[0]), loss(fedit[-1])  # 100 %: the end itself, not one ulp below
    return {f"{round(f * 100)}%": end if f == 1.0 else start - f * (start - end)
            for f in FRACTIONS}


def first_reaching(records: Records, target: float) -> dict[str, Any] | None:
    """The first trained round at or below `target` (None: never)."""
    return next((r for r in records if r["round"] > 0 and loss(r) <= target), None)


def cost_to(records: Records, target: float) -> dict[str, Any] | None:
    """Round, FLOPs, bytes and wall time of the first round at or below `target`."""
    hit = first_reaching(records, target)
    if hit is None:
        return None
    return {"round": hit["round"], **{axis: hit.get(key, 0) for axis, key in AXES.items()}}


def cost_ratios(records: Records, fedit: Records) -> dict[str, Any]:
    """Per target: this run's cost to reach it, FedIT's, and their ratio per axis (< 1 =
    cheaper than FedIT); "not reached" when this run never gets there."""
    out = {}
    for name, target in target_losses(fedit).items():
        mine, base = cost_to(records, target), cost_to(fedit, target)
        entry: dict[str, Any] = {"target_loss": target, "cost": mine, "fedit_cost": base}
        for axis in AXES:
            entry[f"{axis}_ratio"] = (mine[axis] / base[axis] if mine and base and base[axis]
                                      else "not reached" if not mine else None)
        out[name] = entry
    return out


STAGE_START_KEYS = {"sub_start_calib_loss": "start_calib_loss", "beta": "beta",
                    "residual_exponent": "residual_exponent",
                    "calibration_time_s": "calibration_time_s"}
"""stage_breakdown's fields taken from the `stage_start` record opening a stage."""


def stage_breakdown(records: Records) -> list[dict[str, Any]]:
    """Per stage: rounds, client FLOPs, bytes (up + down), the largest client peak memory, the
    held-out loss at its end; and what explains it: the submodel's calibration loss at the
    stage's start and its held-out loss at the end (None where the stage trains the full
    model unfused), the fusion β and residual exponent used, and the server's calibration
    search time (devft-calibrated)."""
    stages: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["round"] == 0 and "stage_start" not in r:
            continue
        s = stages.setdefault(r["stage"], {
            "stage": r["stage"], "rounds": 0, "flops": 0, "bytes": 0, "loss_reached": math.nan,
            "layers": r.get("layers_trained"), "peak_client_mem_bytes": 0,
            "sub_start_calib_loss": None, "sub_end_eval_loss": None, "beta": None,
            "residual_exponent": None, "calibration_time_s": None})
        start = r.get("stage_start") or {}
        for mine, recorded in STAGE_START_KEYS.items():
            s[mine] = start.get(recorded, s[mine])
        if r["round"] == 0:
            continue
        s["rounds"] += 1
        s["flops"] += int(r.get("client_flops") or 0)
        s["bytes"] += int(r.get("bytes_up") or 0) + int(r.get("bytes_down") or 0)
        s["peak_client_mem_bytes"] = max(s["peak_client_mem_bytes"],
                                         int(r.get("client_peak_mem_bytes") or 0))
        s["loss_reached"] = loss(r)
        s["sub_end_eval_loss"] = r.get("sub_eval_loss")
    return [stages[k] for k in sorted(stages) if stages[k]["rounds"]]


def last_stage(records: Records) -> tuple[dict[str, Any], Records]:
    """(the record just before the last stage's first round, the last stage's records)."""
    last = max(r["stage"] for r in records)
    inside = [r for r in records if r["stage"] == last and r["round"] > 0]
    before = [r for r in records if r["round"] < inside[0]["round"]] if inside else records
    return before[-1], inside


def reads_early_stages(records: Records, full_layers: int | None, finished: bool) -> bool:
    """Whether early_stages can read a run: it has early stages (offsite has one stage only)
    and has reached its last one (finished, or training all `full_layers`)."""
    staged = len({r["stage"] for r in records}) > 1
    return staged and (finished or records[-1].get("layers_trained") == full_layers)


def early_stages(records: Records, fedit: Records,
                 control: Records | None) -> dict[str, Any]:
    """Did the early stages buy anything? The full model's loss when the last stage starts;
    FedIT's FLOPs to reach that loss against what the early stages spent; and the loss after
    k rounds of the last stage, beside FedIT's after k rounds and the control's (a run whose
    last stage starts from a fresh LoRA, e.g. devft-notransfer) after k of its last stage."""
    start, inside = last_stage(records)
    fedit_hit = cost_to(fedit, loss(start))
    spent = int(start.get("cum_client_flops") or 0)
    out: dict[str, Any] = {
        "last_stage_start_round": start["round"], "last_stage_start_loss": loss(start),
        "fresh_start_loss": loss(fedit[0]), "early_flops": spent,
        "fedit_flops_to_same_loss": fedit_hit["flops"] if fedit_hit else None,
        "early_flops_ratio": (spent / fedit_hit["flops"] if fedit_hit and fedit_hit["flops"]
                              else None),
        "after_k_last_stage_rounds": {},
    }
    ctrl = last_stage(control)[1] if control else []
    for k in LAST_STAGE_ROUNDS:
        out["after_k_last_stage_rounds"][k] = {
            "loss": loss(inside[k - 1]) if len(inside) >= k else None,
            "fedit": loss(fedit[k]) if len(fedit) > k else None,
            "control": loss(ctrl[k - 1]) if len(ctrl) >= k else None,
        }
    return out


def spread(values: list[Any]) -> dict[str, Any]:
    """Mean, standard deviation, min and max over the seeds where the value is a number."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0 if xs else None,
            "min": min(xs, default=None), "max": max(xs, default=None),
            "reached": len(xs), "of": len(values)}


def summarize(per_seed: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """Spread over seeds of a method's cost ratios, final loss, rounds and early-stage gain."""
    entries = [s["methods"][method] for s in per_seed if method in s["methods"]]
    out: dict[str, Any] = {
        "seeds": len(entries),
        "final_eval_loss": spread([e["final_eval_loss"] for e in entries]),
        "rounds": spread([e["rounds"] for e in entries]),
        "total_client_flops": spread([e["total_client_flops"] for e in entries]),
        "total_bytes": spread([e["total_bytes"] for e in entries]),
        "stop_reasons": sorted({e["stop"]["reason"] for e in entries}),
        "ratios": {},
    }
    for name in (entries[0]["ratios"] if entries else {}):
        out["ratios"][name] = {f"{axis}_ratio": spread([e["ratios"][name][f"{axis}_ratio"]
                                                        for e in entries]) for axis in AXES}
    early = [e["early"] for e in entries if "early" in e]
    if early:
        out["last_stage_start_loss"] = spread([e["last_stage_start_loss"] for e in early])
        out["early_flops_ratio"] = spread([e["early_flops_ratio"] for e in early])
    return out


def partial_summary(records: Records) -> dict[str, Any]:
    """An unfinished run's summary from its rounds so far (stop reason "unfinished")."""
    last = records[-1]
    return {"rounds": last["round"], "initial_eval_loss": loss(records[0]),
            "final_eval_loss": loss(last), "total_client_flops": last.get("cum_client_flops", 0),
            "total_bytes": last.get("cum_bytes", 0), "wall_time_s": last.get("wall_time_s", 0),
            "stop": {"reason": "unfinished"}}


def _cell(s: dict[str, Any], digits: int = 2, unit: str = "×") -> str:
    """"mean ± std (reached/of)" of a spread; "not reached (0/n)" when no seed reached."""
    if s.get("mean") is None:
        return f"not reached (0/{s.get('of', 0)})"
    return f"{s['mean']:.{digits}f}{unit} ± {s['std']:.{digits}f} ({s['reached']}/{s['of']})"


def _num(value: Any, digits: int = 3) -> str:
    return "–" if not isinstance(value, (int, float)) or not math.isfinite(value) \
        else f"{value:.{digits}f}"


UNFUSED_RECIPES = ("prefix", "layerdrop", "offsite")
"""Stage recipes whose submodels keep or drop real layers and fuse none (no β to report)."""


def _stage_extras(st: dict[str, Any], full_layers: int, fuses: bool) -> str:
    """The per-stage table's explanatory cells: client peak MiB, fusion plan (none for a
    method that `fuses` nothing, or on a stage of all `full_layers`), submodel loss (of the
    full model itself on such a stage)."""
    mem = st.get("peak_client_mem_bytes") or 0
    plan = ("–" if not fuses or st.get("beta") is None or st["layers"] == full_layers else
            f"{st['beta']:g}, {st.get('residual_exponent') or 0:g}" + (
                f" ({st['calibration_time_s']:.0f} s)" if st.get("calibration_time_s") else ""))
    start, end = st.get("sub_start_calib_loss"), st.get("sub_end_eval_loss")
    sub = "–" if start is None and end is None else f"{_num(start, 2)} → {_num(end, 2)}"
    return f"{f'{mem / 2**20:.0f}' if mem else '–'} | {plan} | {sub}"


def _fuses(method: str) -> bool:
    spec = METHODS.get(method)
    return spec is not None and spec.staged and spec.recipe not in UNFUSED_RECIPES


def markdown(results: dict[str, Any]) -> str:
    """The study's tables in Markdown: cost-to-target ratios with spread over seeds, then per
    seed the stages' costs and the early-stage comparison. Unfinished runs are marked."""
    lines = ["# Equal-cost study: tables", "",
             "Ratios are a method's cost to reach the target over FedIT's (< 1: cheaper), mean"
             " ± std over the seeds that reached it (reached/of). `*`: a run not finished yet"
             " (its numbers are its rounds so far). `‡`: a run whose round records are lost,"
             " its numbers from the ledger (benchmarks/equal_cost_ledger.py); it has no"
             " curve in the plots.", ""]
    for model, r in results["models"].items():
        seeds = r["per_seed"]
        provisional = [str(s["seed"]) for s in seeds if not s.get("target_final", True)]
        lines += [f"## {model}", "", "FedIT's plateau loss (the target) per seed: " + ", ".join(
            f"seed {s['seed']} {s['target_eval_loss']:.3f}" for s in seeds)
            + (f" (provisional, FedIT unfinished: seed {', '.join(provisional)})"
               if provisional else ""), "", *_ledger_lines(seeds), *_host_lines(seeds),
            "| method | seeds | final loss | FLOPs to 50 % | FLOPs to 90 % | FLOPs to 100 % "
            "| bytes to 100 % | time to 100 % | stop |", "|---" * 9 + "|"]
        for m, s in r["summary"].items():
            if not s["seeds"]:
                continue
            star = "*" if "unfinished" in s["stop_reasons"] else ""
            star += "‡" if any(e["methods"].get(m, {}).get("source") for e in seeds) else ""
            rat = s["ratios"]
            lines.append(f"| {m}{star} | {s['seeds']} | {_cell(s['final_eval_loss'], 3, '')} | "
                         + " | ".join(_cell(rat[t]["flops_ratio"]) for t in ("50%", "90%",
                                                                             "100%"))
                         + f" | {_cell(rat['100%']['bytes_ratio'])} | "
                         f"{_cell(rat['100%']['time_ratio'])} | {', '.join(s['stop_reasons'])} |")
        lines += ["", "Per stage (FLOPs as a share of FedIT's total on the same seed):", "",
                  "| method | seed | stage | layers | rounds | FLOPs | MB | client peak MiB† "
                  "| β, γ (search s) | submodel (full model if all layers): calib loss at start → "
                  "held-out at end "
                  "| loss at its end |", "|---" * 11 + "|"]
        for s in seeds:
            total = s["methods"]["fedit"]["total_client_flops"] or 1
            full = s["methods"]["fedit"]["stages"][0]["layers"]
            for m, e in s["methods"].items():
                star = "*" if e["stop"]["reason"] == "unfinished" else ""
                star += "‡" if e.get("source") else ""
                for st in e["stages"]:
                    extras = _stage_extras(st, full, _fuses(m))
                    lines.append(f"| {m}{star} | {s['seed']} | {st['stage']} | {st['layers']} | "
                                 f"{st['rounds']} | {st['flops'] / total:.3f} | "
                                 f"{st['bytes'] / 1e6:.0f} | {extras} | "
                                 f"{_num(st['loss_reached'])} |")
        lines += ["", "† `client_peak_mem_bytes`, the largest over the stage's rounds: on GPU the"
                  " allocator's peak, on CPU the process's peak RSS, which in the in-process"
                  " simulation also holds the server's full model; the client memory of real"
                  " client processes is benchmarks/client_memory.py's.", ""]
        lines += ["", "Did the early stages buy anything? (methods with early stages; offsite"
                  " has one stage) Full-model loss when the last stage"
                  " starts, and after k of its rounds; FedIT after k rounds from scratch;"
                  " control = `devft-notransfer` after k of its last stage:", "",
                  "| method | seed | start loss | early FLOPs / FedIT's to that loss | "
                  "k = 1 | k = 2 | k = 4 | k = 8 |", "|---" * 8 + "|"]
        for s in seeds:
            for m, e in s["methods"].items():
                if "early" not in e:
                    continue  # FedIT, a one-stage method, or a run before its last stage
                unfinished = e["stop"]["reason"] == "unfinished"
                ea = e["early"]
                ks = [ea["after_k_last_stage_rounds"].get(k) or
                      ea["after_k_last_stage_rounds"].get(str(k), {}) for k in LAST_STAGE_ROUNDS]
                mark = ("*" if unfinished else "") + ("‡" if e.get("source") else "")
                lines.append(f"| {m}{mark} | {s['seed']} | "
                             f"{_num(ea['last_stage_start_loss'])} | "
                             f"{_num(ea['early_flops_ratio'], 2)} | " + " | ".join(
                                 f"{_num(k.get('loss'))} (FedIT {_num(k.get('fedit'))}, "
                                 f"control {_num(k.get('control'))})" for k in ks) + " |")
        lines += _mc_lines(seeds)
        lines.append("")
    return "\n".join(lines)


def _ledger_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """Per seed, what came from the ledger and whether a FedIT rerun reproduced its target."""
    lines = []
    for s in seeds:
        held = s.get("ledger")
        if not held:
            continue
        if held["whole_seed"]:
            text = "all methods from the ledger" + (
                f" (rerunning here: {', '.join(held['rerunning'])})" if held["rerunning"] else "")
        else:
            c = held["fedit_check"]
            text = (f"FedIT rerun: target {c['target'][0]:.6f} in {c['fedit_rounds'][0]} rounds,"
                    f" ledger {c['target'][1]:.6f} in {c['fedit_rounds'][1]}"
                    + ("; from the ledger: " + ", ".join(held["methods"]) if held["methods"]
                       else "" if c["same_target"] else "; targets differ, ledger not used"))
        lines.append(f"- seed {s['seed']}: {text}")
    return [*lines, ""] if lines else []


def _host_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """Per seed, the CPU kernels each run used (the last digits of a loss depend on them):
    runs grouped by their hosts' `cpu_capability`, "+" for a run resumed on another host."""
    lines = []
    for s in seeds:
        by: dict[str, list[str]] = {}
        for m, e in s["methods"].items():
            caps = [h.get("cpu_capability", "not recorded") for h in e.get("hosts") or []]
            by.setdefault("+".join(caps) or "not recorded", []).append(m)
        if set(by) != {"not recorded"}:
            lines.append(f"- seed {s['seed']}, CPU kernels: " + "; ".join(
                f"{k} ({', '.join(v)})" for k, v in by.items()))
    return [*lines, ""] if lines else []


def _mc_lines(seeds: list[dict[str, Any]]) -> list[str]:
    """Multiple-choice accuracy of the final adapters, per seed and group, with the binomial
    standard error √(p(1−p)/n)."""
    rows = []
    for s in seeds:
        for m, r in (s.get("mc") or {}).items():
            cells = []
            for g in ("trained_heldout", "unseen"):
                v = r["groups"].get(g)
                cells.append(f"{v['acc']:.3f} ± {math.sqrt(v['acc'] * (1 - v['acc']) / v['n']):.3f}"
                             f" (n {v['n']})" if v and v["n"] else "–")
            rows.append(f"| {m} | {s['seed']} | {r['acc']:.3f} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Multiple-choice accuracy of the final adapters (acc; ± one standard error;"
            " `trained_heldout`: held-out rows of tasks in the training mixture, as many as"
            " the split holds; `unseen`: tasks not trained on):", "",
            "| method | seed | mean over tasks | trained, held-out rows | unseen tasks |",
            "|---" * 5 + "|", *rows]
