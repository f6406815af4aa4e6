"""Per-family adapters: where the decoder layers live, their LoRA keys, and shape detection."""

import pytest
from tiny import tiny_model
from transformers import AutoModelForCausalLM, Phi3Config, StableLmConfig

from devft.config import LoraSettings
from devft.errors import ModelError
from devft.models.families import FAMILIES, detect_family, family_of, get_attr
from devft.models.lora import attach_lora, get_lora_state

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")

FAMILY_CASES = {  # tiny model family -> (adapter name, layer list path)
    "llama": ("llama", "model.layers"),
    "qwen2": ("llama", "model.layers"),  # llama-like: same adapter
    "gpt2": ("gpt2", "transformer.h"),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers"),
}
SETTINGS = LoraSettings(r=2, alpha=4, dropout=0.0)


def stablelm(num_layers=3):
    """A decoder family that FAMILIES does not list."""
    cfg = StableLmConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_family_of_finds_the_decoder_layer_list(family):
    model = tiny_model(family, num_layers=3)
    adapter = family_of(model)
    name, path = FAMILY_CASES[family]
    assert adapter.name == name and adapter.layers_path == path
    layers = adapter.layers(model)
    assert layers is get_attr(model, path)
    assert len(layers) == 3 == getattr(model.config, adapter.num_layers_attr)
    for i, layer in enumerate(layers):  # every index attribute exists and holds the position
        for attr in adapter.layer_index_attrs:
            assert get_attr(layer, attr) == i


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_lora_prefix_matches_peft_state_dict_keys(family):
    model = tiny_model(family, num_layers=2)
    adapter = family_of(model)
    keys = list(get_lora_state(attach_lora(model, SETTINGS, adapter)))
    assert keys
    for key in keys:
        assert key.startswith(adapter.lora_prefix()), key
        assert key[len(adapter.lora_prefix()) :].split(".")[0] in {"0", "1"}, key
    # every default target is adapted in every layer (A and B each)
    prefixes = {k[len(adapter.lora_prefix()) :].split(".")[0] for k in keys}
    assert prefixes == {"0", "1"}
    for target in adapter.target_modules:
        assert any(f".{target}.lora_A." in k for k in keys), target


def test_phi3_adapter_targets_its_fused_projections():
    cfg = Phi3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    adapter = family_of(model)
    assert adapter.name == "phi3" and len(adapter.layers(model)) == 2
    keys = get_lora_state(attach_lora(model, SETTINGS, adapter))
    assert len(keys) == 2 * 2 * len(adapter.target_modules)  # layers x targets x {A, B}
    assert all(k.startswith(adapter.lora_prefix()) for k in keys)


def test_detect_family_on_an_unlisted_model_type():
    model = stablelm(num_layers=3)
    assert "stablelm" not in FAMILIES

    adapter = family_of(model)

    assert adapter.name == "stablelm" and adapter.layers_path == "model.layers"
    assert adapter.layers(model) is model.model.layers
    assert adapter.layer_index_attrs == ("self_attn.layer_idx",)
    assert set(adapter.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    keys = get_lora_state(attach_lora(model, SETTINGS, adapter))
    assert len(keys) == 3 * 7 * 2 and all(k.startswith(adapter.lora_prefix()) for k in keys)


def test_family_of_falls_back_to_detection_for_unregistered_types(monkeypatch):
    model = tiny_model("gpt_neox", num_layers=2)
    monkeypatch.delitem(FAMILIES, "gpt_neox")

    adapter = family_of(model)

    assert adapter is not None and adapter.layers_path == "gpt_neox.layers"
    assert adapter.layer_index_attrs == ("attention.layer_idx",)
    assert set(adapter.target_modules) == {
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
    }


def test_detect_family_without_a_layer_list_raises_model_error():
    model = stablelm(num_layers=3)
    model.config.num_hidden_layers = 5  # no ModuleList of 5 layers anywhere

    with pytest.raises(ModelError, match="stablelm.*not a supported decoder") as err:
        detect_family(model)
    assert "llama" in str(err.value) and "gpt2" in str(err.value)  # lists what is supported


def test_detect_family_without_a_layer_count_raises_model_error():
    model = stablelm(num_layers=2)
    del model.config.num_hidden_layers

    with pytest.raises(ModelError, match="not a supported decoder"):
        detect_family(model)
