"""benchmarks/memory_plan_check.py: client-process rows of several models kept in one JSON."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_plan_check as mpc  # noqa: E402


def _row(model: str, ratio: float, run: str) -> dict:
    return {"model": model, "ratio": ratio, "run": run}


def test_a_new_run_replaces_only_its_own_rows():
    merged = mpc.merge_processes(None, {"command": "smol run", "wall_s": 10.0,
                                        "rows": [_row("smol", 1.02, "smol"),
                                                 _row("smol", 1.2, "smol")]}, "smol")
    merged = mpc.merge_processes(merged, {"command": "gemma run",
                                          "rows": [_row("gemma", 0.9, "gemma")]}, "gemma")
    assert merged["runs"] == {"smol": {"command": "smol run", "wall_s": 10.0},
                              "gemma": {"command": "gemma run"}}
    assert [r["run"] for r in merged["rows"]] == ["smol", "smol", "gemma"]
    assert merged["summary"]["rows"] == 3 and merged["summary"]["below_0.95"] == 1
    assert merged["summary_by_run"]["smol"]["above_1.15"] == 1
    dtypes = mpc.run_key("smol", "dtypes")
    assert dtypes == "smol:dtypes" and mpc.run_key("smol", "main") == "smol"
    merged = mpc.merge_processes(merged, {"command": "int8", "rows": [_row("smol", 1.1, "x")]},
                                 dtypes)
    again = mpc.merge_processes(merged, {"command": "smol again",
                                         "rows": [_row("smol", 1.0, "x")]}, "smol")
    assert [r["ratio"] for r in again["rows"]] == [0.9, 1.1, 1.0]  # smol's main rows replaced
    assert again["runs"]["smol"] == {"command": "smol again"}
    assert again["runs"]["gemma"] == {"command": "gemma run"}
    assert again["runs"][dtypes] == {"command": "int8"}
    kept = mpc.merge_processes(again, None, "")  # --no-processes: re-summarized only
    assert kept["rows"] == again["rows"] and kept["runs"] == again["runs"]
