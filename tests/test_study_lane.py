"""benchmarks/study_lane.sh: its pieces run in order, and the lane stages its work for a
commit (study_keep.py) when it ends, also when timeout cuts it, so a cut lane loses nothing.

The interpreter is a stub (env PY) that logs each call and sleeps where training would run:
what is tested is the lane's control flow, not the study."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
case "$*" in
  *study_keep.py*) exit 0 ;;
  *--report-only*) exit 0 ;;
  *equal_cost.py*) sleep "${STUB_SLEEP:-0}" ;;
esac
"""


@pytest.fixture
def lane(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "study_lane.sh", tmp_path / "benchmarks")
    stub = tmp_path / "py"
    stub.write_text(STUB)
    stub.chmod(0o755)
    return tmp_path


def _run(lane: Path, *pieces: str, sleep: int = 0, cut_after: int | None = None,
         mc: str = "0") -> int:
    env = {**os.environ, "PY": str(lane / "py"), "RUNS": "runs", "MC": mc,
           "STUB_SLEEP": str(sleep)}
    cmd = ["bash", str(lane / "benchmarks" / "study_lane.sh"), "T", *pieces]
    if cut_after is not None:
        cmd = ["timeout", "-s", "TERM", str(cut_after), *cmd]
    return subprocess.run(cmd, cwd=lane, env=env, timeout=60).returncode


def _calls(lane: Path) -> list[str]:
    return (lane / "calls.log").read_text().splitlines()


def _progress(lane: Path) -> str:
    return (lane / "runs" / "lanes" / "T.progress").read_text()


def test_pieces_run_in_order_then_the_lane_keeps_its_work(lane):
    assert _run(lane, "1:devft", "2:layerdrop,progfed", mc="300") == 0
    calls = _calls(lane)
    assert len(calls) == 5
    assert "--seeds 1 --methods devft" in calls[0] and "--report-only" not in calls[0]
    assert "--report-only --mc-limit 300 --mc-methods fedit,devft" in calls[1]
    assert "--seeds 2 --methods layerdrop,progfed" in calls[2]
    assert "--mc-methods fedit,layerdrop,progfed" in calls[3]
    assert calls[4].startswith("benchmarks/study_keep.py --out results/equal-cost")
    # it keeps its own runs (each piece's and its seed's FedIT), never another lane's
    m = "smollm2-135m-instruct"
    assert calls[4].split("--only ")[1].split() == [
        f"{m}/seed-1/fedit", f"{m}/seed-1/devft", f"{m}/seed-2/fedit",
        f"{m}/seed-2/layerdrop", f"{m}/seed-2/progfed"]
    assert "keep rc=0" in _progress(lane)


def test_mc_zero_skips_scoring(lane):
    assert _run(lane, "0:devft") == 0
    assert not any("--report-only" in c for c in _calls(lane))


def test_a_lane_cut_by_timeout_still_keeps_its_work(lane):
    rc = _run(lane, "1:devft", "1:layerdrop", sleep=60, cut_after=4)
    assert rc == 124  # timeout's own status for a command it cut
    calls = _calls(lane)
    assert len(calls) == 2, calls  # the cut piece, then the keep; no second piece
    assert "--methods devft" in calls[0]
    assert "study_keep.py" in calls[1]
    progress = _progress(lane)
    assert "cut by a signal" in progress and "keep rc=0" in progress
    assert "start 1:layerdrop" not in progress
