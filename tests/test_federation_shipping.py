"""model.ship_layers: the server sends fused dense layers (once per stage) and embeddings and
head (once per run); the client's model equals the locally fused one, and bytes down grow by
exactly the serialized size of what was shipped."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file
from test_federation_run import CLIENTS, tiny_cfg

from devft.errors import ConfigError
from devft.federation.checkpoint import load_checkpoint
from devft.federation.runner import run_method
from devft.federation.shipping import SHIPPED, STORE, LayerShipper, shipped_source, to_record
from devft.models.client_stage import HOLDER, client_stage_model
from devft.models.loading import DTYPES
from devft.models.stage_builder import base_layout, build_stage, stage_names
from devft.models.submodel import StagePlan
from devft.reporting.recorder import read_metrics
from devft.rules import make_rule

PLAN = StagePlan(0, ((0, 1), (2, 3)), 0.1)
NEXT = StagePlan(1, ((0,), (1, 2), (3,)), 0.1)


def _local_stage(cfg, plan):
    """The stage as a client with the base's files fuses it itself."""
    layout = base_layout(cfg.model.path)
    return build_stage(layout.open_files(), layout, plan.group_lists(), plan.beta, plan.fusion,
                       DTYPES[cfg.model.dtype], torch.device("cpu"))


def _dense(model):
    return {k.replace("base_layer.", ""): v for k, v in
            model.base_model.model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_client_model_from_shipped_layers_equals_the_locally_fused_one(
        tiny_model_dir, tiny_data_file, tmp_path, dtype):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft", "model.ship_layers=true",
                   f"model.dtype={dtype}", "model.device=cpu")
    shipper = LayerShipper(cfg, make_rule(cfg))
    shipper.begin_stage(PLAN)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(RecordDict({SHIPPED: shipper.payload(7)}), dst_node_id=7,
                  message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    prefix = base_layout(cfg.model.path).layer_prefix()
    source = shipped_source(msg, context, PLAN, cfg, prefix)
    model = client_stage_model(cfg.model, PLAN, cfg.lora, source)
    local = _local_stage(cfg, PLAN).state_dict()
    shipped = _dense(model)
    assert set(shipped) == set(local)
    assert all(torch.equal(shipped[k], v) and shipped[k].dtype == v.dtype
               for k, v in local.items())
    HOLDER.release()


def test_each_node_gets_the_fixed_tensors_once_and_each_stage_once(tiny_model_dir,
                                                                     tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft", "model.ship_layers=true")
    shipper = LayerShipper(cfg, make_rule(cfg))
    shipper.begin_stage(PLAN)
    first = set(shipper.payload(1).keys())
    assert "model.embed_tokens.weight" in first and "model.layers.1.mlp.up_proj.weight" in first
    assert "model.layers.2.mlp.up_proj.weight" not in first  # a 2-layer stage
    assert set(shipper.payload(1).keys()) == first  # no reply yet (a failed round): again
    shipper.confirm([1])
    assert shipper.payload(1) is None
    shipper.confirm([1])
    shipper.begin_stage(NEXT)
    layers = set(shipper.payload(1).keys())
    assert layers and all(k.startswith("model.layers.") for k in layers)
    assert "model.layers.2.mlp.up_proj.weight" in layers


def test_a_client_without_its_stage_layers_fails_clearly(tiny_model_dir, tiny_data_file,
                                                         tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "devft", "model.ship_layers=true")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="holds no dense layers for stage 0"):
        shipped_source(msg, context, PLAN, cfg, "model.layers.")


def test_methods_that_need_the_full_base_on_the_client_refuse_shipping(tiny_model_dir,
                                                                       tiny_data_file, tmp_path):
    for method in ("flora", "fedsa"):
        cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, method, "model.ship_layers=true")
        with pytest.raises(ConfigError, match="model.ship_layers"):
            LayerShipper(cfg, make_rule(cfg))


@pytest.fixture(scope="module")
def shipped_runs(tiny_model_dir, tiny_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ship")
    runs = {}
    for ship in (False, True):
        cfg = tiny_cfg(tiny_model_dir, tiny_data_file, out / str(ship), "devft",
                       f"model.ship_layers={str(ship).lower()}")
        runs[ship] = (cfg, run_method(cfg), read_metrics(out / str(ship)))
    return runs


def _own_bytes(record: ArrayRecord) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(record).values())


def test_shipping_changes_the_bytes_not_the_model(shipped_runs):
    (cfg, off, m_off), (_, on, m_on) = shipped_runs[False], shipped_runs[True]
    # same training: the shipped layers are the fused ones, bit for bit
    a = load_file(f"{cfg.output.dir}/adapter/adapter_model.safetensors")
    b = load_file(f"{shipped_runs[True][0].output.dir}/adapter/adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert on["final_eval_loss"] == off["final_eval_loss"]
    dense = [r["dense_bytes_down"] for r in m_on]
    assert all(r["dense_bytes_down"] == 0 for r in m_off) and sum(dense) > 0
    assert on["total_bytes_down"] - off["total_bytes_down"] == sum(dense)
    assert on["total_dense_bytes_down"] == sum(dense)
    assert [r["bytes_down"] - s["bytes_down"] for r, s in zip(m_on, m_off)] == dense


def test_shipped_bytes_are_exactly_the_serialized_fused_layers(shipped_runs):
    """Each stage's first round ships every client its fused layers (the first stage also the
    embeddings, norm and head): the record's own objects plus its entry in the message."""
    cfg, _, metrics = shipped_runs[True]
    # the message's record dict lists a child twice: its id in the header (" <id>") and
    # `, "name": "<id>"` in the JSON body
    entry = len(" ") + 64 + len(json.dumps({SHIPPED: "0" * 64})) - 2 + len(", ")
    first_rounds = [r for r in metrics if r["round"] > 0 and r["stage_round"] == 1]
    assert len(first_rounds) == 2
    stages = json.loads(Path(cfg.output.dir, "summary.json").read_text())["stages"]
    layout = base_layout(cfg.model.path)
    for stage, record in zip(stages, first_rounds):
        groups = tuple(tuple(g) for g in stage["groups"])
        tensors = _local_stage(cfg, StagePlan(stage["stage"], groups, cfg.devft.beta))
        tensors = tensors.state_dict()
        names = [n for n in stage_names(layout, len(groups))
                 if n.startswith("model.layers.") or stage["stage"] == 0]
        expected = CLIENTS * (_own_bytes(to_record({n: tensors[n] for n in names})) + entry)
        assert record["dense_bytes_down"] == expected
    later = [r for r in metrics if r["round"] > 0 and r["stage_round"] > 1]
    assert later and all(r["dense_bytes_down"] == 0 for r in later)


def test_checkpoints_never_hold_the_shipped_layers(shipped_runs):
    cfg = shipped_runs[True][0]
    groups = load_checkpoint(Path(cfg.output.dir)).tensors
    assert "global-lora" in groups and not any(STORE in k for k in groups)


def test_comparison_table_shows_the_dense_bytes_only_when_shipped(shipped_runs):
    from rich.console import Console

    from devft.comparison import comparison_table

    def table(summary):
        entry = {"summary": summary, "vs_fedit": {"final_eval_loss_delta": 0.0,
                                                  "time_to_target_speedup": 1.0,
                                                  "bytes_to_target_reduction": 1.0}}
        console = Console(width=250, record=True)
        console.print(comparison_table({"target_eval_loss": 1.0, "methods": {"devft": entry}}))
        return console.export_text()

    on, off = shipped_runs[True][1], shipped_runs[False][1]
    assert "of which dense" in table(on)
    assert f"{on['total_dense_bytes_down'] / 1e6:.1f}" in table(on)
    assert "of which dense" not in table(off)
