"""The server's GlobalModel on a tiny model with real PEFT keys: a stage's plan and initial
submodel adapter, the transfer back (`absorb`), and a DevFT first stage changing the full model."""

import pytest
import torch
from test_federation_run import tiny_cfg

import devft.federation.server_app as server_app
from devft.core.layerstate import split_by_layer
from devft.federation.global_model import GlobalModel
from devft.federation.runner import prepare, run_method
from devft.models.lora import get_lora_state, set_lora_state
from devft.models.submodel import stage_model
from devft.reporting.recorder import read_metrics
from devft.rules import make_rule


@pytest.fixture
def model(tiny_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "run", "devft")  # stages 2, 4
    prepare(cfg)
    return GlobalModel(cfg, make_rule(cfg))


def _peft_keys(model, plan):
    """The adapter keys and shapes PEFT gives the stage's submodel."""
    sub = stage_model(model.base, plan, model.cfg.lora)
    return {k: v.shape for k, v in get_lora_state(sub).items()}, sub


def test_plan_stage_gives_the_submodel_adapter_under_peft_keys(model):
    first, last = model.schedule()
    plan, sub_lora = model.plan_stage(first)
    assert plan.num_layers == 2 and sorted(i for g in plan.groups for i in g) == [0, 1, 2, 3]
    keys, submodel = _peft_keys(model, plan)
    assert {k: v.shape for k, v in sub_lora.items()} == keys
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert {k.split(".")[4] for k in keys} == {"0", "1"}  # two submodel layers
    assert any(".lora_A.weight" in k for k in keys) and any(".lora_B.weight" in k for k in keys)
    set_lora_state(submodel, sub_lora)  # every tensor fits the submodel
    assert all(torch.isfinite(v).all() for v in sub_lora.values())
    assert any(v.abs().sum() > 0 for k, v in sub_lora.items() if ".lora_A." in k)


def test_plan_stage_at_full_depth_is_the_global_adapter(model):
    _, last = model.schedule()
    gen = torch.Generator().manual_seed(3)
    model.lora = {k: torch.randn(v.shape, generator=gen) for k, v in model.lora.items()}
    plan, sub_lora = model.plan_stage(last)
    assert plan.groups == ((0,), (1,), (2,), (3,))
    assert sub_lora.keys() == model.lora.keys()
    assert all(torch.equal(sub_lora[k], model.lora[k]) for k in sub_lora)


def test_absorb_copies_each_submodel_layer_into_every_layer_of_its_group(model):
    first, _ = model.schedule()
    plan, sub_lora = model.plan_stage(first)
    trained = {k: torch.full_like(v, float(k.split(".")[4]) + 1.5) for k, v in sub_lora.items()}
    before = dict(model.lora)
    model.absorb(plan, trained)
    assert model.lora.keys() == before.keys()
    full_layers, rest = split_by_layer(model.lora, model.prefix)
    sub_layers, _ = split_by_layer(trained, model.prefix)
    assert not rest and sorted(full_layers) == [0, 1, 2, 3]
    for n, group in enumerate(plan.groups):
        for j in group:
            assert full_layers[j].keys() == sub_layers[n].keys()
            assert all(torch.equal(full_layers[j][s], sub_layers[n][s]) for s in sub_layers[n])
    set_lora_state(model.full, model.lora)  # the full model's PEFT keys, all set


def test_a_devft_round_of_the_first_stage_changes_the_full_model(tiny_model_dir, tiny_data_file,
                                                                 tmp_path, monkeypatch):
    saved, real = {}, server_app.save_checkpoint

    def spy(out_dir, round_, ckpt):
        saved[round_] = {k: v.clone() for k, v in ckpt.tensors["global-lora"].items()}
        return real(out_dir, round_, ckpt)

    monkeypatch.setattr(server_app, "save_checkpoint", spy)
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "run", "devft",
                   "federation.rounds=2", "devft.rounds_per_stage=1")
    summary = run_method(cfg)
    records = read_metrics(tmp_path / "run")
    assert records[1]["stage"] == 0 and records[1]["layers_trained"] == 2
    assert records[1]["eval_loss"] != records[0]["eval_loss"]  # the full model's held-out loss
    groups = summary["stages"][0]["groups"]
    prefix = "base_model.model.model.layers."
    initial, after = split_by_layer(saved[0], prefix)[0], split_by_layer(saved[1], prefix)[0]
    for group in groups:
        for j in group:  # every layer of every group got the trained LoRA, not just the anchor
            assert any(not torch.equal(after[j][s], initial[j][s]) for s in after[j]), j
            anchor = after[group[0]]
            assert all(torch.equal(after[j][s], anchor[s]) for s in anchor)  # copy transfer
