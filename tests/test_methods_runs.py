"""Every method through the real Flower apps on a tiny model: what crosses the wire."""

import json

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel
from test_federation_run import CLIENTS, tiny_cfg
from transformers import AutoModelForCausalLM

from devft.config import from_dict
from devft.data import federated_data
from devft.federation.client_app import client_train
from devft.federation.runner import run_method
from devft.federation.wire import plan_to_config, to_array_record
from devft.models.client_stage import HOLDER
from devft.models.loading import load_base_model
from devft.models.lora import get_lora_state, seeded_lora_init
from devft.models.submodel import StagePlan, stage_model
from devft.reporting.recorder import read_metrics
from devft.training.evaluation import heldout_batches, heldout_loss


@pytest.fixture(scope="module")
def method_runs(tiny_model_dir, tiny_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    names = ("devft", "fedit", "flora", "fedsa", "ffa", "devft+ffa", "devft+fedsa")
    return {m: (run_method(tiny_cfg(tiny_model_dir, tiny_data_file, out / m, m)), out / m)
            for m in names}


def test_ffa_and_fedsa_send_about_half_the_uplink(method_runs):
    for half, full in (("ffa", "fedit"), ("fedsa", "fedit"), ("devft+ffa", "devft")):
        for r_half, r_full in zip(read_metrics(method_runs[half][1])[1:],
                                  read_metrics(method_runs[full][1])[1:]):
            assert 0.4 < r_half["bytes_up"] / r_full["bytes_up"] < 0.6, (half, r_half["round"])


def test_flora_downlink_is_the_stack_of_all_clients(method_runs):
    # from round 2 on each client receives the previous round's stack of CLIENTS LoRAs
    for r in read_metrics(method_runs["flora"][1])[2:]:
        payload = CLIENTS * CLIENTS * r["trainable_params"] * 4
        overhead = CLIENTS * (r["layers_trained"] * 7 * 2 * 600 + 3000)
        assert payload <= r["bytes_down"] <= payload + overhead, r["round"]


def test_fedsa_evaluation_is_personalized(method_runs):
    records = read_metrics(method_runs["fedsa"][1])
    assert records[0]["eval_mode"] == "global"  # before training every client's B is 0
    assert all(r["eval_mode"] == "personalized" and r["eval_bytes"] > 0 for r in records[1:])
    assert method_runs["fedsa"][0]["personalized_eval"] is True


def test_flora_exported_adapter_reproduces_the_merged_model(method_runs, tiny_model_dir):
    """Pristine base + exported adapter (all stacks) scores exactly what the server measured
    on its merged base with a zero LoRA."""
    summary, out = method_runs["flora"]
    cfg = from_dict(json.loads((out / "config.json").read_text()))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      out / "adapter").eval()
    data = federated_data(cfg.data, CLIENTS, cfg.seed)
    batches = heldout_batches(data.eval_records(), load_base_model(cfg.model).tokenizer, cfg.data)
    assert heldout_loss(model, batches) == pytest.approx(summary["final_eval_loss"], abs=1e-4)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == CLIENTS * 8 * summary["rounds"]  # every round's stack, exactly


def test_fedsa_reply_never_contains_b(tiny_model_dir, tiny_data_file):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, "/tmp/unused-fedsa", "fedsa")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    base = load_base_model(cfg.model)
    plan = StagePlan.full(base.num_layers)
    state = seeded_lora_init(stage_model(base, plan, cfg.lora), 0)
    a_only = {k: v for k, v in state.items() if "lora_A" in k}
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    for round_ in (1, 2):
        msg = Message(RecordDict({"arrays": to_array_record(a_only),
                                  "config": _config(plan, round_)}),
                      dst_node_id=5, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{round_}"
        reply = client_train(msg, context, cfg)
        keys = list(reply.content["arrays"].keys())
        assert keys and all("lora_A" in k for k in keys)
        assert not any("lora_B" in k for k in keys)
        stored = context.state["fedsa-B"].to_torch_state_dict()
        assert stored and all("lora_B" in k for k in stored)
        assert any(v.abs().sum() > 0 for v in stored.values())  # B trained and kept locally
    trained = get_lora_state(HOLDER.model)  # the client's own (held) stage model
    # the client's model after round 2 started from its own stored B, not from zero
    assert any(torch.equal(trained[k], v) for k, v in stored.items())


def _config(plan, round_):
    from flwr.app import ConfigRecord

    return ConfigRecord({**plan_to_config(plan), "server-round": round_, "global-round": round_})
