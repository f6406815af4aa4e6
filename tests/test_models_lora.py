"""LoRA through peft: attach, target validation, seeded init, and the adapter as a state dict."""

import pytest
import torch
from tiny import tiny_model

from devft.config import LoraSettings
from devft.errors import ConfigError
from devft.models.families import family_of
from devft.models.lora import (
    attach_lora,
    get_lora_state,
    lora_parameter_count,
    seeded_lora_init,
    set_lora_state,
    target_modules,
)

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 33, 10]])


@pytest.fixture
def peft():
    model = tiny_model("llama", num_layers=4)
    return attach_lora(model, SETTINGS, family_of(model))


def random_state(peft, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in get_lora_state(peft).items()}


def test_lora_state_has_a_and_b_per_target_and_layer(peft):
    state = get_lora_state(peft)
    assert len(state) == 4 * 2 * 2  # layers x targets x {A, B}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert state[key].shape == (4, 16) and state[key].dtype == torch.float32
    # per layer: q_proj 16->16 and v_proj 16->8 (2 kv heads of 4), A (r, in) + B (out, r)
    assert lora_parameter_count(state) == 4 * ((4 * 16 + 16 * 4) + (4 * 16 + 8 * 4))
    # only LoRA is trainable
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_get_set_round_trip(peft):
    state = random_state(peft)

    set_lora_state(peft, state)
    got = get_lora_state(peft)

    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    got[next(iter(got))].add_(1.0)  # a detached copy: editing it leaves the model alone
    assert all(torch.equal(v, state[k]) for k, v in get_lora_state(peft).items())


def test_set_lora_state_rejects_missing_keys(peft):
    state = random_state(peft)
    missing = next(iter(state))
    del state[missing]
    before = get_lora_state(peft)

    with pytest.raises(ValueError, match="missing .*" + missing.replace(".", r"\.")):
        set_lora_state(peft, state)
    assert all(torch.equal(v, before[k]) for k, v in get_lora_state(peft).items())


def test_set_lora_state_rejects_extra_keys(peft):
    state = random_state(peft)
    state["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 16)

    with pytest.raises(ValueError, match=r"extra .*layers\.9.*\(0 missing, 1 extra\)"):
        set_lora_state(peft, state)


def test_seeded_init_is_deterministic_per_seed(peft):
    rng_before = torch.random.get_rng_state()

    a, again = seeded_lora_init(peft, 7), seeded_lora_init(peft, 7)
    other = seeded_lora_init(peft, 8)

    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    assert a.keys() == get_lora_state(peft).keys()
    assert all(torch.equal(a[k], again[k]) for k in a)
    for key, value in a.items():
        if ".lora_B." in key:
            assert torch.count_nonzero(value) == 0
        else:
            assert torch.count_nonzero(value) == value.numel()
            assert not torch.equal(value, other[key])
            bound = 1 / value.shape[1] ** 0.5  # kaiming-uniform(a=sqrt 5) = U(±1/sqrt(fan_in))
            assert value.abs().max() <= bound


def test_lora_state_matches_peft_and_follows_replaced_parameters(peft):
    from peft import get_peft_model_state_dict

    reference = get_peft_model_state_dict(peft)
    state = get_lora_state(peft)  # through the cached key -> parameter map
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    key = next(k for k in state if ".lora_B." in k)
    module = peft.get_submodule(key.rsplit(".", 1)[0])["default"]
    module.weight = torch.nn.Parameter(torch.full_like(module.weight, 7.0))  # a new object
    assert torch.equal(get_lora_state(peft)[key], torch.full_like(state[key], 7.0))
    set_lora_state(peft, state)
    assert torch.equal(module.weight, state[key])
    with pytest.raises(ValueError, match="has shape"):
        set_lora_state(peft, {**state, key: torch.zeros(3, 3)})


def test_zero_b_lora_leaves_the_base_logits_unchanged():
    model = tiny_model("llama", num_layers=4)
    with torch.no_grad():
        expected = model(IDS).logits
    peft = attach_lora(model, SETTINGS, family_of(model))

    set_lora_state(peft, seeded_lora_init(peft, 0))
    with torch.no_grad():
        logits = peft(IDS).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)

    set_lora_state(peft, random_state(peft))  # and a non-zero B does change them
    with torch.no_grad():
        assert not torch.allclose(peft(IDS).logits, expected, atol=1e-3)


def test_unknown_target_module_raises_config_error():
    model = tiny_model("llama", num_layers=2)
    settings = LoraSettings(target_modules=["q_proj", "qkv"])

    with pytest.raises(ConfigError, match="lora.target_modules") as err:
        attach_lora(model, settings, family_of(model))
    assert err.value.field == "lora.target_modules" and err.value.value == ["qkv"]
    assert "q_proj" in err.value.allowed and "down_proj" in err.value.allowed


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_empty_targets_default_to_the_family_projections(family):
    model = tiny_model(family, num_layers=2)
    adapter = family_of(model)
    assert target_modules(LoraSettings(), adapter, model) == list(adapter.target_modules)
