"""benchmarks/budget_study.py (issue 34) on a tiny model: the whole study, every run to one FLOPs
budget on a partition by task group, its report per task group, and the reading rule."""

import json
import math
import sys
from pathlib import Path

import pytest
from tiny import save_wide_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import budget_study  # noqa: E402
from budget_study_report import at_flops, at_round, curve, gap_closed, group_losses  # noqa: E402

from devft.errors import ConfigError  # noqa: E402
from devft.reporting.recorder import read_metrics  # noqa: E402

SMALL = [4, 5, 6, 7]
RUNS = "fedit-all,exclude,shrink-random,devft-budget,levers"
"""Every kind of run (the other recipes differ only in the layers chosen, which
tests/test_memory_budgets.py checks), to keep the test well under a minute."""


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A 4-layer llama whose layers weigh ~1 MiB each (and their activations ~2 MiB), so
    MiB budgets tell depths apart."""
    return save_wide_model(tmp_path_factory.mktemp("wide-llama"), 128, 512)


def _argv(model_dir, data_file, out, budget, runs=RUNS, *extra):
    return ["--smoke", "--config", str(ROOT / "configs" / "default.yaml"),
            "--models", str(model_dir), "--seeds", "0", "--runs", runs,
            "--set", f"data.name={data_file}", "--set", "train.local_steps=1",
            "--set", "devft.stages=2,4", "--budget", str(budget), "--out", str(out), *extra]


def test_the_whole_study_runs_and_reads_per_task_group(wide_dir, tiny_data_file, tmp_path):
    out = tmp_path / "study"
    budget_study.main(_argv(wide_dir, tiny_data_file, out, 1.0, "fedit-all"))
    seed0 = out / wide_dir.name / "seed-0"
    per_round = read_metrics(seed0 / "fedit-all")[1]["client_flops"]
    budget = 1.5 * per_round  # fedit-all: 2 rounds (extending the first); exclude: 3+
    results = budget_study.main(_argv(wide_dir, tiny_data_file, out, budget))

    runs = {r: read_metrics(seed0 / r) for r in RUNS.split(",")}
    plan = results["models"][wide_dir.name]["plan"]
    assert plan["small_layers"] == 1 and plan["shrunk_depth"] == 1
    assert plan["small_mb"] == plan["small_mb_now"]
    for name, records in runs.items():
        summary = json.loads((seed0 / name / "summary.json").read_text())
        assert summary["stop"]["reason"] == "flops_budget", name
        assert records[-1]["cum_client_flops"] >= budget > records[-2]["cum_client_flops"]
        config = json.loads((seed0 / name / "config.json").read_text())
        assert config["data"]["partition"] == "groups"
        assert config["data"]["client_groups"] == "4x0,4x1"
        assert config["federation"]["num_clients"] == 8
        assert set(records[-1]["eval_loss_by_category"]) == {"color", "geo", "math"}
    assert len(runs["exclude"]) > len(runs["fedit-all"])  # half the FLOPs a round
    for r in runs["exclude"][1:]:
        assert [r["client_depth"][k] for k in SMALL] == [0] * 4
        assert r["clients_sat_out"] == 4 and r["client_levers"][4:] == [""] * 4
    for r in runs["shrink-random"][1:]:
        assert r["client_depth"] == [4] * 4 + [1] * 4 and r["client_levers"][4] == "shrink"
        assert all(p <= plan["small_mb"] for p in r["client_predicted_peak_mb"][4:])
        assert len({tuple(c) for c in r["client_covered_layers"][4:]}) > 1  # drawn per client
    levers = runs["levers"][1:]
    want = ([4] * 4, "quantize+checkpoint") if plan["levers_fit"] else ([0] * 4, "")
    assert all(r["client_depth"][4:] == want[0] for r in levers)
    assert runs["devft-budget"][-1]["client_depth"][4:] == [1] * 4  # its last stage, shrunk

    entry = results["models"][wide_dir.name]["per_seed"][0]
    final = {m: e["readings"]["final"] for m, e in entry["runs"].items()}
    assert all(f["small_tasks"] is not None and f["large_tasks"] is not None
               for f in final.values())
    assert final["exclude"]["large_vs_exclude"] == 0.0
    for f in final.values():  # the gap closed is the study's formula on its readings
        want = gap_closed(final["exclude"]["small_tasks"], final["fedit-all"]["small_tasks"],
                          f["small_tasks"])
        assert f["gap_closed"] == want
    if final["fedit-all"]["gap_closed"] is not None:  # readable: fedit-all MIN_GAP below
        assert final["fedit-all"]["gap_closed"] == 1.0 and final["exclude"]["gap_closed"] == 0
    assert set(final) == set(RUNS.split(","))
    shown = entry["runs"]["exclude"]["curve"]  # raw per-group readings, per round
    assert shown["round"] == [r["round"] for r in runs["exclude"]]
    assert shown["small_tasks"][-1] == runs["exclude"][-1]["eval_loss_by_category"]["math"]
    assert set(entry["runs"]["levers"]["readings"]) == {
        "final", "equal_round", "flops_25%", "flops_50%", "flops_100%"}
    clients = {c["client"]: c for c in entry["runs"]["exclude"]["small_clients"]}
    assert sorted(clients) == SMALL and all(c["sat_out"] == c["rounds"] for c in
                                            clients.values())
    shrunk = entry["runs"]["shrink-random"]["small_clients"]
    assert all(c["depths"] == [1] and c["predicted_within"] for c in shrunk)
    assert entry["runs"]["fedit-all"]["small_clients"] == []
    assert all(Path(p).is_file() for p in results["plots"]) and len(results["plots"]) == 2
    assert (out / "budget_study.md").read_text().count("| shrink-random |") >= 2

    # --report-only reads the same runs into the same numbers, training nothing
    again = budget_study.main(_argv(wide_dir, tiny_data_file, out, budget, RUNS,
                                    "--report-only"))
    assert again["models"] == results["models"]


# ---- the reading rule (budget_study_report.py) ----------------------------------------------
GROUPS = {"a": 0, "b": 0, "c": 1}


def _rec(round_, flops, by):
    return {"round": round_, "cum_client_flops": flops, "eval_loss_by_category": by}


def test_group_loss_is_the_mean_over_the_groups_categories():
    records = [_rec(0, 0, {"a": 2.0, "b": 4.0, "c": 1.0}), _rec(1, 10, None)]
    got = group_losses(records, GROUPS)
    assert got[0][0] == 3.0 and got[1][0] == 1.0
    assert math.isnan(got[0][1]) and math.isnan(got[1][1])


def test_readings_at_equal_flops_and_rounds_are_causal():
    records = [_rec(i, 10 * i, {"a": v, "b": v, "c": 2 * v})
               for i, v in enumerate([4.0, 3.0, 2.0, 1.0])]
    c = curve(records, GROUPS)
    assert c["smoothed"][0] == [4.0, 3.5, 3.0, 2.0]
    assert at_flops(c, 0, 25) == 3.0  # round 2 spent 20, round 3 30: the last within 25
    assert at_flops(c, 1, 30) == 4.0 and at_flops(c, 0, 31) is None  # not spent yet
    assert at_round(c, 0, 2) == 3.0 and at_round(c, 0, 4) is None


def test_gap_closed_is_zero_at_exclude_one_at_fedit_all_and_unread_when_tiny():
    assert gap_closed(3.0, 2.0, 3.0) == 0.0
    assert gap_closed(3.0, 2.0, 2.0) == 1.0
    assert gap_closed(3.0, 2.0, 2.5) == 0.5
    assert gap_closed(3.0, 2.99, 2.5) is None  # fedit-all not MIN_GAP below exclude
    assert gap_closed(None, 2.0, 2.5) is None


def test_run_settings_and_bad_names():
    over = budget_study.run_overrides("exclude", 900)
    assert over["federation.client_memory_mb"] == "4x0,4x900"
    assert over["federation.budget_levers"] == "none"
    assert budget_study.run_overrides("levers", 900)["federation.budget_policy"] == "exclude"
    assert budget_study.run_overrides("devft-budget", 900)["method"] == "devft"
    assert budget_study.run_overrides("shrink-random", 900)["federation.shrink_recipe"] == \
        "random"
    assert "federation.client_memory_mb" not in budget_study.run_overrides("fedit-all", 900)
    assert budget_study.run_list("levers,exclude") == ["exclude", "levers"]
    assert budget_study.parse_args(["--methods", "exclude,levers"]).runs == "exclude,levers"
    with pytest.raises(ConfigError, match="--runs"):
        budget_study.run_list("shrink-bogus")
    with pytest.raises(ConfigError, match="--budget"):
        budget_study.budget_for("/models/unknown", 0.0)
    assert budget_study.budget_for("x/smollm2-135m-instruct", 0.0) == 2.5e14
