"""benchmarks/quantized_quality.py (issue 33) on planted curves: nf4 and fp32 runs of the same
config read round by round up to one client-FLOPs budget."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quantized_quality as qq  # noqa: E402

from devft.config import RunConfig  # noqa: E402

PER_ROUND = 1e12


def _run(path: Path, losses: list[float], quantization: str, finished: bool = True,
         **changes: object) -> None:
    path.mkdir(parents=True)
    config = RunConfig().to_dict()
    config["model"]["quantization"] = quantization
    config["stop"]["flops_budget"] = 9.0 if quantization == "nf4" else 13.0  # may differ
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    (path / "config.json").write_text(json.dumps(config))
    rows = [{"round": r, "eval_loss": loss, "cum_client_flops": r * PER_ROUND}
            for r, loss in enumerate(losses)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (path / "summary.json").write_text("{}")


def test_gaps_are_read_at_the_last_round_both_reached_within_the_budget(tmp_path):
    fp32 = [5.0, 3.0, 2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2]  # fp32 trains on past the budget
    nf4 = [5.8, 3.2, 2.1, 1.9, 1.7, 1.6, 1.5]  # nf4 stops at it (round 6: 6e12)
    _run(tmp_path / "fp32" / "m" / "seed-0" / "fedit", fp32, "none")
    _run(tmp_path / "nf4" / "m" / "seed-0" / "fedit", nf4, "nf4")
    results = qq.main(["--fp32", str(tmp_path / "fp32"), "--nf4", str(tmp_path / "nf4"),
                       "--model", "m", "--seeds", "0", "--methods", "fedit,devft",
                       "--budget", str(6.5 * PER_ROUND)])
    (pair,) = results["pairs"]  # devft has no runs: no pair
    assert pair["rounds"] == 6 and pair["status"] == "finished"
    assert pair["round0_gap"] == pytest.approx(0.8)
    assert pair["final_fp32"] == pytest.approx((1.6 + 1.5 + 1.4) / 3)  # rounds 4-6 only
    assert pair["final_gap"] == pytest.approx(0.1) and pair["raw_gap"] == pytest.approx(0.1)
    assert not pair["within_target"] and pair["configs_differ_in"] == []
    assert pair["gap_by_round"][1] == pytest.approx(0.2)
    assert (tmp_path / "nf4" / "quantized_quality.png").is_file()
    assert "| fedit | 0 | finished | 6 |" in (tmp_path / "nf4" / "quantized_quality.md").read_text()


def test_a_live_run_is_read_so_far_and_a_config_that_differs_is_named(tmp_path):
    _run(tmp_path / "fp32" / "m" / "seed-1" / "devft", [5.0, 3.0, 2.0, 1.8, 1.6], "none")
    _run(tmp_path / "nf4" / "m" / "seed-1" / "devft", [5.7, 3.0, 2.03], "nf4", finished=False,
         train__lr=1e-3)
    results = qq.main(["--fp32", str(tmp_path / "fp32"), "--nf4", str(tmp_path / "nf4"),
                       "--model", "m", "--seeds", "1", "--methods", "devft",
                       "--out", str(tmp_path / "out")])
    (pair,) = results["pairs"]
    assert pair["status"] == "running" and pair["rounds"] == 2
    assert pair["final_gap"] == pytest.approx(0.03 / 3 + (3.0 - 3.0) / 3 + 0.7 / 3)
    assert pair["configs_differ_in"] == ["train.lr"]
    assert "Configs differ beyond the base's precision: devft seed 1: train.lr" in (
        tmp_path / "out" / "quantized_quality.md").read_text()


def test_a_neutral_key_older_code_did_not_save_counts_as_its_default():
    new = RunConfig().to_dict()
    old = json.loads(json.dumps(new))
    del old["federation"]["client_memory_mb"]
    assert qq.configs_differ(old, new) == []
    old["federation"]["num_clients"] = 9
    assert qq.configs_differ(old, new) == ["federation.num_clients"]


def _adapter(run: Path, payload: bytes) -> None:
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(payload)


def test_a_finished_pairs_gap_splits_into_base_and_training_and_losses_are_cached(tmp_path):
    fp32_run, nf4_run = (tmp_path / base / "m" / "seed-0" / "fedit" for base in ("fp32", "nf4"))
    _run(fp32_run, [5.0, 3.0, 2.0, 1.8, 1.6], "none")
    _run(nf4_run, [5.8, 3.2, 2.1, 1.95], "nf4")
    _adapter(fp32_run, b"fp32 adapter")
    _adapter(nf4_run, b"nf4 adapter")
    planted = {("nf4", "nf4"): 1.95, ("nf4", "none"): 1.85, ("fp32", "none"): 1.6,
               ("fp32", "nf4"): 1.75}
    calls = []

    def loss(adapter: Path, base: str) -> float:
        calls.append((adapter.parent.parents[2].name, base))
        return planted[(adapter.parent.parents[2].name, base)]

    runs = (fp32_run, nf4_run)
    records = tuple(qq.read_metrics(r) for r in runs)
    cache: dict[str, float] = {}
    unread = qq.cross_base(runs, records, cache, compute=False, loss=loss)
    assert unread["nf4_adapter_on_fp32"] is None and "gap_from_base" not in unread
    assert calls == []
    split = qq.cross_base(runs, records, cache, compute=True, loss=loss)
    assert split["round"] == 3 and split["fp32_run_at_round"] == pytest.approx(1.8)
    assert split["gap_from_base"] == pytest.approx(0.10)  # 1.95 - 1.85
    assert split["gap_from_training"] == pytest.approx(0.05)  # 1.85 - 1.8
    assert split["nf4_eval_minus_run"] == pytest.approx(0.0)  # planted as the runs' last
    assert split["fp32_eval_minus_run"] == pytest.approx(0.0)
    assert split["fp32_adapter_round"] == 4 and split["fp32_adapter_on_nf4"] == pytest.approx(1.75)
    assert len(calls) == 4
    again = qq.cross_base(runs, records, cache, compute=True, loss=loss)
    assert again == split and len(calls) == 4  # every loss came from the cache
    (fp32_run / "adapter" / "adapter_model.safetensors").write_bytes(b"retrained")
    stale = qq.cross_base(runs, records, cache, compute=False, loss=loss)
    assert stale["fp32_adapter_on_nf4"] is None and stale["nf4_adapter_on_nf4"] == 1.95
    qq.cross_base(runs, records, cache, compute=True, loss=loss)
    assert sorted(calls[4:]) == [("fp32", "nf4"), ("fp32", "none")]  # a new adapter is re-read
    for run in runs:  # a clean checkout keeps no weights: the cached losses stand
        (run / "adapter" / "adapter_model.safetensors").unlink()
    kept = qq.cross_base(runs, records, json.loads(json.dumps(cache)), compute=True, loss=loss)
    assert kept["gap_from_training"] == pytest.approx(0.05) and len(calls) == 6


def test_an_unfinished_nf4_run_has_no_split(tmp_path):
    runs = (tmp_path / "fp32", tmp_path / "nf4")
    _run(runs[0], [5.0, 3.0], "none")
    _run(runs[1], [5.8, 3.2], "nf4", finished=False)
    records = tuple(qq.read_metrics(r) for r in runs)
    assert qq.cross_base(runs, records, {}, compute=True, loss=lambda *_: 0.0) is None
