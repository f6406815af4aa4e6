"""Study entries whose round records are lost, kept from a frozen earlier report (the ledger).

The runs of sessions 1–5 lived in an ignored folder and went with that checkout
(2026-12-02); their report, docs/bench/equal-cost/ledger-2026-12-02.json, was committed. A
seed's entry there is the same schema as run_seed's, so it can stand in for runs that are
not on disk: the whole seed when its FedIT has no finished records here, or single methods
beside a finished FedIT rerun, but only when that rerun reached the ledger's target (a
ledger method's ratios are against its seed's FedIT; another target would mix two
references). Only finished ledger runs are used (an unfinished one's checkpoints went with
the checkout: it runs again from scratch). Ledger methods are marked `"source": "ledger"`
and have no curves to plot.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

LEDGER = Path("docs/bench/equal-cost/ledger-2026-12-02.json")
SAME_TARGET_RTOL = 1e-6
"""Two FedIT runs of one seed reach the same target to this relative tolerance (CPU runs of
one config are deterministic; a larger gap means they are not, and the ledger is not used)."""


def load_ledger(path: Path | None, model: str) -> dict[int, dict[str, Any]]:
    """{seed: per-seed entry} of `model` in the ledger at `path` ({} without one)."""
    if path is None or not path.is_file():
        return {}
    held = json.loads(path.read_text()).get("models", {}).get(model, {})
    return {int(s["seed"]): s for s in held.get("per_seed", [])}


def _marked(entry: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(entry), "source": "ledger"}




def same_target(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SAME_TARGET_RTOL)


def with_ledger(entry: dict[str, Any] | None,
                held: dict[str, Any] | None) -> dict[str, Any] | None:
    """`entry` (from records on disk) completed from `held` (the ledger's entry of the same
    seed): the ledger's whole entry while FedIT here has no finished records; else the
    ledger's methods that `entry` lacks, when both FedITs reached the same target. Records
    always win over the ledger. Adds "ledger" = what was taken and the FedIT check."""
    if held is None:
        return entry
    held = {**held, "methods": {m: e for m, e in held["methods"].items()
                                if e["stop"]["reason"] != "unfinished"}}
    if not (entry and entry["target_final"]):
        out = copy.deepcopy(held)
        out["methods"] = {m: _marked(e) for m, e in held["methods"].items()}
        running = sorted(entry["methods"]) if entry else []
        out["ledger"] = {"whole_seed": True, "methods": sorted(held["methods"]),
                         "rerunning": running}
        return out
    assert entry is not None
    fedit, old = entry["methods"]["fedit"], held["methods"]["fedit"]
    check = {"target": [entry["target_eval_loss"], held["target_eval_loss"]],
             "fedit_rounds": [fedit["rounds"], old["rounds"]],
             "same_target": same_target(entry["target_eval_loss"], held["target_eval_loss"])}
    out = copy.deepcopy(entry)
    taken = ([m for m in held["methods"] if m not in entry["methods"]]
             if check["same_target"] else [])
    for m in taken:
        out["methods"][m] = _marked(held["methods"][m])
    out["ledger"] = {"whole_seed": False, "methods": taken, "fedit_check": check}
    control = held["methods"].get("devft-notransfer")
    if check["same_target"] and "devft-notransfer" in taken and control and "early" in control:
        _fill_control(out, control["early"]["after_k_last_stage_rounds"])
    return out


def _fill_control(entry: dict[str, Any], control_after_k: dict[str, Any]) -> None:
    """The control's column of the early-stage comparison, for runs on disk whose control
    is a ledger entry (its losses after k last-stage rounds are in the ledger)."""
    for e in entry["methods"].values():
        if e.get("source") == "ledger" or "early" not in e:
            continue
        for k, row in e["early"]["after_k_last_stage_rounds"].items():
            held = control_after_k.get(str(k)) or {}
            if row.get("control") is None and held.get("loss") is not None:
                row["control"] = held["loss"]
