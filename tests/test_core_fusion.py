"""DBLF: differential layer fusion (devft_paper.md §3, §7.5-7.7)."""

import logging

import pytest
import torch

from devft.core.fusion import (
    check_beta_for_stages,
    clamped_groups,
    fuse_group,
    fuse_layers,
    fusion_coefficients,
)
from devft.errors import ConfigError

VARIANTS = ["differential", "anchor", "average"]


def layer(w, b, step=0):
    return {
        "mlp.weight": torch.tensor(w, dtype=torch.float32),
        "norm.weight": torch.tensor(b, dtype=torch.float32),
        "step": torch.tensor([step], dtype=torch.int64),
    }


@pytest.fixture
def layers():
    # 4 layers with 2-element weights; groups below use layers out of order on purpose
    return {
        0: layer([1.0, 2.0], [1.0], step=10),
        1: layer([10.0, -4.0], [0.5], step=11),
        2: layer([3.0, 5.0], [2.0], step=12),
        3: layer([-1.0, 0.0], [0.0], step=13),
    }


# ---- coefficients ----------------------------------------------------------------------------


def test_differential_coefficients_hand_computed():
    assert fusion_coefficients(4, 0.1) == pytest.approx([0.7, 0.1, 0.1, 0.1])
    assert fusion_coefficients(8, 0.1) == pytest.approx([0.3] + [0.1] * 7)  # 32-layer stage 1
    assert fusion_coefficients(1, 0.1) == [1.0]
    assert fusion_coefficients(3, 0.0) == [1.0, 0.0, 0.0]


def test_anchor_and_average_coefficients():
    assert fusion_coefficients(3, 0.1, "anchor") == [1.0, 0.0, 0.0]
    assert fusion_coefficients(4, 0.1, "average") == [0.25, 0.25, 0.25, 0.25]


@pytest.mark.parametrize("variant", VARIANTS)
def test_coefficients_sum_to_one(variant):
    for size in [1, 2, 3, 8, 10, 17]:
        for beta in [0.0, 0.1, 0.15, 0.5, 1.0]:
            coeffs = fusion_coefficients(size, beta, variant)
            assert len(coeffs) == size
            assert sum(coeffs) == pytest.approx(1.0, abs=1e-12), (size, beta)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown fusion variant"):
        fusion_coefficients(3, 0.1, "sum")


# ---- the formula on hand-made tensors --------------------------------------------------------


def test_differential_formula_hand_computed(layers):
    # group [0, 2, 3], anchor 0, beta 0.25:
    # w = [1,2] + 0.25*(([3,5]-[1,2]) + ([-1,0]-[1,2])) = [1,2] + 0.25*[0,1] = [1, 2.25]
    # n = 1 + 0.25*((2-1) + (0-1)) = 1
    fused = fuse_layers(layers, [[0, 2, 3], [1]], beta=0.25)
    assert set(fused) == {0, 1}
    torch.testing.assert_close(fused[0]["mlp.weight"], torch.tensor([1.0, 2.25]))
    torch.testing.assert_close(fused[0]["norm.weight"], torch.tensor([1.0]))
    torch.testing.assert_close(fused[1]["mlp.weight"], torch.tensor([10.0, -4.0]))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.15, 0.3, 1 / 3])  # up to the clamp of |g| = 4
def test_differential_matches_anchor_plus_beta_sum_of_differences(beta):
    torch.manual_seed(0)
    states = {i: {"w": torch.randn(3, 4), "lora_A": torch.randn(2, 4)} for i in range(5)}
    group = [0, 1, 3, 4]
    fused = fuse_layers(states, [group, [2]], beta)[0]
    for key in ("w", "lora_A"):
        anchor = states[0][key]
        expected = anchor + beta * sum(states[j][key] - anchor for j in group)
        torch.testing.assert_close(fused[key], expected, rtol=1e-6, atol=1e-6)


def test_anchor_variant_is_the_anchor(layers):
    fused = fuse_layers(layers, [[0, 2, 3], [1]], beta=0.25, variant="anchor")
    torch.testing.assert_close(fused[0]["mlp.weight"], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(fused[0]["norm.weight"], torch.tensor([1.0]))


def test_average_variant_is_the_mean(layers):
    fused = fuse_layers(layers, [[0, 2, 3], [1]], beta=0.25, variant="average")
    # mean of [1,2], [3,5], [-1,0] = [1, 7/3]; norms (1+2+0)/3 = 1
    torch.testing.assert_close(fused[0]["mlp.weight"], torch.tensor([1.0, 7.0 / 3.0]))
    torch.testing.assert_close(fused[0]["norm.weight"], torch.tensor([1.0]))


def test_anchor_is_first_layer_of_group(layers):
    # anchor 1 (the group's first entry), beta 0.5: [10,-4] + 0.5*([3,5]-[10,-4]) = [6.5, 0.5]
    fused = fuse_layers(layers, [[0], [1, 2]], beta=0.5)
    torch.testing.assert_close(fused[1]["mlp.weight"], torch.tensor([6.5, 0.5]))


def test_fused_lora_b_zero_stays_zero():
    # stage 1: every LoRA B is at its init 0, so the fused B is exactly 0
    states = {i: {"lora_B": torch.zeros(4, 2), "lora_A": torch.randn(2, 4)} for i in range(4)}
    fused = fuse_layers(states, [[0, 1, 2, 3]], beta=0.1)
    assert torch.equal(fused[0]["lora_B"], torch.zeros(4, 2))


# ---- one-layer groups ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_one_layer_group_is_that_layer_unchanged(variant, dtype):
    torch.manual_seed(1)
    # float64 values that float32 cannot hold: a float32 round trip would change them
    states = {
        i: {"w": (torch.randn(5, 3, dtype=torch.float64) * 10**i).to(dtype), "idx": torch.arange(3)}
        for i in range(3)
    }
    fused = fuse_layers(states, [[0], [1], [2]], beta=0.1, variant=variant)
    for n in range(3):
        assert fused[n]["w"].dtype == dtype
        assert torch.equal(fused[n]["w"], states[n]["w"])
        assert torch.equal(fused[n]["idx"], states[n]["idx"])
        # a copy, not the same storage
        assert fused[n]["w"].data_ptr() != states[n]["w"].data_ptr()


def test_full_depth_groups_reproduce_every_layer(layers):
    fused = fuse_layers(layers, [[0], [1], [2], [3]], beta=0.1)
    for i in range(4):
        for key in layers[i]:
            assert torch.equal(fused[i][key], layers[i][key])


# ---- warning, dtypes, non-float tensors ------------------------------------------------------


def test_negative_anchor_coefficient_is_clamped_and_warned(caplog):
    # 13B-like: |g| = 10, beta = 0.15 -> 1 - 0.15 * 9 = -0.35: beta clamped to 1/9
    states = {i: {"w": torch.full((2,), float(i))} for i in range(10)}
    with caplog.at_level(logging.WARNING, logger="devft.core.fusion"):
        fused = fuse_layers(states, [list(range(10))], beta=0.15)
    assert len(caplog.records) == 1
    assert "-0.35" in caplog.text and "clamped" in caplog.text and "0.1111" in caplog.text
    coeffs = fusion_coefficients(10, 0.15)
    assert coeffs == pytest.approx([0.0] + [1 / 9] * 9)
    assert sum(coeffs) == pytest.approx(1.0)
    assert fused[0]["w"] == pytest.approx(torch.full((2,), 5.0))  # mean of layers 1..9
    assert clamped_groups([list(range(10)), [10, 11]], 0.15) == [
        {"group": list(range(10)), "size": 10, "beta": pytest.approx(1 / 9)}]
    assert clamped_groups([list(range(10))], 0.15, "average") == []


def test_clamp_is_continuous_at_the_boundary():
    assert fusion_coefficients(8, 1 / 7) == pytest.approx([0.0] + [1 / 7] * 7)
    assert fusion_coefficients(8, 0.1428) == pytest.approx([1 - 0.1428 * 7] + [0.1428] * 7)
    assert fusion_coefficients(8, 0.5) == pytest.approx([0.0] + [1 / 7] * 7)


def test_no_warning_when_anchor_coefficient_non_negative(caplog):
    states = {i: {"w": torch.ones(2)} for i in range(11)}
    with caplog.at_level(logging.WARNING, logger="devft.core.fusion"):
        fuse_layers(states, [list(range(8)), [8, 9, 10]], beta=0.1)  # 0.3 and 0.8
        fuse_layers(states, [list(range(11))], beta=0.15, variant="average")
    assert caplog.records == []


def test_beta_that_even_groups_would_clamp_is_refused_up_front():
    check_beta_for_stages(30, [4, 8, 15, 30], 0.1)  # groups of 8: max 1/7
    with pytest.raises(ConfigError) as err:
        check_beta_for_stages(30, [4, 8, 15, 30], 0.3)
    assert err.value.field == "devft.beta" and "4-layer stage" in str(err.value)
    assert "0.1429" in str(err.value)
    with pytest.raises(ConfigError):
        check_beta_for_stages(40, [5, 10, 20, 40], 0.15)  # the doubling 13B reading
    check_beta_for_stages(40, [6, 12, 24, 40], 0.15)


def test_bf16_in_bf16_out_computed_in_fp32():
    torch.manual_seed(2)
    # positive values and coefficients: no cancellation, so fp32 compute + one final bf16
    # rounding stays within a bf16 half-ulp-ish (rel 2^-8) of the exact result
    states = [{"w": (torch.rand(4096) + 0.5).to(torch.bfloat16)} for _ in range(6)]
    coeffs = fusion_coefficients(6, 0.1)  # [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    fused = fuse_group(states, coeffs)["w"]
    assert fused.dtype == torch.bfloat16
    exact = sum(c * s["w"].double() for c, s in zip(coeffs, states))
    rel_err = ((fused.double() - exact).abs() / exact).max().item()
    assert rel_err <= 2**-8 * 1.01
    # accumulating in bf16 instead rounds at every step and misses that bound
    naive = torch.zeros(4096, dtype=torch.bfloat16)
    for c, s in zip(coeffs, states):
        naive = naive + c * s["w"]
    assert ((naive.double() - exact).abs() / exact).max().item() > 2**-8 * 1.01


def test_non_float_tensors_are_copied_from_anchor(layers):
    fused = fuse_layers(layers, [[1, 2, 3], [0]], beta=0.3)
    assert fused[0]["step"].dtype == torch.int64
    assert torch.equal(fused[0]["step"], torch.tensor([11]))  # the anchor's, not a mix
    assert torch.equal(fused[1]["step"], torch.tensor([10]))
    assert fused[0]["step"].data_ptr() != layers[1]["step"].data_ptr()
    fused[0]["step"].add_(1)
    assert layers[1]["step"].item() == 11


def test_fusion_does_not_modify_inputs(layers):
    before = {i: {k: v.clone() for k, v in s.items()} for i, s in layers.items()}
    fuse_layers(layers, [[0, 1, 2, 3]], beta=0.2)
    for i in layers:
        for k in layers[i]:
            assert torch.equal(layers[i][k], before[i][k])


def test_fuse_group_keeps_keys_and_shapes():
    states = [{"a": torch.randn(2, 3), "b": torch.randn(5)} for _ in range(3)]
    out = fuse_group(states, [0.5, 0.25, 0.25])
    assert list(out) == ["a", "b"]
    assert out["a"].shape == (2, 3) and out["b"].shape == (5,)
    torch.testing.assert_close(
        out["b"], 0.5 * states[0]["b"] + 0.25 * (states[1]["b"] + states[2]["b"])
    )


def test_fuse_group_rejects_coefficient_count_mismatch():
    states = [{"w": torch.ones(2) * i} for i in range(3)]
    with pytest.raises(ValueError, match="coefficient"):
        fuse_group(states, [0.5, 0.5])
