"""benchmarks/equal_cost_ledger.py: a frozen report's entries stand in for lost runs."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from equal_cost_ledger import load_ledger, with_ledger  # noqa: E402
from equal_cost_report import _ledger_lines, markdown  # noqa: E402


def _method(reason, loss, control_k1=None):
    e = {"rounds": 5, "final_eval_loss": loss, "stop": {"reason": reason}, "stages": [],
         "ratios": {}}
    if control_k1 is not None or reason == "target_loss":
        e["early"] = {"after_k_last_stage_rounds": {"1": {"loss": loss + 1, "fedit": 3.0,
                                                          "control": control_k1}}}
    return e


def _entry(target, fedit_reason="plateau", **methods):
    return {"target_eval_loss": target, "seed": 1, "target_final": fedit_reason != "unfinished",
            "methods": {"fedit": _method(fedit_reason, target), **methods}}


HELD = _entry(1.5, devft=_method("target_loss", 1.49, control_k1=2.5),
              **{"devft-notransfer": _method("target_loss", 1.48),
                 "devft-calibrated": _method("unfinished", 1.6)})


def test_without_finished_fedit_records_the_whole_seed_comes_from_the_ledger():
    assert with_ledger(None, None) is None
    whole = with_ledger(None, HELD)
    assert set(whole["methods"]) == {"fedit", "devft", "devft-notransfer"}  # unfinished dropped
    assert all(e["source"] == "ledger" for e in whole["methods"].values())
    running = with_ledger(_entry(2.9, fedit_reason="unfinished"), HELD)
    assert running["ledger"] == {"whole_seed": True, "rerunning": ["fedit"],
                                 "methods": ["devft", "devft-notransfer", "fedit"]}
    assert running["methods"]["fedit"]["final_eval_loss"] == 1.5
    assert "source" not in HELD["methods"]["fedit"]  # the ledger itself is not changed


def test_a_rerun_that_reaches_the_ledgers_target_takes_the_missing_methods():
    mine = _entry(1.5 * (1 + 1e-9), devft=_method("target_loss", 1.40),
                  **{"devft-adaptive": _method("target_loss", 1.45)})
    out = with_ledger(mine, HELD)
    assert out["methods"]["devft"]["final_eval_loss"] == 1.40  # records win
    assert "source" not in out["methods"]["devft"]
    assert out["methods"]["devft-notransfer"]["source"] == "ledger"
    assert "devft-calibrated" not in out["methods"]
    assert out["ledger"]["methods"] == ["devft-notransfer"]
    assert out["ledger"]["fedit_check"]["same_target"]
    # the control's column of a run on disk comes from the ledger's control
    assert out["methods"]["devft-adaptive"]["early"]["after_k_last_stage_rounds"]["1"][
        "control"] == 1.48 + 1


def test_a_rerun_with_another_target_uses_nothing_of_the_ledger():
    out = with_ledger(_entry(1.52), HELD)
    assert set(out["methods"]) == {"fedit"}
    assert out["ledger"]["fedit_check"] == {"target": [1.52, 1.5], "fedit_rounds": [5, 5],
                                            "same_target": False}
    text = "\n".join(_ledger_lines([out]))
    assert "targets differ, ledger not used" in text


def test_load_ledger_reads_one_models_seeds(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"models": {"m": {"per_seed": [HELD]}}}))
    assert list(load_ledger(path, "m")) == [1]
    assert load_ledger(path, "other") == {} and load_ledger(None, "m") == {}
    assert load_ledger(tmp_path / "absent.json", "m") == {}


def test_the_committed_ledger_is_readable_and_marked_in_the_tables():
    held = load_ledger(ROOT / "docs/bench/equal-cost/ledger-2026-12-02.json",
                       "smollm2-135m-instruct")
    assert set(held) == {0, 1}
    entry = with_ledger(None, held[0])
    entry["seed"] = 0
    results = {"models": {"smollm2-135m-instruct": {"per_seed": [entry], "summary": {}}}}
    table = markdown(results)
    assert "| devft‡ | 0 | 0 | 4 | 4 |" in table
    assert "- seed 0: all methods from the ledger" in table
