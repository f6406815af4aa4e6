"""Issue 13: FedAvg weights n_k / Σn with a bounded share; open-ended last stage (stop.*)."""

import math

import pytest
import torch
from test_federation_run import tiny_cfg
from test_federation_strategy import GLOBAL, _reply, _strategy

from devft.config import load_config
from devft.core.aggregation import bounded_shares
from devft.core.stopping import plateau_reason, stop_reason, target_reason
from devft.data import federated_data
from devft.errors import ConfigError
from devft.federation.runner import run_method
from devft.reporting.recorder import read_metrics

UPDATE = {"lora_A": torch.zeros(1, 2), "lora_B": torch.ones(2, 1)}


# ---- FedAvg weights ---------------------------------------------------------------------------
def test_bounded_shares_clip_and_spread_the_excess():
    assert bounded_shares([10, 20, 30, 40], 1.0) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert bounded_shares([1e9, 1, 1, 1], 0.5) == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert bounded_shares([1000, 100, 1, 1], 0.4) == pytest.approx([0.4, 0.4, 0.1, 0.1])
    assert bounded_shares([5, 1], 0.3) == [0.5, 0.5]  # 2 · 0.3 < 1: uniform


def test_strategy_weights_are_partition_sizes_and_a_huge_claim_is_bounded():
    s = _strategy("federation.max_client_share=0.5")
    replies = [_reply(UPDATE, n, node=node) for n, node in ((10, 1), (30, 2), (1e9, 9))]
    s.aggregate_train(1, replies)
    assert s.last_train["client_shares"] == pytest.approx([0.125, 0.375, 0.5])  # 10:30 kept
    s = _strategy("federation.max_client_share=1")
    s.aggregate_train(1, [_reply(UPDATE, n, node=node) for n, node in ((10, 1), (30, 2))])
    assert s.last_train["client_shares"] == pytest.approx([0.25, 0.75])


def test_a_claim_above_the_largest_known_partition_is_rejected():
    cfg = load_config(None, ["federation.num_clients=3"])
    from devft.federation.strategy import StagedStrategy
    from devft.models.submodel import StagePlan
    from devft.rules import make_rule

    rule = make_rule(cfg)
    s = StagedStrategy(cfg, rule, lambda: None, None, partition_sizes=[5, 7, 40])
    plan = StagePlan(1, ((0, 1), (2,)), 0.1)
    rule.start_stage(GLOBAL, plan)
    s.begin_stage(plan, 0)
    s.slots = _strategy().slots
    s.aggregate_train(1, [_reply(UPDATE, 40, node=1), _reply(UPDATE, 41, node=2)])
    assert s.last_train["clients_ok"] == 1 and s.last_train["clients_rejected"] == 1
    assert "exceeds the largest client partition (40" in s.last_train["rejections"][0]


def test_unequal_partitions_give_weights_n_k_over_the_total(tiny_model_dir, tiny_data_file,
                                                            tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "run", "fedit",
                   "federation.num_clients=3", "federation.rounds=1", "data.partition=dirichlet",
                   "data.dirichlet_alpha=0.3", "federation.max_client_share=1")
    sizes = [len(p) for p in federated_data(cfg.data, 3, cfg.seed).partitions]
    assert len(set(sizes)) > 1, sizes  # the test needs unequal partitions
    run_method(cfg)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["client_shares"] == pytest.approx([n / sum(sizes) for n in sizes], abs=1e-6)
    assert record["examples_processed"] == 3 * 2 * 2  # clients × steps × batch: accounting


# ---- stopping rules ----------------------------------------------------------------------------
def test_plateau_needs_min_rounds_and_a_small_relative_gain():
    kw = {"window": 2, "rel_improvement": 0.01, "min_rounds": 3, "max_rounds": 6}
    assert plateau_reason([2.0, 2.0, 2.0], **kw) is None  # 2 rounds < min_rounds
    assert plateau_reason([2.0, 1.5, 1.2, 1.0], **kw) is None  # still falling 17 %
    assert plateau_reason([2.0, 1.5, 1.0, 0.999, 0.995], **kw) == "plateau"  # 0.5 % over 2
    assert plateau_reason([2.0, 1.0, math.nan, math.nan], **kw) == "plateau"  # nan: no gain
    assert plateau_reason([9, 8, 7, 6, 5, 4, 3], **kw) == "max_rounds"


def test_target_stops_at_the_loss_the_budget_or_the_cap():
    assert target_reason(1.0, 5, 3, target_loss=1.0, flops_budget=10, max_rounds=9) == \
        "target_loss"
    assert target_reason(1.1, 10, 3, target_loss=1.0, flops_budget=10, max_rounds=9) == \
        "flops_budget"
    assert target_reason(1.1, 9, 3, target_loss=1.0, flops_budget=0, max_rounds=9) is None
    assert target_reason(math.nan, 9, 9, target_loss=1.0, flops_budget=0, max_rounds=9) == \
        "max_rounds"


def test_the_last_stage_runs_at_least_one_round():
    cfg = load_config(None, ["stop.rule=target", "stop.target_loss=5"]).stop
    assert stop_reason(cfg, [1.0, 1.0], 0, stage_rounds=0) is None
    assert stop_reason(cfg, [1.0, 1.0], 0, stage_rounds=1) == "target_loss"


@pytest.mark.parametrize("override, field", [
    (["stop.rule=target"], "stop.rule"), (["stop.window=0"], "stop.window"),
    (["stop.rel_improvement=1.5"], "stop.rel_improvement"),
    (["stop.min_rounds=10", "stop.max_rounds=5"], "stop.max_rounds"),
    (["stop.flops_budget=-1"], "stop.flops_budget"), (["stop.rule=forever"], "stop.rule"),
    (["federation.max_client_share=0"], "federation.max_client_share"),
])
def test_bad_stop_values_are_one_line_config_errors(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    assert info.value.field == field and "\n" not in str(info.value)


def test_fedit_runs_until_plateau_and_says_why(tiny_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "f", "fedit", "stop.rule=plateau",
                   "stop.min_rounds=2", "stop.max_rounds=5", "stop.window=1",
                   "stop.rel_improvement=0.9")  # 90 %: no round improves that much
    summary = run_method(cfg)
    assert summary["rounds"] == 2 and summary["stop"]["reason"] == "plateau"
    assert summary["stages"][0]["rounds"] == 2


def test_staged_last_stage_runs_until_the_flops_budget(tiny_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "d", "devft",
                   "devft.rounds_per_stage=2", "stop.rule=target", "stop.min_rounds=1",
                   "stop.max_rounds=8", "stop.target_loss=0.001")
    first = run_method(cfg)  # target never reached: the cap ends it
    assert first["stop"]["reason"] == "max_rounds" and first["rounds"] == 8
    records = read_metrics(tmp_path / "d")
    budget = records[5]["cum_client_flops"]  # stage 1 (full) starts at round 3
    cfg = cfg.replace(**{"output.dir": str(tmp_path / "b"), "stop.flops_budget": budget})
    summary = run_method(cfg)
    assert summary["stop"]["reason"] == "flops_budget" and summary["rounds"] == 5
    assert [s["rounds"] for s in summary["stages"]] == [2, 3]
