"""The submodel's initial LoRA: fresh for never-trained groups, the paper's fusion otherwise."""

import math

import pytest
import torch
from scipy.stats import ks_2samp

from devft.core.adapter_stats import adapter_norms, fusion_cross_term
from devft.core.fusion import fuse_group, fusion_coefficients
from devft.core.initial_adapter import (
    fresh_lora_norm,
    initial_submodel_adapter,
    standard_lora_a,
    untrained_layers,
)
from devft.core.stagemaps import transfer_state

P = "base_model.model.model.layers."
MODULES = {"q_proj": (48, 48), "down_proj": (48, 96)}  # (out, in)
R = 8


def init_state(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full model's initial adapter, drawn per layer as PEFT does (B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for j in range(layers):
        for m, (out, fan_in) in MODULES.items():
            state[f"{P}{j}.mlp.{m}.lora_A.weight"] = standard_lora_a((R, fan_in), gen)
            state[f"{P}{j}.mlp.{m}.lora_B.weight"] = torch.zeros(out, R)
    return state


def a_norms(state, layers=None):
    return [float(v.norm()) for k, v in state.items() if ".lora_A." in k
            and (layers is None or int(k[len(P):].split(".")[0]) in layers)]


GROUPS = [list(range(0, 8)), list(range(8, 16)), list(range(16, 23)), list(range(23, 30))]


def test_standard_init_has_the_expected_norm():
    norms = a_norms(init_state(30))
    assert sum(norms) / len(norms) == pytest.approx(fresh_lora_norm(R), rel=0.02)


def test_first_stage_a_has_a_fresh_inits_norm_distribution_and_zero_b():
    full = init_state(30)
    sub, fresh = initial_submodel_adapter(full, full, GROUPS, 0.1, "differential", P,
                                          seed=0, stage=0)
    assert fresh == [0, 1, 2, 3]
    reference = a_norms(init_state(30, seed=5))
    assert ks_2samp(a_norms(sub), reference).pvalue > 0.01
    assert all(float(v.abs().max()) == 0.0 for k, v in sub.items() if ".lora_B." in k)
    # the literal formula shrinks A: √Σc² ≈ 0.39 for groups of 7-8 at β = 0.1
    fused, none = initial_submodel_adapter(full, full, GROUPS, 0.1, "differential", P,
                                           untrained="fused")
    assert none == []
    assert ks_2samp(a_norms(fused), reference).pvalue < 1e-6
    ratio = sum(a_norms(fused)) / len(a_norms(fused)) / fresh_lora_norm(R)
    expected = math.sqrt(sum(c * c for c in fusion_coefficients(8, 0.1)))
    assert ratio == pytest.approx(expected, rel=0.15)


def test_fresh_init_is_seeded_per_run_stage_and_group():
    full = init_state(30)
    one, _ = initial_submodel_adapter(full, full, GROUPS, 0.1, "differential", P, seed=3)
    same, _ = initial_submodel_adapter(full, full, GROUPS, 0.1, "differential", P, seed=3)
    other, _ = initial_submodel_adapter(full, full, GROUPS, 0.1, "differential", P, seed=3,
                                        stage=1)
    key = f"{P}0.mlp.q_proj.lora_A.weight"
    assert torch.equal(one[key], same[key]) and not torch.equal(one[key], other[key])
    assert not torch.equal(one[key], one[f"{P}1.mlp.q_proj.lora_A.weight"])


def test_after_the_first_transfer_each_layer_holds_its_groups_representative():
    full = init_state(30)
    sub, _ = initial_submodel_adapter(full, full, GROUPS, 0.1, "differential", P)
    trained = {k: v + 0.01 if ".lora_B." in k else v for k, v in sub.items()}
    after = transfer_state(trained, GROUPS, "copy", P, into=full)
    for n, group in enumerate(GROUPS):
        for j in group:
            for m in MODULES:
                for part in ("A", "B"):
                    assert torch.equal(after[f"{P}{j}.mlp.{m}.lora_{part}.weight"],
                                       trained[f"{P}{n}.mlp.{m}.lora_{part}.weight"])
    assert untrained_layers(after, full, P) == set()
    norms = adapter_norms(after, P, R)["A_rel_fresh"]
    assert 0.8 <= norms["mean"] <= 1.25


def test_trained_groups_are_fused_with_the_papers_formula():
    full = init_state(6)
    initial = init_state(6)
    full[f"{P}2.mlp.q_proj.lora_B.weight"] = torch.randn(48, R)  # layer 2 trained
    groups = [[0, 1], [2, 3, 4], [5]]
    sub, fresh = initial_submodel_adapter(full, initial, groups, 0.2, "differential", P)
    assert fresh == [0]
    coeffs = fusion_coefficients(3, 0.2)
    layer = {j: {"a": full[f"{P}{j}.mlp.q_proj.lora_A.weight"],
                 "b": full[f"{P}{j}.mlp.q_proj.lora_B.weight"]} for j in (2, 3, 4)}
    expected = fuse_group([layer[j] for j in (2, 3, 4)], coeffs)
    assert torch.allclose(sub[f"{P}1.mlp.q_proj.lora_A.weight"], expected["a"])
    assert torch.allclose(sub[f"{P}1.mlp.q_proj.lora_B.weight"], expected["b"])
    # a one-layer group keeps its own (untrained, standard) init
    own = f"{P}5.mlp.q_proj.lora_A.weight"
    assert torch.equal(sub[f"{P}2.mlp.q_proj.lora_A.weight"], full[own])


def test_untrained_layers_sees_any_change():
    initial = init_state(3)
    current = dict(initial)
    key = f"{P}1.mlp.down_proj.lora_A.weight"
    current[key] = initial[key] * 1.0001
    assert untrained_layers(current, initial, P) == {0, 2}


def test_cross_term_is_zero_inside_an_old_group_and_not_across():
    gen = torch.Generator().manual_seed(1)
    full = {}
    for j in (0, 2):  # old groups [0, 1] and [2, 3], copy-transferred: equal LoRA within
        for m, (out, fan_in) in MODULES.items():
            a, b = standard_lora_a((R, fan_in), gen), torch.randn(out, R)
            for layer in (j, j + 1):
                full[f"{P}{layer}.mlp.{m}.lora_A.weight"] = a
                full[f"{P}{layer}.mlp.{m}.lora_B.weight"] = b
    assert fusion_cross_term(full, [[0, 1], [2, 3]], 0.1, "differential", P) == pytest.approx(
        0.0, abs=1e-12)
    assert fusion_cross_term(full, [[0], [1, 2], [3]], 0.1, "differential", P) > 0.01
    assert fusion_cross_term(init_state(4), [[0, 1], [2, 3]], 0.1, "differential", P) is None
