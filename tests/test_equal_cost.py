"""benchmarks/equal_cost.py (issue 13) end to end on the tiny model, and its report functions."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import equal_cost  # noqa: E402
from equal_cost_report import (  # noqa: E402
    _fuses,
    cost_ratios,
    early_stages,
    reads_early_stages,
    stage_breakdown,
    summarize,
)

from devft.errors import ConfigError  # noqa: E402


def _rec(round_, stage, loss, flops, bytes_=10):
    return {"round": round_, "stage": stage, "eval_loss": loss, "client_flops": flops,
            "bytes_up": bytes_, "bytes_down": bytes_, "cum_client_flops": flops * round_,
            "cum_bytes": 2 * bytes_ * round_, "wall_time_s": float(round_)}


FEDIT = [_rec(i, 0, loss, 10) for i, loss in enumerate([4.0, 3.0, 2.5, 2.0])]
STAGED = [_rec(0, 0, 4.0, 5), _rec(1, 0, 3.9, 5), _rec(2, 0, 3.8, 5), _rec(3, 1, 2.9, 5),
          _rec(4, 1, 2.2, 5)]


def test_cost_ratios_at_each_share_of_fedits_improvement():
    ratios = cost_ratios(STAGED, FEDIT)
    assert ratios["50%"]["target_loss"] == 3.0
    assert ratios["50%"]["cost"]["round"] == 3 and ratios["50%"]["flops_ratio"] == 15 / 10
    assert ratios["90%"]["target_loss"] == pytest.approx(2.2)
    assert ratios["90%"]["time_ratio"] == 4 / 3
    assert ratios["100%"]["flops_ratio"] == "not reached"


def test_stage_breakdown_and_early_stage_comparison():
    stages = stage_breakdown(STAGED)
    assert [(s["rounds"], s["flops"], s["bytes"], s["loss_reached"]) for s in stages] == \
        [(2, 10, 40, 3.8), (2, 10, 40, 2.2)]
    control = [_rec(0, 0, 4.0, 5), _rec(1, 0, 4.0, 5), _rec(2, 1, 3.5, 5)]
    early = early_stages(STAGED, FEDIT, control)
    assert early["last_stage_start_loss"] == 3.8 and early["early_flops"] == 10
    assert early["fedit_flops_to_same_loss"] == 10 and early["early_flops_ratio"] == 1.0
    after = early["after_k_last_stage_rounds"]
    assert after[1] == {"loss": 2.9, "fedit": 3.0, "control": 3.5}
    assert after[4]["loss"] is None


def test_early_stage_numbers_only_for_runs_with_early_stages_in_their_last_stage():
    """An unfinished run still in an early stage has no last stage to read, a one-stage run
    (offsite) no early stages; summarize spreads the early-stage numbers over the seeds that
    have them."""
    early_only = [dict(r, layers_trained=4) for r in STAGED[:3]]
    assert not reads_early_stages([*early_only, dict(STAGED[3], layers_trained=8)], 30,
                                  finished=False)  # cut off in its second, 8-layer stage
    two_stages = [*early_only, dict(STAGED[3], layers_trained=30)]
    assert reads_early_stages(two_stages, 30, finished=False)
    assert reads_early_stages(two_stages, 30, finished=True)
    assert not reads_early_stages(early_only, 30, finished=True)  # one stage: none early
    entry = {"final_eval_loss": 2.2, "rounds": 4, "total_client_flops": 20, "total_bytes": 80,
             "stop": {"reason": "target"}, "ratios": cost_ratios(STAGED, FEDIT)}
    with_early = dict(entry, early=early_stages(STAGED, FEDIT, None))
    cut = dict(entry, stop={"reason": "unfinished"})
    out = summarize([{"methods": {"devft": cut}}, {"methods": {"devft": with_early}}], "devft")
    assert out["seeds"] == 2 and out["last_stage_start_loss"]["mean"] == 3.8
    assert (out["last_stage_start_loss"]["reached"], out["last_stage_start_loss"]["of"]) == (1, 1)
    assert "early_flops_ratio" not in summarize([{"methods": {"devft": cut}}], "devft")


def test_stage_breakdown_carries_what_explains_each_stage():
    """Submodel calibration loss at the stage's start (the record opening it), its held-out
    loss at the end, the peak client memory over the stage and the fusion plan used."""
    records = [dict(_rec(0, 0, 4.0, 0), stage_start={"start_calib_loss": 20.0, "beta": 0.1,
                                                     "residual_exponent": 0.0}),
               dict(_rec(1, 0, 3.9, 5), sub_eval_loss=15.0, client_peak_mem_bytes=7),
               dict(_rec(2, 0, 3.8, 5), sub_eval_loss=12.0, client_peak_mem_bytes=9),
               dict(_rec(3, 1, 2.9, 5), client_peak_mem_bytes=30, sub_eval_loss=None,
                    stage_start={"start_calib_loss": 5.0, "beta": 0.3, "residual_exponent": 1.0,
                                 "calibration_time_s": 4.5})]
    first, last = stage_breakdown(records)
    assert (first["sub_start_calib_loss"], first["sub_end_eval_loss"]) == (20.0, 12.0)
    assert first["peak_client_mem_bytes"] == 9 and first["beta"] == 0.1
    assert first["calibration_time_s"] is None and first["rounds"] == 2
    assert (last["beta"], last["residual_exponent"], last["calibration_time_s"]) == (0.3, 1.0, 4.5)
    assert last["sub_end_eval_loss"] is None and last["peak_client_mem_bytes"] == 30
    assert [_fuses(m) for m in ("devft", "devft-calibrated", "progfed", "offsite", "fedit")] == \
        [True, True, False, False, False]  # only fusing methods get a β column


def test_methods_must_be_staged():
    with pytest.raises(ConfigError):
        equal_cost.method_list("devft,flora")
    assert equal_cost.method_list("fedit,devft") == ["devft"]


def test_smoke_study_runs_end_to_end_and_reuses_its_runs(tiny_model_dir, tiny_data_file,
                                                         tmp_path):
    argv = ["--smoke", "--config", str(ROOT / "configs" / "default.yaml"),
            "--models", str(tiny_model_dir), "--seeds", "0,1",
            "--methods", "devft,progfed,devft-notransfer", "--set", f"data.name={tiny_data_file}",
            "--out", str(tmp_path)]
    results = equal_cost.main(argv)
    model = results["models"][Path(tiny_model_dir).name]
    assert len(model["per_seed"]) == 2
    for entry in model["per_seed"]:
        fedit = entry["methods"]["fedit"]
        assert fedit["stop"]["reason"] in ("plateau", "max_rounds") and 2 <= fedit["rounds"] <= 4
        assert entry["target_eval_loss"] == fedit["final_eval_loss"]
        assert fedit["ratios"]["100%"]["flops_ratio"] == 1.0
        for m in ("devft", "progfed", "devft-notransfer"):
            e = entry["methods"][m]
            assert e["stop"]["reason"] in ("target_loss", "flops_budget")
            if e["stop"]["reason"] == "flops_budget":
                assert e["total_client_flops"] >= entry["flops_budget"]
            assert [s["rounds"] for s in e["stages"]][:-1] == [1, 1]  # early stages as set
            assert "last_stage_start_loss" in e["early"]
            assert e["hosts"][0]["cpu_capability"]  # which CPU kernels ran it
    assert "CPU kernels: " in (tmp_path / "equal_cost.md").read_text()
    summary = model["summary"]["devft"]
    assert summary["seeds"] == 2 and summary["final_eval_loss"]["std"] is not None
    for axis in ("flops", "bytes", "time", "by_seed"):
        assert (tmp_path / f"equal_cost_{axis}.png").stat().st_size > 0
    assert json.loads((tmp_path / "equal_cost.json").read_text())["methods"][0] == "fedit"
    stamp = (tmp_path / Path(tiny_model_dir).name / "seed-0" / "devft" / "summary.json"
             ).stat().st_mtime_ns
    equal_cost.main(argv)  # finished runs are reused, not rerun
    assert (tmp_path / Path(tiny_model_dir).name / "seed-0" / "devft" / "summary.json"
            ).stat().st_mtime_ns == stamp
    full = json.loads((tmp_path / "equal_cost.json").read_text())
    _report_only_reads_saved_runs_and_marks_unfinished(argv, tmp_path, tiny_model_dir)
    _report_only_scores_mc_of_adapters_on_disk(argv, tmp_path, tiny_model_dir)
    _a_ledger_stands_in_for_lost_runs(argv, tmp_path, tiny_model_dir, full)


def _report_only_reads_saved_runs_and_marks_unfinished(argv, tmp_path, tiny_model_dir):
    """--report-only runs nothing: the same numbers from the saved runs; a run whose summary
    is gone (cut off) is reported from its rounds so far, marked unfinished."""
    seed0 = tmp_path / Path(tiny_model_dir).name / "seed-0"
    full = json.loads((tmp_path / "equal_cost.json").read_text())
    (seed0 / "progfed" / "summary.json").unlink()
    (seed0 / "devft-notransfer" / "config.json").unlink()  # no run of this config: left out
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")}
    report = equal_cost.main([*argv, "--report-only"])
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")} == stamps
    model, before = (r["models"][Path(tiny_model_dir).name] for r in (report, full))
    entry = model["per_seed"][0]
    assert entry["target_final"] and set(entry["methods"]) == {"fedit", "devft", "progfed"}
    same = {k: v for k, v in entry["methods"]["devft"].items() if k != "early"}
    assert same == {k: v for k, v in before["per_seed"][0]["methods"]["devft"].items()
                    if k != "early"}
    assert entry["methods"]["devft"]["early"]["after_k_last_stage_rounds"][1]["control"] is None
    cut = entry["methods"]["progfed"]
    assert cut["stop"] == {"reason": "unfinished"}
    assert cut["final_eval_loss"] == before["per_seed"][0]["methods"]["progfed"]["final_eval_loss"]
    assert model["summary"]["devft-notransfer"]["seeds"] == 1
    table = (tmp_path / "equal_cost.md").read_text()
    assert "| progfed* | 2 |" in table and "| devft | 2 |" in table
    assert "| devft-notransfer | 1 |" in table


def _report_only_scores_mc_of_adapters_on_disk(argv, tmp_path, tiny_model_dir):
    """--report-only --mc-limit trains nothing but scores finished runs' adapters, once
    (cached in mc_eval.json); a run whose adapter weights are gone is skipped."""
    seeds = tmp_path / Path(tiny_model_dir).name
    (seeds / "seed-0" / "devft" / "adapter" / "adapter_model.safetensors").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")}
    mc_argv = [*argv, "--report-only", "--mc-limit", "2", "--mc-methods", "fedit,devft"]
    report = equal_cost.main(mc_argv)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.jsonl")} == stamps
    seed0, seed1 = report["models"][Path(tiny_model_dir).name]["per_seed"]
    assert set(seed0["mc"]) == {"fedit"} and set(seed1["mc"]) == {"fedit", "devft"}
    assert 0.0 <= seed1["mc"]["devft"]["acc"] <= 1.0
    cached = seeds / "seed-1" / "devft" / "mc_eval.json"
    stamp = cached.stat().st_mtime_ns
    assert equal_cost.main(mc_argv)["models"][Path(tiny_model_dir).name]["per_seed"][1][
        "mc"] == seed1["mc"] and cached.stat().st_mtime_ns == stamp


def _a_ledger_stands_in_for_lost_runs(argv, tmp_path, tiny_model_dir, full):
    """With a frozen report as --ledger: a seed whose runs are all gone comes whole from it,
    a lost run beside FedIT's records (same target) too; runs on disk win."""
    name = Path(tiny_model_dir).name
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps(full))
    shutil.rmtree(tmp_path / name / "seed-1")
    shutil.rmtree(tmp_path / name / "seed-0" / "devft")
    score = tmp_path / name / "seed-1" / "devft" / "mc_eval.json"  # a rerun's score of a
    score.parent.mkdir(parents=True)  # ledger run, kept without the rerun's records
    score.write_text((tmp_path / name / "seed-0" / "fedit" / "mc_eval.json").read_text())
    report = equal_cost.main([*argv, "--report-only", "--ledger", str(ledger)])
    seed0, seed1 = report["models"][name]["per_seed"]
    before0, before1 = full["models"][name]["per_seed"]
    assert seed1["ledger"]["whole_seed"] and seed1["methods"]["devft"]["source"] == "ledger"
    assert seed1["methods"]["devft"]["ratios"] == before1["methods"]["devft"]["ratios"]
    assert seed1["mc"] == {"devft": json.loads(score.read_text())}
    # devft's folder is gone, the control's config too (the step before): both from the ledger
    assert seed0["ledger"]["methods"] == ["devft", "devft-notransfer"]
    assert seed0["ledger"]["fedit_check"]["same_target"]
    assert seed0["methods"]["devft"]["final_eval_loss"] == before0["methods"]["devft"][
        "final_eval_loss"]
    assert seed0["methods"]["progfed"]["stop"] == {"reason": "unfinished"}  # records win
    assert "‡" in (tmp_path / "equal_cost.md").read_text()


def test_a_missing_ledger_file_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--ledger"):
        equal_cost.main(["--report-only", "--smoke", "--models", str(tiny_model_dir),
                         "--seeds", "0", "--methods", "devft", "--out", str(tmp_path),
                         "--ledger", str(tmp_path / "absent.json")])


def test_report_only_without_runs_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--out"):
        equal_cost.main(["--report-only", "--smoke", "--models", str(tiny_model_dir),
                         "--seeds", "0", "--methods", "devft", "--out", str(tmp_path)])


def test_mc_table_gives_each_group_its_standard_error():
    from equal_cost_report import _mc_lines

    mc = {"fedit": {"acc": 0.5, "groups": {"trained_heldout": {"acc": 0.64, "n": 100},
                                           "unseen": {"acc": 0.25, "n": 300}}}}
    lines = _mc_lines([{"seed": 2, "mc": mc}, {"seed": 3, "mc": {}}])
    assert "| fedit | 2 | 0.500 | 0.640 ± 0.048 (n 100) | 0.250 ± 0.025 (n 300) |" in lines
    assert _mc_lines([{"seed": 0}]) == []


def test_host_lines_group_runs_by_their_cpu_kernels():
    from equal_cost_report import _host_lines

    avx2, avx512 = {"cpu_capability": "AVX2"}, {"cpu_capability": "AVX512"}
    seed = {"seed": 1, "methods": {"fedit": {"hosts": None}, "devft": {"hosts": [avx2]},
                                   "layerdrop": {"hosts": [avx2]},
                                   "progfed": {"hosts": [avx512, avx2]}}}
    assert _host_lines([seed]) == ["- seed 1, CPU kernels: not recorded (fedit); AVX2 (devft, "
                                   "layerdrop); AVX512+AVX2 (progfed)", ""]
    assert _host_lines([{"seed": 0, "methods": {"fedit": {}}}]) == []


def test_the_100_percent_target_is_fedits_final_loss_not_one_ulp_below():
    from equal_cost_report import target_losses

    start, end = 4.688843703050097, 1.7579544029403025  # start - (start - end) < end
    assert start - 1.0 * (start - end) < end
    fedit = [_rec(0, 0, start, 10), _rec(1, 0, end, 10)]
    assert target_losses(fedit)["100%"] == end
    assert cost_ratios(fedit, fedit)["100%"]["flops_ratio"] == 1.0
