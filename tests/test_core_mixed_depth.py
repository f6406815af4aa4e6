"""Aggregation across client depths (devft.core.mixed_depth), checked by hand."""

import pytest
import torch

from devft.core.mixed_depth import DepthReply, covered_layers, mixed_depth_average

P = "m.layers."


def _state(values: dict[int, float], rest: float | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for i, v in values.items():
        out[f"{P}{i}.q.lora_A.weight"] = torch.full((2, 3), v)
        out[f"{P}{i}.q.lora_B.weight"] = torch.full((3, 2), 10 * v)
    if rest is not None:
        out["head.lora_A.weight"] = torch.full((1,), rest)
    return out


def _a(state, layer):
    return state[f"{P}{layer}.q.lora_A.weight"][0, 0].item()


def _b(state, layer):
    return state[f"{P}{layer}.q.lora_B.weight"][0, 0].item()


def test_each_layer_is_the_nk_weighted_mean_of_the_replies_covering_it():
    glob = _state({0: 0.0, 1: 0.0, 2: 0.0, 3: -1.0})
    full = DepthReply(_state({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}), [[0], [1], [2], [3]], 3.0)
    # a 2-layer client: fused group {0, 1} and the real layer 2 (layer 3 not covered)
    small = DepthReply(_state({0: 5.0, 1: 7.0}), [[0, 1], [2]], 1.0)
    out = mixed_depth_average([full, small], glob, P)
    assert _a(out, 0) == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)  # 2.0
    assert _a(out, 1) == pytest.approx((3 * 2.0 + 1 * 5.0) / 4)  # group copied to layer 1
    assert _a(out, 2) == pytest.approx((3 * 3.0 + 1 * 7.0) / 4)
    assert _a(out, 3) == pytest.approx(4.0)  # covered by the full client alone
    assert _b(out, 0) == pytest.approx((3 * 10.0 + 1 * 50.0) / 4)  # B averaged on its own


def test_a_layer_no_reply_covers_keeps_the_global_lora():
    glob = _state({0: 0.5, 1: 0.25, 2: 9.0})
    r1 = DepthReply(_state({0: 1.0}), [[0]], 1.0)
    r2 = DepthReply(_state({0: 3.0}), [[1]], 1.0)
    out = mixed_depth_average([r1, r2], glob, P)
    assert (_a(out, 0), _a(out, 1), _a(out, 2)) == (1.0, 3.0, 9.0)
    assert covered_layers([[0, 1], [4]]) == [0, 1, 4]


def test_equal_depths_and_identity_groups_reduce_to_fedavg():
    from devft.core.aggregation import fedavg

    states = [_state({0: 1.0, 1: 2.0}, rest=1.0), _state({0: 3.0, 1: -2.0}, rest=5.0)]
    replies = [DepthReply(s, [[0], [1]], w) for s, w in zip(states, [1.0, 3.0])]
    out = mixed_depth_average(replies, _state({0: 0.0, 1: 0.0}, rest=0.0), P)
    want = fedavg(states, [1.0, 3.0])
    assert set(out) == set(want)
    assert all(torch.allclose(out[k], want[k]) for k in want)


def test_scaled_transfer_and_bad_replies():
    r = DepthReply(_state({0: 2.0}), [[0, 1]], 1.0)
    out = mixed_depth_average([r], _state({0: 0.0, 1: 0.0}), P, variant="scaled")
    assert _a(out, 1) == 2.0 and _b(out, 1) == pytest.approx(10.0)  # B / |g|
    with pytest.raises(ValueError, match="no client replies"):
        mixed_depth_average([], {}, P)
    with pytest.raises(ValueError, match="groups"):
        mixed_depth_average([DepthReply(_state({0: 1.0}), [[0], [1]], 1.0)], {}, P)
    with pytest.raises(ValueError, match="'none'"):
        mixed_depth_average([r], {}, P, variant="none")
