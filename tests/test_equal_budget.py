"""benchmarks/equal_budget.py (issue 31) on the tiny model: every run to one FLOPs budget, the
FedIT replicate, and extending a finished run to a larger budget without rerunning it."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import equal_budget  # noqa: E402

from devft.errors import ConfigError  # noqa: E402
from devft.reporting.recorder import read_metrics  # noqa: E402


def _argv(tiny_model_dir, tiny_data_file, out, budget, methods="fedit-replicate,devft"):
    return ["--smoke", "--config", str(ROOT / "configs" / "default.yaml"),
            "--models", str(tiny_model_dir), "--seeds", "0", "--methods", methods,
            "--set", f"data.name={tiny_data_file}", "--set", "stop.max_rounds=400",
            "--budget", str(budget), "--out", str(out)]


def _flops_per_fedit_round(tiny_model_dir, tiny_data_file, tmp_path) -> float:
    equal_budget.main(_argv(tiny_model_dir, tiny_data_file, tmp_path / "probe", 1.0, "fedit"))
    run = tmp_path / "probe" / Path(tiny_model_dir).name / "seed-0" / "fedit"
    return read_metrics(run)[1]["client_flops"]


def test_every_run_trains_to_the_budget_and_a_larger_budget_extends_it(
        tiny_model_dir, tiny_data_file, tmp_path):
    per_round = _flops_per_fedit_round(tiny_model_dir, tiny_data_file, tmp_path)
    budget = 3.5 * per_round
    out = tmp_path / "study"
    equal_budget.main(_argv(tiny_model_dir, tiny_data_file, out, budget))
    seed0 = out / Path(tiny_model_dir).name / "seed-0"
    fedit, replicate = read_metrics(seed0 / "fedit"), read_metrics(seed0 / "fedit-replicate")
    for name in ("fedit", "fedit-replicate", "devft"):
        records = read_metrics(seed0 / name)
        summary = json.loads((seed0 / name / "summary.json").read_text())
        assert summary["stop"]["reason"] == "flops_budget"  # never a target
        assert records[-1]["cum_client_flops"] >= budget > records[-2]["cum_client_flops"]
        assert (seed0 / name / "checkpoints" / "latest.json").is_file()
    # the replicate: FedIT's initial model, other batches
    assert replicate[0]["eval_loss"] == fedit[0]["eval_loss"]
    assert replicate[1]["train_loss"] != fedit[1]["train_loss"]
    config = json.loads((seed0 / "fedit-replicate" / "config.json").read_text())
    assert config["method"] == "fedit" and config["train"]["batch_seed"] == 1000

    # a larger budget extends each finished run: its first rounds are kept, not rerun
    before = {n: read_metrics(seed0 / n) for n in ("fedit", "devft")}
    equal_budget.main(_argv(tiny_model_dir, tiny_data_file, out, 2 * budget))
    for name, old in before.items():
        new = read_metrics(seed0 / name)
        assert len(new) > len(old)
        assert [r["eval_loss"] for r in new[:len(old)]] == [r["eval_loss"] for r in old]
        assert [r["wall_time_s"] for r in new[:len(old)]] == [r["wall_time_s"] for r in old]
        assert new[-1]["cum_client_flops"] >= 2 * budget
        assert list(seed0.glob(f"{name}/extended-*/summary.json"))  # the old summary, kept
    # extended == run afresh to the larger budget
    fresh = tmp_path / "fresh"
    equal_budget.main(_argv(tiny_model_dir, tiny_data_file, fresh, 2 * budget, "fedit"))
    again = read_metrics(fresh / Path(tiny_model_dir).name / "seed-0" / "fedit")
    assert [r["eval_loss"] for r in again] == [r["eval_loss"] for r in read_metrics(
        seed0 / "fedit")]


def test_bad_method_and_missing_budget_are_refused():
    with pytest.raises(ConfigError, match="--methods"):
        equal_budget.method_list("fedit,bogus")
    with pytest.raises(ConfigError, match="--methods"):
        equal_budget.method_list("flora")  # not staged, not FedIT
    assert equal_budget.method_list("devft,fedit-replicate")[0] == "fedit"
    with pytest.raises(ConfigError, match="--budget"):
        equal_budget.budget_for("/models/unknown", 0.0)
    assert equal_budget.budget_for("x/gemma3-270m", 0.0) == equal_budget.BUDGETS["gemma3-270m"]


# ---- the reading rule (equal_budget_report.py) ------------------------------------------
from equal_budget_report import (  # noqa: E402
    crossing,
    interval,
    plateau_round,
    server_flops,
    smooth,
    summarize,
    targets,
)


def _rec(round_, loss, flops_per_round=10.0, stage=0, layers=4):
    return {"round": round_, "eval_loss": loss, "cum_client_flops": flops_per_round * round_,
            "cum_bytes": 2.0 * round_, "stage": stage, "layers_trained": layers}


def test_smoothing_is_a_trailing_mean_so_extending_a_run_never_moves_a_crossing():
    assert smooth([3.0, 1.0, 2.0, 6.0]) == [3.0, 2.0, 2.0, 3.0]
    short = [_rec(i, v) for i, v in enumerate([4.0, 3.0, 2.0, 1.9, 1.8])]
    longer = short + [_rec(5, 3.0), _rec(6, 0.5)]
    assert crossing(short, 2.0, 0)["round"] == crossing(longer, 2.0, 0)["round"] == 4


def test_plateau_round_and_targets_read_the_smoothed_fedit_curve():
    curve = [5.0, 3.0, 2.5, 2.2, 2.1, 2.05, 2.04, 2.03, 2.03, 2.02]
    s = smooth(curve)
    assert plateau_round(s, window=2, rel=0.01, min_round=2) == 9  # (2.04-2.027)/2.04
    assert plateau_round(s, window=2, rel=0.0, min_round=2) is None  # still falling
    fedit = [_rec(i, v) for i, v in enumerate([5.0] * 30)]
    got = targets(fedit)  # flat from the start: plateau at the first allowed round
    assert got["plateau_round"] == 24 and got["targets"]["100%"] == got["plateau_level"]
    assert got["targets"]["50%"] == 5.0


def test_a_crossing_after_the_budget_is_not_within_budget():
    records = [_rec(i, v) for i, v in enumerate([4.0, 3.0, 2.0, 1.0, 1.0, 1.0])]
    assert crossing(records, 2.0, budget=100)["round"] == 3
    late = crossing(records, 1.0, budget=40)  # smoothed 1.0 first at round 5, 50 FLOPs
    assert not late["reached"] and late["why"] == "not within budget"
    assert crossing(records, 0.5, budget=100) == {"round": None, "reached": False,
                                                  "why": "not reached"}


def test_interval_is_a_student_t_interval():
    iv = interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["std"] == 1.0
    assert iv["ci90"][1] - 2.0 == pytest.approx(2.919986 / 3 ** 0.5, rel=1e-5)
    assert interval([1.5])["ci90"] is None and interval([])["mean"] is None


def test_server_flops_count_one_similarity_pass_and_one_fusion_per_early_stage():
    records = [_rec(0, 4.0, stage=0, layers=2), _rec(1, 3.0, stage=0, layers=2),
               _rec(2, 2.0, stage=1, layers=4), _rec(3, 1.0, stage=1, layers=4)]
    forward = 2 * 4 * 100 * 2 * 8 + 4 * 2 * 8 * 8 * 16 * 4
    spectral = server_flops(records, "spectral", 4, 100, (2, 8), 16)
    assert spectral == [forward + 800] * 4  # stage 1 is the full model: nothing to do
    assert server_flops(records, "layerdrop", 4, 100, (2, 8), 16) == [800] * 4


def test_summary_gives_the_noise_floor_and_the_paired_difference_per_seed():
    def seed(s, fedit, rep, m):
        return {"seed": s, "methods": {
            name: {"targets": {"100%": {"reached": True, "flops_vs_fedit": r,
                                        "flops_vs_fedit-replicate": r / rep}}}
            for name, r in (("fedit", fedit), ("fedit-replicate", rep), ("devft", m))}}
    per_seed = [seed(0, 1.0, 1.2, 1.5), seed(1, 1.0, 0.9, 1.2)]
    got = summarize(per_seed, "devft")["100%"]
    assert got["flops_vs_fedit"]["mean"] == pytest.approx(1.35)
    assert got["noise_floor"]["mean"] == pytest.approx(1.05)
    assert got["paired_difference"]["mean"] == pytest.approx(0.3)
    assert got["flops_vs_replicate"]["mean"] == pytest.approx((1.5 / 1.2 + 1.2 / 0.9) / 2)
