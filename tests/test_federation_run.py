"""End to end on a tiny model through the in-process Flower grid: metrics, bytes, adapter."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from devft.config import load_config
from devft.federation.runner import run_method
from devft.reporting.recorder import read_metrics

ROUNDS, CLIENTS = 4, 2


def tiny_cfg(model_dir, data_file, out, method, *extra):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.name={data_file}",
            f"method={method}",
            f"federation.num_clients={CLIENTS}",
            f"federation.rounds={ROUNDS}",
            "devft.stages=2,4",
            "train.local_steps=2",
            "train.batch_size=2",
            "train.lr=0.01",
            "data.eval_examples=6",
            "data.max_seq_len=64",
            "output.progress=false",
            f"output.dir={out}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {
        m: (run_method(tiny_cfg(tiny_model_dir, tiny_data_file, out / m, m)), out / m)
        for m in ("devft", "fedit")
    }


@pytest.mark.parametrize("method", ["devft", "fedit"])
def test_every_round_is_recorded_with_its_measurements(runs, method):
    summary, out = runs[method]
    records = read_metrics(out)
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    for prev, r in zip(records, records[1:]):
        assert r["clients_ok"] == CLIENTS and r["clients_failed"] == 0
        for key in ("train_loss", "eval_loss", "client_flops", "client_peak_mem_bytes"):
            assert r[key] > 0, key
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["cum_bytes"] == prev["cum_bytes"] + r["bytes_up"] + r["bytes_down"]
        assert r["wall_time_s"] >= prev["wall_time_s"]
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in records)
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert (out / "loss.png").stat().st_size > 1000


def test_devft_trains_growing_submodels_and_fedit_the_full_model(runs):
    devft = read_metrics(runs["devft"][1])
    assert [r["layers_trained"] for r in devft[1:]] == [2, 2, 4, 4]
    assert [r["stage"] for r in devft[1:]] == [0, 0, 1, 1]
    assert all(r["sub_eval_loss"] is not None for r in devft[:3])
    assert all(r["sub_eval_loss"] is None for r in devft[3:])  # last stage is the full model
    stages = runs["devft"][0]["stages"]
    assert [s["num_layers"] for s in stages] == [2, 4]
    assert sorted(i for g in stages[0]["groups"] for i in g) == [0, 1, 2, 3]
    fedit = read_metrics(runs["fedit"][1])
    assert {r["layers_trained"] for r in fedit} == {4}
    # half-depth stages send half the LoRA up: fewer bytes than the full model's rounds
    assert devft[1]["bytes_up"] < 0.6 * fedit[1]["bytes_up"]


def test_uplink_bytes_match_the_lora_tensors_sent(runs):
    for method in ("devft", "fedit"):
        for r in read_metrics(runs[method][1])[1:]:
            payload = CLIENTS * r["trainable_params"] * 4  # float32 on the wire
            tensors = r["layers_trained"] * 7 * 2  # 7 adapted projections, A and B
            overhead = CLIENTS * (tensors * 600 + 3000)  # per-object headers and ids
            assert payload <= r["bytes_up"] <= payload + overhead, (method, r["round"])


def test_exported_adapter_loads_with_peft_and_matches_the_global_lora(runs, tiny_model_dir):
    out = runs["fedit"][1]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in saved.items())
    ids = torch.randint(0, 250, (1, 12))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"


def test_runs_are_deterministic(tiny_model_dir, tiny_data_file, tmp_path, runs):
    again = run_method(tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "again", "devft"))
    assert again["final_eval_loss"] == runs["devft"][0]["final_eval_loss"]
    a = load_file(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs["devft"][1] / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_boundaries_log_adapter_norms_and_the_fresh_first_stage(runs):
    records = read_metrics(runs["devft"][1])
    starts = [r for r in records if "stage_start" in r]
    assert [r["stage"] for r in starts] == [0, 1]  # one report at each stage boundary
    first = starts[0]["stage_start"]
    assert first["fresh_init_groups"] == [0, 1]  # stages 2,4 of 4 layers: both groups fused
    assert first["clamped_groups"] == [] and first["fusion_cross_term"] is None
    assert first["submodel_adapter_norms"]["layers"] == 2
    assert first["submodel_adapter_norms"]["B"]["max"] == 0.0
    last = starts[1]["stage_start"]  # the full stage: singletons, nothing fused or fresh
    assert last["fresh_init_groups"] == [] and last["fusion_cross_term"] is None
    assert last["full_adapter_norms"]["B"]["min"] > 0  # the transferred, trained B
    for r in records:
        norms = r["adapter_norms"]
        assert norms["full"]["layers"] == 4
        assert ("submodel" in norms) == (r["layers_trained"] < 4)
        for part in ("A", "B"):
            stats = norms["full"][part]
            assert stats["min"] <= stats["mean"] <= stats["max"]
    summary_stage = runs["devft"][0]["stages"][0]
    assert summary_stage["fresh_init_groups"] == [0, 1]
