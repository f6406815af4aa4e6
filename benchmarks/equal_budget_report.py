"""Read the equal-budget study (issue 31) off its saved curves: smoothed crossings, the noise
floor, server-side cost and 90 % intervals over seeds.

The reading rule, the same for every run, FedIT and its replicate included:
- **Smoothing:** a trailing 3-round moving average of the held-out loss (`smooth`). It is
  causal, so a crossing never moves when a run is extended to a larger budget, and it cuts
  the round-to-round jitter (0.02-0.05 nats on FedIT's plateau) by about sqrt(3).
- **Target:** FedIT's *plateau level*: its smoothed loss at the first round r >= 24 at which
  the smoothed curve improved by less than 1 % over the last 4 rounds (the equal-cost
  study's plateau test, on the smoothed curve). 50 % and 90 % targets are that share of
  FedIT's improvement from its round-0 loss; the 100 % target is the level itself (no
  arithmetic, so no rounding below it).
- **Crossing:** the first round whose smoothed loss is at or below the target; its cost is
  the run's cumulative client FLOPs (and bytes) at that round. A crossing after the run's
  FLOPs budget is "not within budget".
- **Ratios** are to FedIT of the same seed; the replicate's ratio is the *noise floor*, and
  every method is also read against the replicate (paired difference per seed).
- **Spread:** mean, standard deviation and a 90 % Student-t interval over seeds
  (mean ± t(0.95, n-1)·s/sqrt(n)); seeds that did not reach a target are counted, not
  averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

Record = dict[str, Any]
SHARES = {"50%": 0.5, "90%": 0.9, "100%": 1.0}
SMOOTH_WINDOW, PLATEAU_WINDOW, PLATEAU_REL, PLATEAU_MIN_ROUND = 3, 4, 0.01, 24
SIMILARITY_RECIPES = ("spectral", "boundary")
"""Stage recipes whose grouping needs the server's layer-similarity pass."""


def smooth(losses: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Trailing moving average: mean of the last `window` readings (fewer at the start)."""
    return [float(np.mean(losses[max(0, i - window + 1): i + 1])) for i in range(len(losses))]


def plateau_round(smoothed: Sequence[float], window: int = PLATEAU_WINDOW,
                  rel: float = PLATEAU_REL, min_round: int = PLATEAU_MIN_ROUND) -> int | None:
    """First round r >= max(min_round, window) where the smoothed loss fell by less than
    `rel` (relative) over the last `window` rounds; None when the curve never flattens."""
    for r in range(max(min_round, window), len(smoothed)):
        before = smoothed[r - window]
        if (before - smoothed[r]) / abs(before) < rel:
            return r
    return None


def losses_of(records: Sequence[Record]) -> list[float]:
    return [math.nan if r.get("eval_loss") is None else float(r["eval_loss"]) for r in records]


def targets(fedit: Sequence[Record]) -> dict[str, Any] | None:
    """FedIT's plateau round and level and the 50/90/100 % targets (None: no plateau yet)."""
    losses = losses_of(fedit)
    smoothed = smooth(losses)
    p = plateau_round(smoothed)
    if p is None:
        return None
    start, level = losses[0], smoothed[p]
    out = {k: (level if f == 1.0 else start - f * (start - level)) for k, f in SHARES.items()}
    return {"plateau_round": p, "plateau_flops": float(fedit[p]["cum_client_flops"]),
            "start_loss": start, "plateau_level": level, "targets": out}


def crossing(records: Sequence[Record], target: float, budget: float) -> dict[str, Any]:
    """Where the run's smoothed curve first reaches `target`: round, client FLOPs and bytes
    there; `reached` False when it never does, or only after its FLOPs budget."""
    smoothed = smooth(losses_of(records))
    for r, value in enumerate(smoothed):
        if value <= target:
            flops = float(records[r]["cum_client_flops"])
            within = budget <= 0 or flops <= budget
            return {"round": r, "flops": flops, "bytes": float(records[r]["cum_bytes"]),
                    "reached": within, **({} if within else {"why": "not within budget"})}
    return {"round": None, "reached": False, "why": "not reached"}


def reproduction(new: Sequence[Record], old: Sequence[Record]) -> dict[str, Any]:
    """How closely a new run repeats an older run of the same config over their common
    rounds: the largest absolute and relative held-out loss difference."""
    a, b = losses_of(new), losses_of(old)
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    rel = [d / abs(y) for d, y in zip(diffs, b[:n]) if y]
    return {"common_rounds": n - 1, "max_abs_diff": max(diffs) if diffs else None,
            "max_rel_diff": max(rel) if rel else None,
            "identical": bool(diffs) and max(diffs) == 0.0}


def layer_matmul_params(config: Any) -> int:
    """Elements of one decoder layer's linear weights (attention and gated MLP)."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    return int(attn + 3 * h * config.intermediate_size)


def server_flops(records: Sequence[Record], recipe: str, depth: int, layer_params: int,
                 calib_shape: tuple[int, int], attn_width: int) -> list[float]:
    """Cumulative server FLOPs after each round that the method itself needs (evaluation for
    the study's curves excluded): a full-model forward on the calibration batch for the
    layer similarity at each early stage's start (spectral and boundary recipes), and the
    fusion of each early stage (about 2 FLOPs per element of every fused layer)."""
    batch, seq = calib_shape
    forward = 2 * depth * layer_params * batch * seq + 4 * batch * seq * seq * attn_width * depth
    total, out, seen = 0.0, [], set()
    for r in records:
        stage, width = r.get("stage", 0), r.get("layers_trained", depth)
        if stage not in seen and width < depth:
            seen.add(stage)
            total += (forward if recipe in SIMILARITY_RECIPES else 0) + 2 * depth * layer_params
        out.append(total)
    return out


def interval(values: Sequence[float], level: float = 0.90) -> dict[str, Any]:
    """Mean, sample std and a Student-t interval at `level` (None where n is too small)."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci90": None}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci90": None}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "ci90": [mean - half, mean + half]}


def seed_entry(runs: dict[str, Sequence[Record]], budget: float,
               server: dict[str, list[float]]) -> dict[str, Any] | None:
    """One seed: targets from FedIT, each run's crossings and ratios to FedIT and to the
    replicate (None while FedIT has no plateau)."""
    fedit = runs.get("fedit")
    got = targets(fedit) if fedit else None
    if got is None:
        return None
    entry: dict[str, Any] = {**got, "methods": {}}
    for m, records in runs.items():
        e: dict[str, Any] = {"rounds": len(records) - 1,
                             "final_flops": float(records[-1]["cum_client_flops"]),
                             "final_smoothed": smooth(losses_of(records))[-1],
                             "best_loss": float(np.nanmin(losses_of(records))), "targets": {}}
        for share, target in got["targets"].items():
            hit = crossing(records, target, budget)
            if hit["reached"] and m in server:
                hit["server_flops"] = server[m][hit["round"]]
                hit["total_flops"] = hit["flops"] + hit["server_flops"]
            e["targets"][share] = hit
        entry["methods"][m] = e
    for e in entry["methods"].values():
        for share, hit in e["targets"].items():
            for ref in ("fedit", "fedit-replicate"):
                base = entry["methods"].get(ref, {}).get("targets", {}).get(share)
                if hit["reached"] and base and base["reached"]:
                    hit[f"flops_vs_{ref}"] = hit["flops"] / base["flops"]
                    hit[f"bytes_vs_{ref}"] = hit["bytes"] / base["bytes"]
    return entry


def summarize(per_seed: Sequence[dict[str, Any]], method: str) -> dict[str, Any]:
    """Per target: the ratio to FedIT over seeds, the noise floor beside it, the ratio to
    the replicate and the paired difference (method − replicate, both ÷ FedIT)."""
    out: dict[str, Any] = {}
    for share in SHARES:
        ratios, vs_rep, diffs, floor, missed = [], [], [], [], []
        for s in per_seed:
            hit = s["methods"].get(method, {}).get("targets", {}).get(share)
            rep = s["methods"].get("fedit-replicate", {}).get("targets", {}).get(share)
            if hit is None:
                continue
            if "flops_vs_fedit" not in hit:
                missed.append({"seed": s["seed"], "why": hit.get("why", "not reached")})
                continue
            ratios.append(hit["flops_vs_fedit"])
            if rep is not None and "flops_vs_fedit" in rep:
                floor.append(rep["flops_vs_fedit"])
                diffs.append(hit["flops_vs_fedit"] - rep["flops_vs_fedit"])
                vs_rep.append(hit["flops_vs_fedit-replicate"])
        out[share] = {"flops_vs_fedit": interval(ratios), "noise_floor": interval(floor),
                      "flops_vs_replicate": interval(vs_rep),
                      "paired_difference": interval(diffs), "not_reached": missed}
    return out


READING = __doc__


def _fmt(iv: dict[str, Any], missed: int = 0) -> str:
    if iv["mean"] is None:
        return "—" if not missed else f"not reached on {missed}"
    text = f"{iv['mean']:.2f}×"
    if iv["std"] is not None:
        lo, hi = iv["ci90"]
        text += f" ± {iv['std']:.2f} [{lo:.2f}, {hi:.2f}]"
    text += f" (n={iv['n']})"
    return text + (f", not reached on {missed}" if missed else "")


def markdown(results: dict[str, Any]) -> str:
    """Tables: per model, each method's cost to FedIT's plateau level (100 %) and to 90 %
    of its improvement, against FedIT, the noise floor and the replicate; then per seed."""
    lines = ["# Equal-budget study (issue 31)", "",
             "Cost (client FLOPs) to FedIT's smoothed plateau level, ÷ FedIT's, as mean ± "
             "std [90 % t interval] over seeds. Noise floor: the FedIT replicate's ratio. "
             "Paired: (method − replicate) ÷ FedIT, per seed.", ""]
    for model, r in results["models"].items():
        lines += [f"## {model} (budget {r['budget']:.3g} client FLOPs per run)", "",
                  "| method | target | ÷ FedIT | noise floor | ÷ replicate | paired "
                  "difference |", "|---|---|---|---|---|---|"]
        for m, s in r["summary"].items():
            for share in ("100%", "90%"):
                e = s[share]
                lines.append(f"| {m} | {share} | {_fmt(e['flops_vs_fedit'], len(e['not_reached']))}"
                             f" | {_fmt(e['noise_floor'])} | {_fmt(e['flops_vs_replicate'])} | "
                             f"{_fmt(e['paired_difference'])} |")
        lines += ["", "| seed | FedIT plateau (round, level) | budget ≥ 1.5× | method | status |"
                  " rounds | 100 % crossing (round, ÷ FedIT) | server FLOPs |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in r["per_seed"]:
            if s.get("plateau_round") is None:
                lines.append(f"| {s['seed']} | no plateau yet ({s.get('fedit_rounds')} "
                             "rounds) | | | | | | |")
                continue
            for m, e in s["methods"].items():
                hit = e["targets"]["100%"]
                where = (f"{hit['round']}, {hit.get('flops_vs_fedit', float('nan')):.2f}×"
                         if hit["reached"] else hit.get("why", "not reached"))
                lines.append(f"| {s['seed']} | {s['plateau_round']}, {s['plateau_level']:.4f} "
                             f"| {'yes' if s['budget_ok'] else 'NO'} | {m} | {e['status']} | "
                             f"{e['rounds']} | {where} | {e['server_flops_total']:.3g} |")
        checks = [(s["seed"], s["fedit_vs_equal_cost_run"]) for s in r["per_seed"]
                  if "fedit_vs_equal_cost_run" in s]
        for seed, c in checks:
            how = "identical" if c["identical"] else f"relative {c['max_rel_diff']:.2e}"
            lines.append(f"FedIT seed {seed} against the equal-cost study's run: "
                         f"{c['common_rounds']} common rounds, largest loss difference "
                         f"{c['max_abs_diff']:.3g} ({how}).")
        lines.append("")
    return "\n".join(lines)
