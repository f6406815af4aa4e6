"""The stage client: one stage at a time (released on a stage change, checked with weakrefs),
the in-process grid's shared base, and gradient checkpointing."""

import gc
import weakref

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_federation_run import tiny_cfg
from tiny import save_tiny_model
from torch.optim.optimizer import register_optimizer_step_post_hook

from devft.federation.client_app import client_train
from devft.federation.wire import plan_to_config, to_array_record
from devft.models.client_stage import HOLDER, client_stage_model
from devft.models.loading import load_base_model, loaded_base_model
from devft.models.lora import get_lora_state, seeded_lora_init
from devft.models.submodel import StagePlan

FIRST = StagePlan(0, ((0, 1), (2, 3)), 0.1)
SECOND = StagePlan(1, ((0,), (1, 2), (3,)), 0.1)


@pytest.fixture
def fresh_model_dir(tmp_path):
    """A model directory this process has never loaded: clients read its files."""
    return save_tiny_model(tmp_path / "model", "llama", num_layers=4)


def _train(cfg, plan, context, round_):
    from flwr.app import ConfigRecord

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    lora = seeded_lora_init(client_stage_model(cfg.model, plan, cfg.lora), 0)
    config = ConfigRecord({**plan_to_config(plan), "server-round": 1, "global-round": round_})
    msg = Message(RecordDict({"arrays": to_array_record(lora), "config": config}),
                  dst_node_id=5, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m{round_}"
    return client_train(msg, context, cfg)


def _context():
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def test_a_stage_change_releases_the_previous_stage_its_lora_and_optimizer_state(
        fresh_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(fresh_model_dir, tiny_data_file, tmp_path / "out", "devft")
    assert loaded_base_model(cfg.model) is None  # the client reads the files
    optimizer_state: list[weakref.ref] = []

    def keep_state_refs(optimizer, args, kwargs):
        optimizer_state.extend(weakref.ref(t) for s in optimizer.state.values()
                               for t in s.values() if isinstance(t, torch.Tensor))

    handle = register_optimizer_step_post_hook(keep_state_refs)
    try:
        context = _context()
        _train(cfg, FIRST, context, 1)
        model = HOLDER.model
        first = [weakref.ref(model)] + [weakref.ref(p) for p in model.parameters()]
        lora = [weakref.ref(p) for n, p in model.named_parameters() if "lora_" in n]
        assert lora and optimizer_state
        del model
        _train(cfg, SECOND, context, 2)
    finally:
        handle.remove()
    gc.collect()
    assert all(ref() is None for ref in first), "a tensor of the first stage is still alive"
    assert all(ref() is None for ref in lora)
    assert all(ref() is None for ref in optimizer_state)  # AdamW state lives in a round only
    assert HOLDER.key is not None and len(HOLDER.model.base_model.model.model.layers) == 3
    HOLDER.release()


def test_the_same_stage_is_kept_between_rounds_and_built_once(fresh_model_dir, tiny_data_file,
                                                              tmp_path):
    cfg = tiny_cfg(fresh_model_dir, tiny_data_file, tmp_path / "out", "devft")
    context = _context()
    _train(cfg, FIRST, context, 1)
    model = HOLDER.model
    _train(cfg, FIRST, context, 2)
    assert HOLDER.model is model
    HOLDER.release()
    assert HOLDER.model is None


def test_in_process_clients_share_the_loaded_base_through_the_same_builder(tiny_model_dir,
                                                                           tiny_data_file,
                                                                           tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path / "out", "devft")
    base = load_base_model(cfg.model)
    model = client_stage_model(cfg.model, SECOND, cfg.lora).base_model.model
    layers = model.model.layers
    anchor = base.model.model.layers[0].self_attn.q_proj.weight
    assert layers[0].self_attn.q_proj.base_layer.weight.data_ptr() == anchor.data_ptr()
    fused = layers[1].self_attn.q_proj.base_layer.weight
    assert fused.data_ptr() not in {p.data_ptr() for p in base.model.parameters()}
    assert model.model.embed_tokens.weight.data_ptr() == base.model.model.embed_tokens.weight\
        .data_ptr()
    HOLDER.release()


def test_gradient_checkpointing_changes_memory_not_the_update(fresh_model_dir, tiny_data_file,
                                                              tmp_path):
    """Same reply with and without recomputation (non-reentrant checkpointing replays the
    dropout RNG); with it on, the decoder layers run their forward twice."""
    replies, calls = {}, {}
    for on in (False, True):
        cfg = tiny_cfg(fresh_model_dir, tiny_data_file, tmp_path / f"out{on}", "devft",
                       f"train.gradient_checkpointing={str(on).lower()}")
        HOLDER.release()
        model = client_stage_model(cfg.model, FIRST, cfg.lora)
        layer = model.base_model.model.model.layers[0].mlp
        count = [0]
        hook = layer.register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        reply = _train(cfg, FIRST, _context(), 1)
        hook.remove()
        replies[on] = reply.content["arrays"].to_torch_state_dict()
        calls[on] = count[0]
        assert model.base_model.model.is_activation_checkpointing == on
    steps = 2  # train.local_steps of tiny_cfg
    assert calls[False] == steps and calls[True] == 2 * steps
    assert all(torch.allclose(replies[True][k], v, atol=1e-6) for k, v in replies[False].items())
    HOLDER.release()


def test_full_model_client_of_fedit_is_the_full_stage(fresh_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(fresh_model_dir, tiny_data_file, tmp_path / "out", "fedit")
    model = client_stage_model(cfg.model, StagePlan.full(4), cfg.lora)
    assert len(model.base_model.model.model.layers) == 4
    assert len(get_lora_state(model)) == 4 * 7 * 2
    HOLDER.release()


def test_method_table_lists_every_method_and_what_its_client_holds():
    from pathlib import Path

    from devft.methods import METHOD_NAMES, get_method

    doc = (Path(__file__).resolve().parents[1] / "docs" / "how-it-works.md").read_text()
    section = doc.split("## Methods and what a client holds", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in section.splitlines()
            if line.startswith("| `")}
    assert set(rows) == set(METHOD_NAMES)
    for name in METHOD_NAMES:
        if get_method(name).aggregation == "flora":
            assert "full base" in rows[name], name
