"""Training on a 4-bit base (issue 33): nf4 runs against the same runs in fp32, at one budget.

The nf4 runs are equal-budget study runs (`equal_budget.py`) with
`--set model.quantization=nf4 --budget B`, in their own folder (default
results/equal-budget-nf4); the fp32 runs are the study's own (results/equal-budget), which
train further, to the study's larger budget, and are read here only up to B. B is the client
FLOPs FedIT fp32 needs to reach its plateau on the slowest seed (9.3e13 for SmolLM2-135M:
seed 1 plateaus at 8.3e13), so every pair is compared where FedIT fp32 has converged.
Both runs of a pair draw the same batches in the same rounds (only the base's precision
differs; `configs_differ` checks the rest of their configs), so they are read round by round:

- **final gap:** nf4 − fp32 of the smoothed held-out loss (the study's 3-round trailing mean,
  `equal_budget_report.smooth`) at the last round both reached within B; the target is
  at most 0.05 nats;
- the raw gap at that round, the best smoothed loss of each within B, and the gap before any
  training (round 0: the cost of quantizing the base alone);
- a run still under way is read up to its last round, and labelled "running".

Where a finished pair's gap comes from (`--cross-base`): each run's exported adapter is
evaluated on both bases, on the rows the run evaluated on (`devft eval`'s held-out loss). At
the nf4 run's last round R, its raw gap to fp32 splits into **from the base at inference**
(the nf4 adapter on the nf4 base − the same adapter on the fp32 base) and **from training**
(the nf4 adapter on the fp32 base − the fp32 run at round R). The fp32 adapter (its own last
round) on the nf4 base says what an fp32-trained adapter loses on a 4-bit device. Each
adapter on its own base repeats its run's last reading (`*_eval_minus_run`, 0 when the
re-evaluation matches the run's record, as the split needs). The losses
are cached in quantized_cross_base.json with the adapter's SHA-256, so a later report
without `--cross-base`, or from a clean checkout that keeps no weights, still shows them.

    python benchmarks/quantized_quality.py --cross-base   # reads both folders, writes --out
    cp results/equal-budget-nf4/quantized_quality.* docs/bench/quantized-quality/
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import int_list, run_script  # noqa: E402
from equal_budget_report import losses_of, smooth  # noqa: E402

from devft.config import RunConfig  # noqa: E402
from devft.config.compat import NEUTRAL_NEW_KEYS  # noqa: E402
from devft.files import atomic_write_json, read_json_object  # noqa: E402
from devft.reporting.recorder import METRICS_FILE, SUMMARY_FILE, read_metrics  # noqa: E402

Record = dict[str, Any]
TARGET_GAP = 0.05
"""Issue 33: the final held-out loss gap, nf4 − fp32, should be at most this (nats)."""
CROSS_FILE = "quantized_cross_base.json"
"""Adapter-on-base held-out losses, cached by adapter digest (`cross_base`)."""
IGNORED = ("output", "stop")
"""Config sections a pair may differ in besides model.quantization (the nf4 runs' budget)."""


def configs_differ(fp32: dict[str, Any], nf4: dict[str, Any]) -> list[str]:
    """Dotted keys, besides `model.quantization` and the IGNORED sections, in which two saved
    configs differ (a section missing on one side counts as a difference; a neutral key that
    older code did not save counts as its default: devft.config.compat)."""
    defaults = RunConfig().to_dict()
    fp32, nf4 = copy.deepcopy(fp32), copy.deepcopy(nf4)
    for dotted in NEUTRAL_NEW_KEYS:
        section, key = dotted.split(".")
        for saved in (fp32, nf4):
            if isinstance(saved.get(section), dict) and saved[section].get(key) is None:
                saved[section][key] = defaults[section][key]
    out = []
    for section in sorted(set(fp32) | set(nf4)):
        if section in IGNORED:
            continue
        a, b = fp32.get(section), nf4.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            out += [] if a == b else [section]
            continue
        out += [f"{section}.{k}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k) and f"{section}.{k}" != "model.quantization"]
    return out


def within(records: list[Record], budget: float) -> list[Record]:
    """The rounds whose cumulative client FLOPs are within `budget` (round 0 always)."""
    return [r for r in records if r["round"] == 0 or r["cum_client_flops"] <= budget]


def pair_entry(fp32: list[Record], nf4: list[Record], budget: float) -> dict[str, Any]:
    """One method and seed: the gaps described in the module docstring."""
    a, b = within(fp32, budget), within(nf4, budget)
    last = min(len(a), len(b)) - 1
    sa, sb = smooth(losses_of(a[: last + 1])), smooth(losses_of(b[: last + 1]))
    return {
        "rounds": last, "flops_at_last": float(b[last]["cum_client_flops"]),
        "round0_fp32": a[0]["eval_loss"], "round0_nf4": b[0]["eval_loss"],
        "round0_gap": b[0]["eval_loss"] - a[0]["eval_loss"],
        "final_fp32": sa[-1], "final_nf4": sb[-1], "final_gap": sb[-1] - sa[-1],
        "raw_gap": b[last]["eval_loss"] - a[last]["eval_loss"],
        "best_fp32": min(sa), "best_nf4": min(sb), "best_gap": min(sb) - min(sa),
        "gap_by_round": [y - x for x, y in zip(losses_of(a), losses_of(b))][: last + 1],
        "within_target": sb[-1] - sa[-1] <= TARGET_GAP,
    }


def read_pairs(fp32_dir: Path, nf4_dir: Path, model: str, seeds: list[int],
               methods: list[str], budget: float, cache: dict[str, Any] | None = None,
               compute: bool = False) -> tuple[list[dict[str, Any]], dict]:
    """Every (method, seed) whose nf4 and fp32 runs both have a trained round; with a `cache`,
    each entry's `cross_base` split too."""
    entries, curves = [], {}
    for method in methods:
        for seed in seeds:
            runs = [d / model / f"seed-{seed}" / method for d in (fp32_dir, nf4_dir)]
            if not all((r / METRICS_FILE).is_file() for r in runs):
                continue
            fp32, nf4 = (read_metrics(r) for r in runs)
            if len(fp32) < 2 or len(nf4) < 2:
                continue
            differ = configs_differ(*(read_json_object(r / "config.json") for r in runs))
            entry = {"method": method, "seed": seed, **pair_entry(fp32, nf4, budget),
                     "status": "finished" if (runs[1] / SUMMARY_FILE).is_file() else "running",
                     "configs_differ_in": differ}
            if cache is not None:
                entry["cross_base"] = cross_base((runs[0], runs[1]), (fp32, nf4), cache, compute)
            entries.append(entry)
            curves[(method, seed)] = (within(fp32, budget), within(nf4, budget))
    return entries, curves


def adapter_loss(adapter: Path, quantization: str) -> float:
    """Held-out loss of a run's exported adapter on the base stored as `quantization`, on the
    rows, encoding and batches the run evaluated on (as `devft eval` computes it)."""
    from devft.evaluation.adapters import load_eval_model
    from devft.evaluation.perplexity import heldout_perplexity, heldout_records

    loaded = load_eval_model(adapter, None, "cpu", "fp32", quantization)
    data, seed = loaded.run_config["data"], int(loaded.run_config["seed"])
    records = heldout_records(data["name"], int(data["eval_examples"]),
                              float(data["heldout_fraction"]), seed)
    scored = heldout_perplexity(loaded.model, loaded.tokenizer, records,
                                int(data["max_seq_len"]), int(data["eval_batch_size"]))
    return float(scored["loss"])


def _digest(adapter: Path) -> str:
    return hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()


def cross_base(runs: tuple[Path, Path], records: tuple[list[Record], list[Record]],
               cache: dict[str, Any], compute: bool,
               loss: Callable[[Path, str], float] = adapter_loss) -> dict[str, Any] | None:
    """The gap's split (module docstring) for one pair of runs (fp32, nf4) with their metric
    records; None until the nf4 run has finished. `cache` maps 'role/model/seed/method:base'
    to {digest, loss}: a loss is recomputed (only when `compute`) where the run's adapter is
    missing from it or has changed, and read as cached where the adapter is not on disk
    (a clean checkout keeps no weights)."""
    if not (runs[1] / SUMMARY_FILE).is_file():
        return None

    def cell(role: int, base: str) -> dict[str, Any] | None:
        run = runs[role]
        where = "/".join((("fp32", "nf4")[role], run.parent.parent.name, run.parent.name, run.name))
        key = f"{where}:{base}"
        adapter, known = run / "adapter", cache.get(key)
        if (adapter / "adapter_model.safetensors").is_file() and (run / SUMMARY_FILE).is_file():
            digest = _digest(adapter)  # a finished run's adapter is its last round's
            if (known is None or known["digest"] != digest) and compute:
                known = cache[key] = {"digest": digest, "round": records[role][-1]["round"],
                                      "loss": loss(adapter, base)}
            elif known is not None and known["digest"] != digest:
                known = None  # a stale loss of an adapter since replaced
        return known

    def value(known: dict[str, Any] | None) -> float | None:
        return None if known is None else float(known["loss"])

    last = records[1][-1]["round"]
    fp32_then = next((r["eval_loss"] for r in records[0] if r["round"] == last), None)
    on_nf4, on_fp32 = value(cell(1, "nf4")), value(cell(1, "none"))
    fp32_on_fp32, fp32_on_nf4 = cell(0, "none"), cell(0, "nf4")
    entry: dict[str, Any] = {
        "round": last, "fp32_run_at_round": fp32_then,
        "nf4_adapter_on_nf4": on_nf4, "nf4_adapter_on_fp32": on_fp32,
        "fp32_adapter_round": (fp32_on_fp32 or fp32_on_nf4 or {}).get("round"),
        "fp32_adapter_on_fp32": value(fp32_on_fp32), "fp32_adapter_on_nf4": value(fp32_on_nf4),
    }
    # same-base evaluations repeat the runs' own last readings: their difference checks that
    # the re-evaluation and the run's recorded losses, mixed in gap_from_training, agree
    if on_nf4 is not None:
        entry["nf4_eval_minus_run"] = on_nf4 - records[1][-1]["eval_loss"]
    if entry["fp32_adapter_on_fp32"] is not None:
        entry["fp32_eval_minus_run"] = entry["fp32_adapter_on_fp32"] - records[0][-1]["eval_loss"]
    if on_nf4 is not None and on_fp32 is not None:
        entry["gap_from_base"] = on_nf4 - on_fp32
        if fp32_then is not None:
            entry["gap_from_training"] = on_fp32 - fp32_then
    return entry


def markdown(results: dict[str, Any]) -> str:
    rows = ["| method | seed | status | rounds | round 0: fp32 / nf4 | final (3-round mean): "
            "fp32 / nf4 | gap | raw gap | best: fp32 / nf4 |", "|" + "---|" * 9]
    for e in results["pairs"]:
        rows.append(
            f"| {e['method']} | {e['seed']} | {e['status']} | {e['rounds']} | "
            f"{e['round0_fp32']:.3f} / {e['round0_nf4']:.3f} | {e['final_fp32']:.4f} / "
            f"{e['final_nf4']:.4f} | {e['final_gap']:+.4f} | {e['raw_gap']:+.4f} | "
            f"{e['best_fp32']:.4f} / {e['best_nf4']:.4f} |")
    split = _cross_rows(results["pairs"])
    odd = [f"{e['method']} seed {e['seed']}: {', '.join(e['configs_differ_in'])}"
           for e in results["pairs"] if e["configs_differ_in"]]
    return (f"# nf4 against fp32 at {results['budget']:.3g} client FLOPs ({results['model']})"
            f"\n\nGap = nf4 − fp32 held-out loss; target ≤ {TARGET_GAP}.\n\n"
            + "\n".join(rows) + "\n"
            + ("\nConfigs differ beyond the base's precision: " + "; ".join(odd) + "\n"
               if odd else "") + split)


def _cross_rows(pairs: list[dict[str, Any]]) -> str:
    """The Markdown section on where each finished pair's gap comes from ('' if none)."""
    def num(value: float | None, sign: str = "") -> str:
        return "–" if value is None else f"{value:{sign}.4f}"

    rows = [f"| {e['method']} | {e['seed']} | {c['round']} | {num(c['fp32_run_at_round'])} | "
            f"{num(c['nf4_adapter_on_nf4'])} | {num(c['nf4_adapter_on_fp32'])} | "
            f"{num(c.get('gap_from_base'), '+')} | {num(c.get('gap_from_training'), '+')} | "
            f"{c['fp32_adapter_round'] or '–'}: {num(c['fp32_adapter_on_fp32'])} / "
            f"{num(c['fp32_adapter_on_nf4'])} |"
            for e in pairs if (c := e.get("cross_base"))]
    if not rows:
        return ""
    return ("\n## Where the gap comes from\n\nEach run's adapter on both bases, at the nf4 "
            "run's last round R (raw held-out loss, not smoothed).\n\n| method | seed | R | "
            "fp32 run at R | nf4 adapter on nf4 base | on fp32 base | from the base | "
            "from training | fp32 adapter (round): on fp32 / on nf4 |\n" + "|---" * 9 + "|\n"
            + "\n".join(rows) + "\n")


def plot(curves: dict, budget: float, out: Path) -> Path | None:
    """Left: each pair's smoothed held-out loss against client FLOPs (fp32 solid, nf4 dashed).
    Right: the gap, nf4 − fp32, round by round (raw, faint; smoothed, bold)."""
    if not curves:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, ((method, seed), (fp32, nf4)) in enumerate(sorted(curves.items())):
        color, label = f"C{i}", f"{method} seed {seed}"
        for recs, style, tag in ((fp32, "-", "fp32"), (nf4, "--", "nf4")):
            left.plot([r["cum_client_flops"] for r in recs], smooth(losses_of(recs)),
                      color=color, ls=style, label=f"{label} {tag}")
        n = min(len(fp32), len(nf4))
        gap = [y - x for x, y in zip(losses_of(fp32[:n]), losses_of(nf4[:n]))]
        right.plot(range(n), gap, color=color, alpha=0.3, lw=0.8)
        right.plot(range(n), smooth(gap), color=color, label=label)
    left.axvline(budget, color="k", ls=":", lw=0.8)
    left.set_ylim(top=3.0)
    left.set(xlabel="client FLOPs", ylabel="held-out loss (3-round mean)")
    right.axhline(TARGET_GAP, color="k", ls="--", lw=0.8)
    right.axhline(0, color="k", lw=0.5)
    right.set_ylim(-0.15, 0.4)
    right.set(xlabel="round", ylabel="nf4 − fp32 held-out loss")
    left.legend(fontsize=6)
    right.legend(fontsize=7)
    fig.suptitle("Training on an nf4 base against fp32: same batches, same budget")
    fig.tight_layout()
    path = out / "quantized_quality.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fp32", default="results/equal-budget")
    ap.add_argument("--nf4", default="results/equal-budget-nf4")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seeds", type=int_list, default="0,1,2")
    ap.add_argument("--methods", default="fedit,devft")
    ap.add_argument("--budget", type=float, default=9.3e13, help="client FLOPs (the nf4 runs')")
    ap.add_argument("--out", default=None, help="default: the --nf4 folder")
    ap.add_argument("--cross-base", action="store_true",
                    help="evaluate finished runs' adapters on both bases (about a minute each, "
                         "cached); without it, only cached losses are shown")
    args = ap.parse_args(argv)
    out = Path(args.out or args.nf4)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cache_file = out / CROSS_FILE
    cache = read_json_object(cache_file) if cache_file.is_file() else {}
    pairs, curves = read_pairs(Path(args.fp32), Path(args.nf4), args.model, args.seeds,
                               methods, args.budget, cache, args.cross_base)
    atomic_write_json(cache_file, cache)
    results: dict[str, Any] = {"model": args.model, "budget": args.budget,
                               "target_gap": TARGET_GAP, "pairs": pairs}
    (out / "quantized_quality.md").write_text(markdown(results))
    drawn = plot(curves, args.budget, out)
    results["plot"] = str(drawn) if drawn else None
    (out / "quantized_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    run_script(main)
