"""Issue 12's methods end to end on a tiny model through the in-process Flower grid."""

import math

import pytest
from safetensors.torch import load_file
from test_federation_run import tiny_cfg

from devft.core.adaptive import should_advance, stage_cap
from devft.core.layerstate import split_by_layer
from devft.federation.pacing import stage_losses
from devft.federation.runner import run_method
from devft.reporting.recorder import read_metrics

PREFIX = "base_model.model.model.layers."
EXTRA = {
    "devft-boundary": ["devft.stages=3,4"],
    "devft+offsite": ["devft.stages=3,4"],
    "devft-adaptive": ["federation.rounds=6", "adaptive.window=1", "adaptive.threshold=0.02"],
    "devft-calibrated": ["calibrate.betas=0.0,0.1,0.5"],
    "offsite": [],
    "offsite+ffa": [],
    "layerdrop": [],
}


@pytest.fixture(scope="module")
def variant_runs(tiny_model_dir, tiny_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    return {m: (run_method(tiny_cfg(tiny_model_dir, tiny_data_file, out / m, m, *extra)),
                out / m) for m, extra in EXTRA.items()}


def _adapter_layers(out):
    return split_by_layer(load_file(out / "adapter" / "adapter_model.safetensors"), PREFIX)[0]


def _b_is_zero(layer):
    return all(not v.any() for k, v in layer.items() if "lora_B" in k)


@pytest.mark.parametrize("method", list(EXTRA))
def test_every_stage_reports_its_submodel_quality_at_start(variant_runs, method):
    summary, out = variant_runs[method]
    records = read_metrics(out)
    assert all(math.isfinite(r["eval_loss"]) for r in records)
    assert sum(s["rounds"] for s in summary["stages"]) == summary["rounds"]
    starts = [r["stage_start"] for r in records if "stage_start" in r]
    assert len(starts) == len(summary["stages"])
    for start, stage in zip(starts, summary["stages"]):
        assert math.isfinite(start["start_calib_loss"]) and start["start_calib_loss"] > 0
        assert stage["start_calib_loss"] == start["start_calib_loss"]
        singletons = all(len(g) == 1 for g in stage["groups"])
        assert (start["beta"] is None) == singletons  # β only where layers are fused


def test_devft_boundary_keeps_first_and_last_layer_alone(variant_runs):
    stages = variant_runs["devft-boundary"][0]["stages"]
    assert stages[0]["groups"] == [[0], [1, 2], [3]]


@pytest.mark.parametrize("method", ["offsite", "offsite+ffa"])
def test_offsite_trains_only_the_real_adapter_layers(variant_runs, method):
    summary, out = variant_runs[method]
    records = read_metrics(out)
    assert [s["groups"] for s in summary["stages"]] == [[[0], [1], [3]]]
    assert summary["stages"][0]["frozen_layers"] == [1]
    assert {r["layers_trained"] for r in records} == {3}
    layers = _adapter_layers(out)
    assert _b_is_zero(layers[1]) and _b_is_zero(layers[2])  # emulator and dropped: untouched
    assert not _b_is_zero(layers[0]) and not _b_is_zero(layers[3])
    assert all(r["sub_eval_loss"] is not None for r in records)


def test_offsite_sends_only_the_adapters(variant_runs):
    offsite = read_metrics(variant_runs["offsite"][1])
    layerdrop = read_metrics(variant_runs["layerdrop"][1])  # stage 0: 2 real layers, all sent
    assert offsite[1]["trainable_params"] == layerdrop[1]["trainable_params"]
    assert 0.95 < offsite[1]["bytes_up"] / layerdrop[1]["bytes_up"] < 1.05


def test_devft_offsite_trains_the_boundary_then_the_full_model(variant_runs):
    summary, out = variant_runs["devft+offsite"]
    stages = summary["stages"]
    assert stages[0]["groups"] == [[0], [1, 2], [3]] and stages[0]["frozen_layers"] == [1]
    assert stages[1]["frozen_layers"] == []
    records = read_metrics(out)
    first, last = records[1], records[-1]
    assert first["trainable_params"] * 2 == last["trainable_params"]  # 2 of 4 layers, then 4
    assert not any(_b_is_zero(layer) for layer in _adapter_layers(out).values())


def test_devft_adaptive_stage_lengths_are_what_the_rule_says(variant_runs):
    summary, out = variant_runs["devft-adaptive"]
    records = read_metrics(out)
    rounds = summary["stages"][0]["rounds"]
    losses = stage_losses(records, 0)
    assert len(losses) == rounds + 1 and all(math.isfinite(v) for v in losses)
    cap = stage_cap(6, 0, 1, 1, 0)
    rule = dict(window=1, threshold=0.02, min_rounds=1, max_rounds=cap)
    assert all(not should_advance(losses[: r + 1], **rule) for r in range(1, rounds))
    assert should_advance(losses, **rule)
    assert summary["stages"][1]["rounds"] == 6 - rounds
    assert [r["stage"] for r in records[1:]] == [0] * rounds + [1] * (6 - rounds)


def test_devft_calibrated_reports_its_choice_and_its_cost(variant_runs):
    summary, out = variant_runs["devft-calibrated"]
    stage = summary["stages"][0]
    grid = stage["calibration_grid"]
    assert [g["beta"] for g in grid] == [0.0, 0.1, 0.5]
    assert stage["calibrated_beta"] == min(grid, key=lambda g: g["calib_loss"])["beta"]
    assert stage["beta"] == stage["calibrated_beta"] and stage["calibration_time_s"] >= 0
    assert "calibrated_beta" not in summary["stages"][1]  # the full model has nothing to fuse
