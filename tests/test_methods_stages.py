"""Stage recipes, fusion and transfer variants build the submodels and adapters they claim."""

import pytest
import torch
from tiny import tiny_model

from devft.core.recipes import evenly_spaced, random_groups, stage_groups
from devft.core.transfer import transfer_layers
from devft.models.families import family_of
from devft.models.merge import merge_layers
from devft.models.submodel import StagePlan, build_submodel


def _never():
    raise AssertionError("similarity must not be computed by this recipe")


@pytest.mark.parametrize("recipe, expected", [
    ("contiguous", [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),
    ("prefix", [[0], [1], [2]]),
    ("layerdrop", [[0], [4], [8]]),
])
def test_recipes_give_their_groups(recipe, expected):
    assert stage_groups(recipe, 9, 3, _never) == expected


def test_random_groups_are_a_seeded_partition():
    groups = random_groups(12, 4, seed=3)
    assert len(groups) == 4 and all(groups)
    assert sorted(i for g in groups for i in g) == list(range(12))
    assert groups == random_groups(12, 4, seed=3) and groups != random_groups(12, 4, seed=4)
    assert groups != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_every_recipe_is_the_identity_at_full_depth():
    for recipe in ("spectral", "contiguous", "random", "prefix", "layerdrop"):
        assert stage_groups(recipe, 5, 5, _never) == [[i] for i in range(5)]


def test_evenly_spaced_layers_cover_first_and_last():
    assert evenly_spaced(30, 4) == [0, 10, 19, 29]


def _layer_weight(model, i):
    return family_of(model).layers(model)[i].self_attn.q_proj.weight


@pytest.mark.parametrize("fusion, coeffs", [
    ("differential", [0.8, 0.1, 0.1]), ("anchor", [1.0, 0.0, 0.0]), ("average", [1 / 3] * 3)])
def test_fusion_variants_build_the_claimed_layer_weights(fusion, coeffs):
    base = tiny_model("llama", 4)
    sub = build_submodel(base, family_of(base), [[0, 1, 2], [3]], beta=0.1, fusion=fusion)
    expected = sum(c * _layer_weight(base, i) for c, i in zip(coeffs, (0, 1, 2)))
    torch.testing.assert_close(_layer_weight(sub, 0), expected)
    assert _layer_weight(sub, 1).data_ptr() == _layer_weight(base, 3).data_ptr()


def test_progfed_and_layerdrop_submodels_are_the_chosen_original_layers():
    base = tiny_model("llama", 6)
    for groups in ([[0], [1], [2]], [[0], [3], [5]]):
        sub = build_submodel(base, family_of(base), groups, beta=0.1)
        assert sub.config.num_hidden_layers == 3
        for n, (i,) in enumerate(groups):
            assert _layer_weight(sub, n).data_ptr() == _layer_weight(base, i).data_ptr()


def test_transfer_variants():
    sub = {0: {"q.lora_A.weight": torch.ones(2, 3), "q.lora_B.weight": torch.full((3, 2), 6.0)}}
    groups = [[1, 2, 4]]
    copy = transfer_layers(sub, groups, "copy")
    assert sorted(copy) == [1, 2, 4]
    assert torch.equal(copy[4]["q.lora_B.weight"], sub[0]["q.lora_B.weight"])
    scaled = transfer_layers(sub, groups, "scaled")
    torch.testing.assert_close(scaled[2]["q.lora_B.weight"], torch.full((3, 2), 2.0))
    assert torch.equal(scaled[2]["q.lora_A.weight"], sub[0]["q.lora_A.weight"])
    assert sorted(transfer_layers(sub, groups, "anchor")) == [1]
    assert transfer_layers(sub, groups, "none") == {}
    assert StagePlan(3, ((0,), (1,)), 0.1).transfer_for("none", 2) == "copy"  # last stage
    assert StagePlan(2, ((0, 1),), 0.1).transfer_for("none", 2) == "none"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_adds_b_times_a_to_the_base_weights(family):
    model = tiny_model(family, 2)
    fam = family_of(model)
    module_name = "self_attn.q_proj" if family == "llama" else "attn.c_attn"
    module = dict(fam.layers(model)[1].named_modules())[module_name]
    before = module.weight.detach().clone()
    out_dim = module.weight.shape[0] if family == "llama" else module.weight.shape[1]
    in_dim = module.weight.shape[1] if family == "llama" else module.weight.shape[0]
    a, b = torch.randn(3, in_dim), torch.randn(out_dim, 3)
    merge_layers(model, fam, {1: {f"{module_name}.lora_A.weight": a,
                                  f"{module_name}.lora_B.weight": b}})
    delta = b @ a if family == "llama" else (b @ a).T
    torch.testing.assert_close(module.weight.detach(), before + delta)
