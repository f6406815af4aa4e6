"""Per-layer split and join of flat (PEFT-style) state dicts."""

import torch

from devft.core.layerstate import join_layers, split_by_layer

PREFIX = "base_model.model.model.layers."


def peft_state():
    state = {}
    for i in [0, 1, 2, 10, 11]:  # 10 and 11 test numeric (not lexicographic) indices
        for mod in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]:
            for ab in ["lora_A", "lora_B"]:
                state[f"{PREFIX}{i}.{mod}.{ab}.weight"] = torch.randn(2, 3)
    state["base_model.model.model.embed_tokens.weight"] = torch.randn(5, 3)
    state["base_model.model.model.norm.weight"] = torch.randn(3)
    state["base_model.model.lm_head.weight"] = torch.randn(5, 3)
    state["base_model.model.model.layers_extra.0.weight"] = torch.randn(1)  # not the prefix
    state[f"{PREFIX}rotary.inv_freq"] = torch.randn(2)  # under the prefix, not a layer index
    return state


def test_split_by_layer_groups_by_index():
    state = peft_state()
    layers, rest = split_by_layer(state, PREFIX)
    assert sorted(layers) == [0, 1, 2, 10, 11]
    assert all(isinstance(i, int) for i in layers)
    assert sorted(layers[10]) == sorted(
        f"{mod}.{ab}.weight"
        for mod in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
        for ab in ["lora_A", "lora_B"]
    )
    assert (
        layers[2]["mlp.down_proj.lora_B.weight"] is state[f"{PREFIX}2.mlp.down_proj.lora_B.weight"]
    )
    assert set(rest) == {
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.model.norm.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers_extra.0.weight",
        f"{PREFIX}rotary.inv_freq",
    }


def test_split_join_round_trip():
    state = peft_state()
    layers, rest = split_by_layer(state, PREFIX)
    joined = join_layers(layers, PREFIX, rest)
    assert set(joined) == set(state)
    for key, value in state.items():
        assert joined[key] is value


def test_join_orders_layers_numerically_and_without_rest():
    layers = {
        10: {"w": torch.zeros(1)},
        2: {"w": torch.ones(1)},
        0: {"a": torch.ones(1), "b": torch.ones(1)},
    }
    joined = join_layers(layers, "model.layers.")
    assert list(joined) == [
        "model.layers.0.a",
        "model.layers.0.b",
        "model.layers.2.w",
        "model.layers.10.w",
    ]


def test_join_does_not_modify_rest():
    rest = {"lm_head.weight": torch.ones(1)}
    joined = join_layers({0: {"w": torch.zeros(1)}}, "layers.", rest)
    assert rest == {"lm_head.weight": rest["lm_head.weight"]} and len(rest) == 1
    assert set(joined) == {"lm_head.weight", "layers.0.w"}


def test_split_with_other_family_prefix():
    state = {
        "transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(1),
        "transformer.h.3.mlp.c_fc.lora_B.weight": torch.ones(1),
        "transformer.wte.weight": torch.ones(1),
    }
    layers, rest = split_by_layer(state, "transformer.h.")
    assert set(layers) == {0, 3}
    assert list(layers[3]) == ["mlp.c_fc.lora_B.weight"]
    assert list(rest) == ["transformer.wte.weight"]
    assert join_layers(layers, "transformer.h.", rest).keys() == state.keys()


def test_split_empty():
    assert split_by_layer({}, PREFIX) == ({}, {})
