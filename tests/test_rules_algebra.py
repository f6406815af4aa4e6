"""Each aggregation rule's algebra, on hand-made tensors."""

import torch

from devft.config import load_config
from devft.models.submodel import StagePlan
from devft.rules import NodeSlot, make_rule
from devft.rules.dofit import domain_of, perturb_shared, top_keys
from devft.rules.flora import stack
from devft.rules.hetlora import client_rank, norm_weighted_pad_mean, pad, truncate

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
PLAN = StagePlan(0, ((0,), (1,)), 0.1)


def _lora(rank, d_in=6, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, d_in, generator=g), B: torch.randn(d_out, rank, generator=g)}


def _rule(method, *overrides):
    return make_rule(load_config(None, [f"method={method}", *overrides]))


def test_flora_stack_product_equals_weighted_sum_of_client_products():
    clients = [_lora(2, seed=1), _lora(4, seed=2), _lora(3, seed=3)]  # heterogeneous ranks
    weights, scaling = [1.0, 3.0, 4.0], 2.0
    stacked = stack(clients, weights, scaling)
    expected = sum(w / 8.0 * scaling * c[B] @ c[A] for w, c in zip(weights, clients))
    assert stacked[A].shape == (9, 6) and stacked[B].shape == (5, 9)
    torch.testing.assert_close(stacked[B] @ stacked[A], expected, rtol=1e-5, atol=1e-6)


def test_flora_downlink_carries_every_stack_a_node_has_not_merged():
    rule = _rule("flora")
    rule.start_stage(_lora(8), PLAN)
    node = NodeSlot(7, 0, 2)
    arrays, config = rule.message(node)
    assert arrays == {} and config["flora-pending"] == []
    rule.aggregate([_lora(8, seed=1), _lora(8, seed=2)], [node, NodeSlot(8, 1, 2)], [1, 1])
    arrays, config = rule.message(node)
    assert config["flora-pending"] == [0]
    assert arrays["flora.0." + A].shape == (16, 6)  # two clients' rank-8 stacked
    rule.aggregate([_lora(8, seed=3)], [NodeSlot(8, 1, 2)], [1])  # node 7 did not reply
    _, config = rule.message(node)
    assert config["flora-pending"] == [0, 1]  # it still needs round 0's stack


def test_ffa_averages_b_and_keeps_a_and_sends_a_once_per_stage():
    rule = _rule("ffa")
    init = _lora(4)
    rule.start_stage(init, PLAN)
    first, _ = rule.message(NodeSlot(1, 0, 2))
    assert set(first) == {A, B}
    up1, up2 = {B: torch.ones(5, 4)}, {B: torch.full((5, 4), 5.0)}
    rule.aggregate([up1, up2], [NodeSlot(1, 0, 2), NodeSlot(2, 1, 2)], [3.0, 1.0])
    out = rule.eval_lora()
    assert torch.equal(out[A], init[A])
    torch.testing.assert_close(out[B], torch.full((5, 4), 2.0))
    again, _ = rule.message(NodeSlot(1, 0, 2))
    assert set(again) == {B}  # A already delivered this stage
    rule.start_stage(init, StagePlan(1, ((0, 1),), 0.1))
    assert A in rule.message(NodeSlot(1, 0, 2))[0]  # new stage, new fused A
    assert not rule.trainable("x.lora_A.default.weight") and rule.trainable("x.lora_B.w")


def test_fedsa_sends_and_averages_only_a():
    rule = _rule("fedsa")
    init = _lora(4)
    rule.start_stage(init, PLAN)
    sent, _ = rule.message(NodeSlot(1, 0, 2))
    assert set(sent) == {A}
    rule.aggregate([{A: torch.ones(4, 6)}, {A: torch.zeros(4, 6)}],
                   [NodeSlot(1, 0, 2), NodeSlot(2, 1, 2)], [1.0, 1.0])
    torch.testing.assert_close(rule.eval_lora()[A], torch.full((4, 6), 0.5))
    assert torch.equal(rule.eval_lora()[B], init[B])  # the server never learns a client's B


def test_hetlora_truncation_and_padding_round_trip():
    full = _lora(8)
    small = truncate(full, 3)
    assert small[A].shape == (3, 6) and small[B].shape == (5, 3)
    back = {k: pad(v, k, 8) for k, v in small.items()}
    assert torch.equal(back[A][:3], full[A][:3]) and back[A][3:].abs().sum() == 0
    assert torch.equal(back[B][:, :3], full[B][:, :3]) and back[B][:, 3:].abs().sum() == 0
    assert [client_rank([], 8, i, True) for i in range(5)] == [2, 4, 6, 8, 2]
    assert client_rank([4, 2], 8, 3, True) == 2


def test_hetlora_aggregation_is_norm_weighted_zero_padded_mean():
    c1, c2 = _lora(2, seed=1), _lora(4, seed=2)
    n1 = torch.linalg.matrix_norm(c1[B] @ c1[A])
    n2 = torch.linalg.matrix_norm(c2[B] @ c2[A])
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    out = norm_weighted_pad_mean([c1, c2], 4, [0.5, 0.5])
    torch.testing.assert_close(out[A], w1 * pad(c1[A], A, 4) + w2 * c2[A])
    torch.testing.assert_close(out[B], w1 * pad(c1[B], B, 4) + w2 * c2[B])


def test_hetlora_clients_train_their_rank_with_the_same_scaling():
    rule = _rule("hetlora", "lora.r=8", "lora.alpha=16")
    rule.start_stage(_lora(8), PLAN)
    arrays, extra = rule.message(NodeSlot(5, 0, 4))
    assert extra["rank"] == 2 and arrays[A].shape[0] == 2
    settings = rule.lora_settings(type("Env", (), {"config": extra})())
    assert settings.r == 2 and settings.alpha / settings.r == 16 / 8


def test_dofit_domains_topk_and_proximal_perturbation():
    assert [domain_of(NodeSlot(i, i, 4), 2) for i in range(4)] == [0, 0, 1, 1]
    d0 = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.1, 0.0]), "c": torch.tensor([2.0])}
    d1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, 0.1]), "c": torch.tensor([-3.0])}
    assert top_keys(d0, 2) == {"a", "c"} and top_keys(d1, 2) == {"a", "c"}
    out = perturb_shared([d0, d1], topk=2, scale=1.0)
    center = torch.tensor([2.0, 1.0])
    diff0 = d0["a"] - center
    torch.testing.assert_close(out[0]["a"], d0["a"] + diff0.abs() / diff0.norm())
    torch.testing.assert_close(out[0]["c"], d0["c"] + 1.0)  # |2 - (-0.5)| / 2.5
    assert torch.equal(out[0]["b"], d0["b"])  # not in both top-k: untouched
    # one domain (or identical domains): nothing to perturb, no division by zero
    same = perturb_shared([d0, dict(d0)], topk=3, scale=1.0)
    assert all(torch.equal(same[0][k], d0[k]) for k in d0)


def test_dofit_sends_each_domain_its_own_lora_and_evaluates_their_mean():
    rule = _rule("dofit", "dofit.topk=1", "dofit.scale=0")
    rule.start_stage(_lora(2), PLAN)
    nodes = [NodeSlot(i, i, 4) for i in range(4)]
    ups = [{k: torch.full_like(v, float(i)) for k, v in _lora(2).items()} for i in range(4)]
    rule.aggregate(ups, nodes, [1.0] * 4)
    first, extra = rule.message(nodes[0])
    assert extra["domain"] == 0 and torch.allclose(first[A], torch.full_like(first[A], 0.5))
    second, _ = rule.message(nodes[3])
    assert torch.allclose(second[A], torch.full_like(second[A], 2.5))
    assert torch.allclose(rule.eval_lora()[A], torch.full_like(first[A], 1.5))


def test_compositions_use_their_rule_inside_devft_stages():
    for rule_name, cls in (("flora", "FLoRA"), ("fedsa", "FedSALoRA"), ("ffa", "FFALoRA")):
        cfg = load_config(None, [f"method=devft+{rule_name}"])
        assert type(make_rule(cfg)).__name__ == cls
        from devft.methods import get_method
        spec = get_method(cfg.method)
        assert spec.staged and spec.recipe == "spectral" and spec.fusion == "differential"
