"""FedAvg aggregation of client LoRA states (devft_paper.md §5)."""

import pytest
import torch

from devft.core.aggregation import fedavg, normalized_weights, weighted_mean


def test_normalized_weights():
    assert normalized_weights([2, 2, 4]) == [0.25, 0.25, 0.5]
    assert normalized_weights([5]) == [1.0]
    assert normalized_weights([0, 3]) == [0.0, 1.0]


@pytest.mark.parametrize("rule", [weighted_mean, fedavg])
def test_weighted_mean_hand_computed(rule):
    states = [
        {"A": torch.tensor([1.0, 2.0]), "B": torch.tensor([[0.0, 4.0]])},
        {"A": torch.tensor([3.0, 6.0]), "B": torch.tensor([[8.0, 0.0]])},
        {"A": torch.tensor([-1.0, 0.0]), "B": torch.tensor([[4.0, 4.0]])},
    ]
    # p = [1, 3, 4] / 8
    out = rule(states, [1, 3, 4])
    torch.testing.assert_close(out["A"], torch.tensor([(1 + 9 - 4) / 8, (2 + 18 + 0) / 8]))
    torch.testing.assert_close(out["B"], torch.tensor([[(0 + 24 + 16) / 8, (4 + 0 + 16) / 8]]))
    assert list(out) == ["A", "B"]


def test_weights_are_relative():
    torch.manual_seed(0)
    states = [{"w": torch.randn(3, 3)} for _ in range(3)]
    a = weighted_mean(states, [1, 2, 3])
    b = weighted_mean(states, [10, 20, 30])
    torch.testing.assert_close(a["w"], b["w"])


def test_zero_weight_client_is_ignored():
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([1000.0])}]
    torch.testing.assert_close(weighted_mean(states, [5, 0])["w"], torch.tensor([1.0]))


@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 7, 11]])
def test_identical_clients_give_identity(weights):
    torch.manual_seed(1)
    state = {"lora_A": torch.randn(4, 8), "lora_B": torch.randn(8, 4)}
    out = weighted_mean([{k: v.clone() for k, v in state.items()} for _ in weights], weights)
    for key in state:
        torch.testing.assert_close(out[key], state[key], rtol=1e-6, atol=1e-7)


def test_single_client_is_exact_copy():
    state = {"w": torch.randn(5)}
    out = weighted_mean([state], [42])
    assert torch.equal(out["w"], state["w"])
    assert out["w"].data_ptr() != state["w"].data_ptr()


def test_dtype_preserved():
    states = [
        {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)},
        {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)},
    ]
    out = weighted_mean(states, [1, 1])
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.tensor([2.0, 3.0], dtype=torch.bfloat16))


def test_float64_not_truncated_to_float32():
    x = torch.tensor([1.0 + 1e-12], dtype=torch.float64)
    out = weighted_mean([{"w": x}, {"w": x.clone()}], [1, 1])
    assert out["w"].dtype == torch.float64
    assert torch.equal(out["w"], x)


def test_inputs_not_modified():
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    weighted_mean(states, [1, 1])
    assert states[0]["w"].item() == 1.0 and states[1]["w"].item() == 3.0


def test_mismatched_keys_raise():
    states = [{"A": torch.ones(1), "B": torch.ones(1)}, {"A": torch.ones(1)}]
    with pytest.raises(ValueError, match="client 1"):
        weighted_mean(states, [1, 1])
    states = [{"A": torch.ones(1)}, {"A": torch.ones(1)}, {"A": torch.ones(1), "C": torch.ones(1)}]
    with pytest.raises(ValueError, match="client 2"):
        weighted_mean(states, [1, 1, 1])


@pytest.mark.parametrize("weights", [[0, 0], [0.0, 0.0]])
def test_zero_total_weight_raises(weights):
    states = [{"w": torch.ones(1)}, {"w": torch.ones(1)}]
    with pytest.raises(ValueError, match="positive"):
        weighted_mean(states, weights)


def test_negative_weight_raises():
    states = [{"w": torch.ones(1)}, {"w": torch.ones(1)}]
    with pytest.raises(ValueError, match="negative|>= 0"):
        weighted_mean(states, [3, -1])


def test_no_states_raises():
    with pytest.raises(ValueError, match="no client states"):
        weighted_mean([], [])


@pytest.mark.parametrize("weights", [[1, 1], [1, 1, 1, 1]])
def test_weight_count_must_match_state_count(weights):
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([9.0])}]
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(states, weights)
