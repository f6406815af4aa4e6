"""Where does DevFT help? DevFT variants against one FedIT run of the same base config.

Each variant is DevFT with a few config overrides (beta, the stage schedule, rounds per stage,
the similarity and Laplacian of the grouping); every variant and FedIT share the seed,
partitions, total rounds and per-round client budget, so a DevFT variant never spends more
client compute than FedIT (its stages are smaller). Fusion, grouping and transfer variants are
methods of their own (`devft-avgfusion`, `devft-random`, `devft-scaledtransfer`, ...) and are
run by `devft compare`; this script covers the knobs that are config values. The FedIT run is
reused from --baseline when it holds a finished run of the same base config, else run into
OUT/fedit. Finished variants are reused. Writes OUT/sensitivity.json (per variant: final
held-out loss, its delta to FedIT, time and bytes to FedIT's final loss, the full model's
held-out loss at the end of each stage) and OUT/sensitivity.png.

    python benchmarks/sensitivity.py --baseline runs/all-methods/fedit --out runs/bench/sensitivity
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import int_list, run_script  # noqa: E402

from devft.cli import setup_logging  # noqa: E402
from devft.comparison import run_or_reuse  # noqa: E402
from devft.config import load_config  # noqa: E402
from devft.reporting.compare import against_baseline  # noqa: E402
from devft.reporting.recorder import read_metrics  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "default (beta 0.1, 4/8/15/30, hidden+normalized)": [],
    "beta 0": ["devft.beta=0.0"],
    "beta 0.14 (the largest the 4-layer stage allows)": ["devft.beta=0.14"],
    "stages 8/15/30": ["devft.stages=[8,15,30]"],
    "stages 15/30": ["devft.stages=[15,30]"],
    "rounds/stage 1/1/1/5": ["devft.rounds_per_stage=[1,1,1,5]"],
    "weights + unnormalized (paper literal)": ["devft.similarity=weights",
                                               "devft.laplacian=unnormalized"],
}


def _run(config: str | None, overrides: list[str], out: Path) -> list[dict[str, Any]]:
    """The run's round records; a finished run of exactly this config in `out` is reused and
    an interrupted one resumed (as `devft compare` does)."""
    run_or_reuse(load_config(config, [*overrides, f"output.dir={out}", "output.progress=false"]))
    return read_metrics(out)


def stage_ends(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full model's held-out loss after the last round of each stage."""
    ends: dict[int, dict[str, Any]] = {}
    for r in records[1:]:
        ends[r["stage"]] = {"stage": r["stage"], "layers": r.get("layers_trained"),
                            "round": r["round"], "eval_loss": r["eval_loss"]}
    return list(ends.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--baseline", help="a finished FedIT run of the same config to reuse")
    ap.add_argument("--variants", type=int_list,
                    help="comma-separated indices into VARIANTS (default: all)")
    ap.add_argument("--out", default="runs/bench/sensitivity")
    args = ap.parse_args()
    setup_logging(verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picked = args.variants or range(len(VARIANTS))
    if any(not 0 <= i < len(VARIANTS) for i in picked):
        ap.error(f"--variants {args.variants}: indices 0..{len(VARIANTS) - 1} of "
                 + "; ".join(f"{i} {name}" for i, name in enumerate(VARIANTS)))
    names = {i: list(VARIANTS)[i] for i in picked}  # OUT/variant-<i>: i = the index in VARIANTS
    base_dir = Path(args.baseline) if args.baseline else out / "fedit"
    baseline = _run(args.config, ["method=fedit"], base_dir)
    runs, result = {"fedit": baseline}, {"baseline": str(base_dir), "variants": {}}
    for i, name in names.items():
        records = _run(args.config, ["method=devft", *VARIANTS[name]], out / f"variant-{i}")
        runs[name] = records
        result["variants"][name] = {"overrides": VARIANTS[name],
                                    "final_eval_loss": records[-1]["eval_loss"],
                                    "vs_fedit": against_baseline(records, baseline),
                                    "stage_ends": stage_ends(records)}
        (out / "sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, records in runs.items():
        ax.plot([r["round"] for r in records], [r["eval_loss"] for r in records], label=name,
                lw=2.5 if name == "fedit" else 1.2, color="black" if name == "fedit" else None)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (full model, global LoRA)")
    ax.set_title("DevFT variants vs FedIT, same seed, partitions and rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=120)
    for name, v in result["variants"].items():
        s = v["vs_fedit"]
        print(f"{name:45s} final {v['final_eval_loss']:.4f} ({s['final_eval_loss_delta']:+.4f} "
              f"vs fedit); stage ends "
              + " ".join(f"{e['eval_loss']:.3f}" for e in v["stage_ends"]))
    print(f"sensitivity.json and sensitivity.png in {out}")


if __name__ == "__main__":
    run_script(main)
