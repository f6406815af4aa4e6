"""Issue 12's staged methods, their pure rules and their server-side wiring:
boundary singletons, adaptive stage length, Offsite-tuning's emulator, calibrated fusion."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from test_federation_run import tiny_cfg

from devft.config import load_config
from devft.core.adaptive import adaptive_rounds, should_advance, stage_cap
from devft.core.calibration import fusion_grid, pick_best
from devft.core.frozen import drop_layers, fill_frozen, in_layers, transfer_groups
from devft.core.layerstate import split_by_layer
from devft.core.offsite import emulator_size, kept_middle, offsite_groups
from devft.core.recipes import boundary_groups, check_boundary_stages, stage_groups
from devft.core.staging import method_groups, method_schedule
from devft.errors import ConfigError
from devft.federation.global_model import GlobalModel
from devft.federation.pacing import StagePacer, stage_losses
from devft.federation.runner import prepare
from devft.federation.wire import plan_from_config, plan_to_config
from devft.methods import get_method
from devft.models.submodel import StagePlan
from devft.rules import make_rule

PREFIX = "base_model.model.model.layers."


def _similarity(n, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 6))
    return np.corrcoef(x)


# ---- boundary singletons ----------------------------------------------------------------------
@pytest.mark.parametrize("bottom, top", [(1, 1), (2, 1), (0, 2), (3, 3)])
def test_boundary_layers_are_singletons_in_every_stage(bottom, top):
    sim = _similarity(16)
    for k in range(bottom + top + 1, 17):
        groups = stage_groups("boundary", 16, k, lambda: sim, boundary=(bottom, top))
        assert len(groups) == k and sorted(i for g in groups for i in g) == list(range(16))
        for layer in [*range(bottom), *range(16 - top, 16)]:
            assert [layer] in groups, (k, layer, groups)
        assert groups == sorted(groups, key=lambda g: g[0])


def test_boundary_middle_is_the_inner_grouping_shifted():
    groups = boundary_groups(8, 4, 2, 1, lambda m, k: [list(range(m))[:2], list(range(m))[2:]])
    assert groups == [[0], [1], [2, 3], [4, 5, 6], [7]]


def test_a_stage_too_small_for_the_boundary_is_refused():
    with pytest.raises(ConfigError, match="devft.boundary_layers"):
        check_boundary_stages(30, [2, 8, 15], 1, 1, "devft.boundary_layers")
    check_boundary_stages(30, [3, 8, 15], 1, 1, "devft.boundary_layers")
    with pytest.raises(ValueError):
        boundary_groups(6, 2, 1, 1, lambda m, k: [list(range(m))])


def test_devft_boundary_schedule_and_groups_follow_the_config(tiny_model_dir, tiny_data_file,
                                                              tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft-boundary",
                   "devft.stages=3,4")
    groups, frozen = method_groups(get_method("devft-boundary"), cfg, 4, 3, lambda: _similarity(4))
    assert groups == [[0], [1, 2], [3]] and frozen == ()
    bad = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft-boundary")  # stages 2, 4
    with pytest.raises(ConfigError, match="devft.boundary_layers"):
        prepare(bad)


# ---- adaptive stage length ---------------------------------------------------------------------
def test_should_advance_on_a_scripted_loss_sequence():
    losses = [5.0, 4.0, 3.5, 3.3, 3.29, 3.285, 3.28]
    rule = dict(window=2, threshold=0.1, min_rounds=1, max_rounds=99)
    got = [should_advance(losses[: r + 1], **rule) for r in range(1, len(losses))]
    # r=2: 5.0-3.5 ; r=3: 4.0-3.3 ; r=4: 3.5-3.29=0.21 ; r=5: 3.3-3.285=0.015 < 0.1
    assert got == [False, False, False, False, True, True]
    assert should_advance(losses[:3], window=2, threshold=0.1, min_rounds=1, max_rounds=2)
    assert not should_advance(losses[:6], window=2, threshold=0.1, min_rounds=6, max_rounds=9)
    assert should_advance([5.0, 5.0, math.nan], window=1, threshold=0.0, min_rounds=1,
                          max_rounds=9)  # nothing measurable: no improvement


def test_adaptive_rounds_keep_the_budget_and_give_the_last_stage_the_rest():
    flat = [5.0] * 20
    falling = [5.0 - 0.5 * i for i in range(20)]
    kw = dict(window=1, threshold=0.1, min_rounds=2, max_rounds=0)
    assert adaptive_rounds([flat, flat, flat], 12, **kw) == [2, 2, 8]
    assert adaptive_rounds([falling, flat, flat], 12, **kw) == [8, 2, 2]  # capped by budget
    assert adaptive_rounds([falling, flat], 12, **{**kw, "max_rounds": 3}) == [3, 9]
    assert stage_cap(12, 0, 2, 2, 0) == 8 and stage_cap(12, 4, 1, 2, 3) == 3


def _records(stage, start, after):
    recs = [{"stage": stage, "stage_round": 1, "stage_start": {"start_calib_loss": start},
             "sub_calib_loss": after[0]}]
    return recs + [{"stage": stage, "stage_round": i + 2, "sub_calib_loss": v}
                   for i, v in enumerate(after[1:])]


def test_the_pacer_advances_exactly_when_the_rule_says(tiny_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft-adaptive",
                   "federation.rounds=10", "adaptive.window=2", "adaptive.threshold=0.1")
    schedule = method_schedule(get_method("devft-adaptive"), cfg, 4)
    pacer = StagePacer(cfg, get_method("devft-adaptive"), schedule)
    first, last = schedule
    after = [4.0, 3.5, 3.45, 3.44, 3.43]
    assert pacer.next_rounds(first, 0, 0, []) == 1
    decisions = [pacer.next_rounds(first, r, r, _records(0, 5.0, after[:r]))
                 for r in range(1, 6)]
    # losses 5.0, 4.0, 3.5, 3.45, 3.44: r=2 gains 1.5, r=3 0.55, r=4 3.5 - 3.44 = 0.06 < 0.1
    assert decisions == [1, 1, 1, 0, 0]
    assert stage_losses(_records(0, 5.0, after), 0) == [5.0, *after]
    assert pacer.next_rounds(last, 4, 0, []) == 6  # the last stage gets what is left


def test_adaptive_budget_must_give_each_stage_min_rounds(tiny_model_dir, tiny_data_file,
                                                        tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft-adaptive",
                   "adaptive.min_rounds=3")  # 4 rounds, 2 stages
    with pytest.raises(ConfigError, match="adaptive.min_rounds"):
        method_schedule(get_method("devft-adaptive"), cfg, 4)
    with pytest.raises(ConfigError, match="adaptive.max_rounds"):
        tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft-adaptive",
                 "adaptive.min_rounds=3", "adaptive.max_rounds=2")


# ---- offsite -----------------------------------------------------------------------------------
def test_offsite_groups_keep_real_adapters_around_a_uniform_drop_emulator():
    groups, frozen = offsite_groups(12, 2, 2, 0.5)
    assert groups == [[0], [1], [2], [4], [7], [9], [10], [11]]
    assert frozen == (2, 3, 4, 5)
    assert kept_middle(12, 2, 2, 2) == [2, 9] and emulator_size(8, 0.5) == 4
    assert emulator_size(8, 0.0) == 1 and emulator_size(8, 0.5, count=3) == 3
    with pytest.raises(ConfigError, match="offsite.k_top"):
        offsite_groups(4, 2, 2, 0.5)
    with pytest.raises(ConfigError, match="offsite.k_top"):
        load_config(None, ["offsite.k_bottom=0", "offsite.k_top=0"])
    with pytest.raises(ConfigError, match="offsite.emulator_fraction"):
        load_config(None, ["offsite.emulator_fraction=1.5"])


def test_frozen_layers_are_dropped_filled_with_zero_b_and_never_transferred():
    state = {f"{PREFIX}{n}.q.lora_{p}.weight": torch.full((2, 2), float(n + 1))
             for n in range(3) for p in "AB"}
    assert in_layers(f"{PREFIX}1.q.lora_A.default.weight", (1,), PREFIX)
    assert not in_layers(f"{PREFIX}10.q.lora_A.weight", (1,), PREFIX)
    dropped = drop_layers(state, (1,), PREFIX)
    assert sorted(split_by_layer(dropped, PREFIX)[0]) == [0, 2]
    filled = fill_frozen(dropped, state, (1,), PREFIX)
    assert filled.keys() == state.keys()
    assert torch.equal(filled[f"{PREFIX}1.q.lora_A.weight"], state[f"{PREFIX}1.q.lora_A.weight"])
    assert not filled[f"{PREFIX}1.q.lora_B.weight"].any()
    assert transfer_groups([[0], [1, 2], [3]], (1,)) == [[0], [], [3]]


def test_the_plan_carries_its_frozen_layers_over_the_wire():
    plan = StagePlan(2, ((0,), (4,), (9,)), 0.1, "differential", (1,))
    assert plan_from_config(ConfigRecord(plan_to_config(plan))) == plan
    plain = StagePlan(0, ((0, 1),), 0.1)
    assert "frozen" not in plan_to_config(plain)
    assert plan_from_config(ConfigRecord(plan_to_config(plain))) == plain


@pytest.fixture
def offsite_model(tiny_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "run", "offsite")
    prepare(cfg)
    return GlobalModel(cfg, make_rule(cfg))


def test_offsite_plugs_the_trained_adapter_back_into_the_same_layers_exactly(offsite_model):
    model = offsite_model
    (stage,) = model.schedule()
    plan, sub = model.plan_stage(stage)
    assert plan.groups == ((0,), (1,), (3,)) and plan.frozen == (1,)
    assert sorted(split_by_layer(sub, model.prefix)[0]) == [0, 2]  # the emulator sends none
    before = {k: v.clone() for k, v in model.lora.items()}
    trained = {k: torch.randn_like(v) for k, v in sub.items()}
    model.absorb(plan, trained)
    full, _ = split_by_layer(model.lora, model.prefix)
    mine, _ = split_by_layer(trained, model.prefix)
    for n, layer in ((0, 0), (2, 3)):  # submodel layer -> the real layer it is
        assert full[layer].keys() == mine[n].keys()
        for key, value in mine[n].items():
            assert torch.equal(full[layer][key], value), (layer, key)
    old, _ = split_by_layer(before, model.prefix)
    for layer in (1, 2):  # the emulator's layer and the dropped one keep their LoRA
        assert all(torch.equal(full[layer][k], v) for k, v in old[layer].items())
    assert model.stage_report["frozen_layers"] == [1]
    assert math.isfinite(model.stage_report["start_calib_loss"])
    assert model.stage_report["beta"] is None  # singletons only: nothing fused, no β applied


# ---- calibrated fusion -------------------------------------------------------------------------
def test_pick_best_takes_the_planted_minimum_first_on_ties():
    grid = fusion_grid([0.0, 0.1, 0.2], [0.0, 1.0])
    assert [(p["beta"], p["residual"]) for p in grid] == [
        (0.0, 0.0), (0.0, 1.0), (0.1, 0.0), (0.1, 1.0), (0.2, 0.0), (0.2, 1.0)]
    planted = {(0.0, 0.0): 3.0, (0.0, 1.0): 2.5, (0.1, 0.0): 1.0, (0.1, 1.0): 4.0,
               (0.2, 0.0): 1.0, (0.2, 1.0): math.nan}
    best, tried = pick_best(grid, lambda p: planted[p["beta"], p["residual"]])
    assert best == {"beta": 0.1, "residual": 0.0}
    assert [t["calib_loss"] for t in tried][:5] == [3.0, 2.5, 1.0, 4.0, 1.0]
    only_nan = fusion_grid([0.1, 0.2], [0.0])
    assert pick_best(only_nan, lambda p: math.nan)[0] == {"beta": 0.1, "residual": 0.0}
    with pytest.raises(ValueError):
        pick_best([], lambda p: 0.0)


def test_calibrated_plan_uses_the_beta_of_lowest_calibration_loss(tiny_model_dir,
                                                                  tiny_data_file, tmp_path,
                                                                  monkeypatch):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "run", "devft-calibrated",
                   "calibrate.betas=0.0,0.1,0.3")
    prepare(cfg)
    model = GlobalModel(cfg, make_rule(cfg))
    first, _ = model.schedule()
    plan, _ = model.plan_stage(first)  # the real losses: the chosen one is their minimum
    grid = model.stage_report["calibration_grid"]
    assert plan.beta == min(grid, key=lambda t: t["calib_loss"])["beta"]
    assert model.stage_report["calibrated_beta"] == plan.beta
    assert model.stage_report["calibration_time_s"] >= 0
    calls = []

    def planted(plan, sub_lora):  # the loss the server measures, planted per beta
        calls.append(plan.beta)
        return {0.0: 4.0, 0.1: 3.0, 0.3: 2.0}.get(plan.beta, 9.0)

    monkeypatch.setattr(model, "calib_submodel", planted)
    plan, _ = model.plan_stage(first)
    assert plan.beta == 0.3 and calls[:3] == [0.0, 0.1, 0.3]
    assert plan_from_config(ConfigRecord(plan_to_config(plan))).beta == 0.3  # clients' plan


def test_calibrated_plan_can_pick_a_residual_scale_and_clients_get_it(tiny_model_dir,
                                                                    tiny_data_file, tmp_path,
                                                                    monkeypatch):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "run", "devft-calibrated",
                   "calibrate.betas=0.0,0.1", "calibrate.residual_exponents=0.0,1.0")
    prepare(cfg)
    model = GlobalModel(cfg, make_rule(cfg))
    first, _ = model.schedule()
    seen = []

    def planted(plan, sub_lora):
        seen.append((plan.beta, plan.residual))
        return {(0.1, 1.0): 1.0}.get((plan.beta, plan.residual), 5.0)

    monkeypatch.setattr(model, "calib_submodel", planted)
    plan, _ = model.plan_stage(first)
    assert seen[:4] == [(0.0, 0.0), (0.0, 1.0), (0.1, 0.0), (0.1, 1.0)]
    assert (plan.beta, plan.residual) == (0.1, 1.0)
    report = model.stage_report
    assert report["calibrated_residual"] == 1.0 and report["residual_exponent"] == 1.0
    wired = plan_from_config(ConfigRecord(plan_to_config(plan)))
    assert wired == plan and wired.fusion_key() == (0.1, "differential", 1.0)
