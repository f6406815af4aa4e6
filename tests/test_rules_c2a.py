"""C2A: the hypernetwork that generates LoRA, its training through functional_call, the wire."""

import pytest
import torch
from flwr.app import RecordDict
from test_federation_run import CLIENTS, ROUNDS, tiny_cfg

from devft.data import client_shard, collate, encode, federated_data
from devft.federation.runner import run_method
from devft.models.loading import load_base_model
from devft.models.lora import get_lora_state, set_lora_state
from devft.models.submodel import StagePlan, stage_model
from devft.reporting.recorder import read_metrics
from devft.rules import ClientEnv, ClientStore, NodeSlot, make_rule
from devft.rules.c2a import (
    PREFIX,
    Generated,
    HyperLoRA,
    client_descriptor,
    from_wire,
    generate,
    layout,
    to_wire,
    train_hypernetwork,
)


@pytest.fixture
def setup(tiny_model_dir, tiny_data_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tiny_data_file, tmp_path, "c2a")
    base = load_base_model(cfg.model)
    model = stage_model(base, StagePlan.full(base.num_layers), cfg.lora)
    return cfg, base, model


def _batches(cfg, base, n=2):
    data = federated_data(cfg.data, CLIENTS, cfg.seed)
    tok = base.tokenizer
    return [
        collate([encode(r, tok, cfg.data.max_seq_len) for r in rows], tok.pad_token_id)
        for rows in data.client_batches(0, 1, n, 2, cfg.seed)
    ]


def _net(model, seed=0):
    return HyperLoRA(get_lora_state(model), 3, 8, 32, seed)


def _nonzero_b(net):
    with torch.no_grad():
        for name, head in net.heads.items():
            if name.startswith("B"):
                head.L.normal_(0, 0.5)
    return net


def test_layout_reads_layers_modules_and_widths(setup):
    _, _, model = setup
    slots, rank = layout(get_lora_state(model))
    assert rank == 8 and {s.layer for s in slots} == {0, 1, 2, 3}
    k = next(s for s in slots if s.module == "self_attn.k_proj" and s.kind == "B")
    assert k.dim == 8  # d_out of k_proj: 2 kv heads x head dim 4


def test_generated_b_is_zero_so_the_model_starts_as_the_base(setup):
    _, base, model = setup
    net = _net(model)
    lora = generate(net, torch.tensor([0.2, 0.3, 0.5]))
    assert lora.keys() == get_lora_state(model).keys()
    assert all(v.abs().sum() == 0 for k, v in lora.items() if "lora_B" in k)
    a = torch.cat([v.flatten() for k, v in lora.items() if "lora_A" in k])
    assert 0.05 < a.std() < 0.5  # about PEFT's kaiming-uniform scale for d_in 16 / 32
    set_lora_state(model, lora)
    model.eval()
    ids = torch.randint(0, 250, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base.model(input_ids=ids).logits)


def test_functional_call_equals_loading_the_generated_lora(setup):
    _, _, model = setup
    net, desc = _nonzero_b(_net(model)), torch.tensor([1.0, 0.0, 0.0])
    model.eval()
    ids = torch.randint(0, 250, (2, 10))
    with torch.no_grad():
        through = Generated(model, net, desc).eval()(input_ids=ids).logits
        set_lora_state(model, generate(net, desc))
        loaded = model(input_ids=ids).logits
    torch.testing.assert_close(through, loaded)


def test_training_changes_only_the_hypernetwork(setup):
    cfg, base, model = setup
    net = _nonzero_b(_net(model))
    before_net = {k: v.clone() for k, v in net.state_dict().items()}
    before_model = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = train_hypernetwork(
        model, net, torch.tensor([0.5, 0.5, 0.0]), _batches(cfg, base), cfg, 1, "test"
    )
    assert result.steps == 2 and result.examples == 4 and result.tokens > 0
    assert result.flops_est > 0 and result.mean_loss > 0
    assert all(not torch.equal(before_net[k], v) for k, v in net.state_dict().items())
    for name, p in model.named_parameters():  # base and PEFT's own LoRA: untouched
        assert torch.equal(before_model[name], p.detach()), name
        assert p.grad is None and not p.requires_grad, name


def test_client_round_loads_the_generated_lora_and_uploads_the_hypernetwork(setup):
    cfg, base, model = setup
    server = make_rule(cfg)
    server.start_stage(get_lora_state(model), StagePlan.full(base.num_layers))
    received, extra = server.message(NodeSlot(1, 0, CLIENTS))
    assert extra == {} and all(k.startswith(PREFIX) for k in received)
    client = make_rule(cfg)
    env = ClientEnv(
        cfg=cfg,
        plan=StagePlan.full(base.num_layers),
        prefix=base.family.lora_prefix(),
        partition=1,
        round=1,
        config={},
        store=ClientStore(RecordDict()),
        data=client_shard(cfg.data, CLIENTS, cfg.seed, 1),
    )
    set_lora_state(model, client.begin(received, env, get_lora_state(model)))
    result = client.local_update(model, _batches(cfg, base), env, default=None)
    assert result.steps == 2
    net, desc = env.extra["c2a"]
    loaded = get_lora_state(model)
    for k, v in generate(net, desc).items():
        torch.testing.assert_close(loaded[k], v)
    assert any(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)
    upload = client.end(loaded, env)
    assert upload.keys() == received.keys()  # hypernetwork only, never a LoRA tensor
    assert not any("lora_" in k for k in upload)
    assert any(not torch.equal(upload[k], received[k]) for k in upload)


def test_client_descriptor_is_its_category_histogram(setup):
    cfg, _, _ = setup
    data = federated_data(cfg.data, CLIENTS, cfg.seed)
    for partition in range(CLIENTS):
        hist = client_descriptor(client_shard(cfg.data, CLIENTS, cfg.seed, partition))
        assert hist.shape == (3,) and float(hist.sum()) == pytest.approx(1.0)
        cats = [data.records[i].category for i in data.partitions[partition]]
        assert float(hist[0]) == pytest.approx(cats.count("color") / len(cats))  # sorted names


def test_server_averages_hypernetworks_and_evaluates_the_uniform_lora(setup):
    cfg, base, model = setup
    sub = get_lora_state(model)
    rule = make_rule(cfg)
    rule.start_stage(sub, StagePlan.full(base.num_layers))
    lora = rule.eval_lora()
    assert {k: v.shape for k, v in lora.items()} == {k: v.shape for k, v in sub.items()}
    uploads = [to_wire(_nonzero_b(_net(model, seed=s))) for s in (1, 2)]
    rule.aggregate(uploads, [NodeSlot(1, 0, 2), NodeSlot(2, 1, 2)], [1.0, 3.0])
    state = rule.net.state_dict()
    for k, v in from_wire(uploads[0]).items():
        torch.testing.assert_close(state[k], 0.25 * v + 0.75 * from_wire(uploads[1])[k])
    torch.testing.assert_close(
        rule.eval_lora()[next(iter(sub))],
        generate(rule.net, torch.full((3,), 1 / 3))[next(iter(sub))],
    )


def test_checkpoint_round_trip_and_expected_upload(setup):
    cfg, base, model = setup
    plan = StagePlan.full(base.num_layers)
    rule = make_rule(cfg)
    rule.start_stage(get_lora_state(model), plan)
    rule.aggregate([to_wire(_nonzero_b(_net(model, seed=3)))], [NodeSlot(1, 0, 1)], [1.0])
    expected = rule.expected_upload(NodeSlot(1, 0, 1))
    assert expected == {k: tuple(v.shape) for k, v in to_wire(rule.net).items()}
    tensors, meta = rule.state_dict()
    restored = make_rule(cfg)
    restored.load_state_dict(tensors, meta, plan, None)
    for k, v in rule.eval_lora().items():
        torch.testing.assert_close(restored.eval_lora()[k], v)
    node = NodeSlot(2, 1, 2)
    assert restored.message(node)[0].keys() == rule.message(node)[0].keys()


def test_a_new_stage_keeps_the_hypernetwork_and_maps_layer_embeddings(setup):
    cfg, base, _ = setup
    rule = make_rule(cfg.replace(method="devft+c2a"))
    first = StagePlan(0, ((0, 1), (2, 3)), 0.1)
    rule.start_stage(get_lora_state(stage_model(base, first, cfg.lora)), first)
    assert rule.net.layer_emb.shape[0] == 2
    old = {k: v.clone() for k, v in rule.net.state_dict().items()}
    full = StagePlan.full(4, stage=1)
    sub = get_lora_state(stage_model(base, full, cfg.lora))
    rule.start_stage(sub, full)
    assert rule.eval_lora().keys() == sub.keys()
    torch.testing.assert_close(rule.net.layer_emb, old["layer_emb"][[0, 0, 1, 1]])
    assert torch.equal(rule.net.heads["A16"].H, old["heads.A16.H"])


@pytest.fixture(scope="module")
def c2a_runs(tiny_model_dir, tiny_data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("c2a")
    return {
        m: (run_method(tiny_cfg(tiny_model_dir, tiny_data_file, out / m, m)), out / m)
        for m in ("c2a", "devft+c2a")
    }


def test_c2a_run_sends_the_hypernetwork_and_moves_the_loss(c2a_runs, tiny_model_dir):
    summary, out = c2a_runs["c2a"]
    records = read_metrics(out)
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    cfg = tiny_cfg(tiny_model_dir, "tasks", out, "c2a")
    net = _net(stage_model(load_base_model(cfg.model), StagePlan.full(4), cfg.lora))
    payload = CLIENTS * net.param_count() * 4  # float32 on the wire
    overhead = CLIENTS * (len(net.state_dict()) * 600 + 3000)
    for r in records[1:]:
        assert r["clients_ok"] == CLIENTS and r["train_loss"] > 0
        assert payload <= r["bytes_up"] <= payload + overhead, r["round"]
        assert r["bytes_down"] <= payload + overhead, r["round"]
        if r["round"] > 1:  # round 1: Flower stores the identical all-zero init chunks once
            assert payload <= r["bytes_down"], r["round"]
    assert records[-1]["eval_loss"] != records[0]["eval_loss"]
    assert (out / "adapter" / "c2a_hypernetwork.safetensors").is_file()
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]


def test_devft_with_c2a_runs_every_stage(c2a_runs):
    records = read_metrics(c2a_runs["devft+c2a"][1])
    assert [r["layers_trained"] for r in records[1:]] == [2, 2, 4, 4]
    assert all(r["eval_loss"] > 0 for r in records)
