"""Stage submodels: one real HF decoder layer per group, fused or shared with the base."""

import pytest
import torch
from tiny import byte_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, Olmo3Config

from devft.config import LoraSettings
from devft.data import Record, collate, encode
from devft.models.families import family_of, get_attr
from devft.models.loading import BaseModel
from devft.models.lora import attach_lora, get_lora_state, set_lora_state
from devft.models.submodel import (
    StagePlan,
    build_submodel,
    frozen_parameter_bytes,
    layer_count,
    stage_model,
)
from devft.training.loss import response_loss

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")

FAMILIES = ["llama", "qwen2", "gpt2", "gpt_neox"]
GROUPS = [[0, 1], [2], [3]]  # one fused group, two one-layer groups
BETA = 0.3
SETTINGS = LoraSettings(r=2, alpha=4, dropout=0.0)


def base_model(family):
    """A tiny 4-layer model whose norm weights and biases are random (not all ones/zeros),
    so fusing them is visible."""
    model = tiny_model(family, num_layers=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batch(n=2):
    tok = byte_tokenizer()
    records = [Record("What is 2+2?", "", "4", "m"), Record("Name a color.", "", "blue", "c")]
    return collate([encode(r, tok, 64) for r in records[:n]], tok.pad_token_id)


def num_layers_in_config(model, family):
    return getattr(model.config, family.num_layers_attr)


def assert_base_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---- StagePlan ------------------------------------------------------------------------------


def test_stage_plan_properties():
    plan = StagePlan(1, ((0, 1), (2,), (3,)), 0.1)
    assert plan.num_layers == 3 and not plan.is_full(4)
    assert plan.group_lists() == [[0, 1], [2], [3]]
    full = StagePlan.full(4, stage=3)
    assert full.groups == ((0,), (1,), (2,), (3,)) and full.is_full(4) and not full.is_full(5)
    assert full.stage == 3 and full.beta == 0.0


# ---- structure --------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name", FAMILIES)
def test_submodel_has_one_reindexed_layer_per_group(family_name):
    model = base_model(family_name)
    family = family_of(model)
    base_layers = list(family.layers(model))

    sub = build_submodel(model, family, GROUPS, BETA)

    layers = family.layers(sub)
    assert len(layers) == layer_count(sub, family) == len(GROUPS)
    assert num_layers_in_config(sub, family) == len(GROUPS)
    # every module holding a config sees the new layer count (the inner model reads its own)
    for module in sub.modules():
        if getattr(module, "config", None) is not None:
            assert num_layers_in_config(module, family) == len(GROUPS), type(module).__name__
    for n, layer in enumerate(layers):
        assert layer is not base_layers[GROUPS[n][0]]  # new module objects
        for attr in family.layer_index_attrs:
            assert get_attr(layer, attr) == n
    # the base model is untouched: same layer objects, indices and layer count
    assert list(family.layers(model)) == base_layers and len(base_layers) == 4
    assert sub.config is not model.config
    for module in model.modules():
        if getattr(module, "config", None) is not None:
            assert num_layers_in_config(module, family) == 4, type(module).__name__
    for i, layer in enumerate(base_layers):
        for attr in family.layer_index_attrs:
            assert get_attr(layer, attr) == i


@pytest.mark.parametrize("family_name", FAMILIES)
def test_fused_layer_follows_the_differential_formula(family_name):
    model = base_model(family_name)
    family = family_of(model)
    base = [dict(layer.named_parameters()) for layer in family.layers(model)]

    sub = build_submodel(model, family, GROUPS, BETA)

    fused = dict(family.layers(sub)[0].named_parameters())
    assert fused.keys() == base[0].keys()
    assert any("norm" in name or "ln_" in name for name in fused)  # norms are fused too
    for name, tensor in fused.items():
        anchor = base[0][name].detach()
        expected = anchor + BETA * sum(base[j][name].detach() - anchor for j in GROUPS[0])
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(tensor, anchor), name  # not just the anchor


@pytest.mark.parametrize("family_name", FAMILIES)
def test_one_layer_groups_share_storage_and_fused_ones_do_not(family_name):
    model = base_model(family_name)
    family = family_of(model)
    base_ptrs = {p.data_ptr() for p in model.parameters()}

    sub = build_submodel(model, family, GROUPS, BETA)

    sub_layers, base_layers = family.layers(sub), family.layers(model)
    for n, group in enumerate(GROUPS):
        params = dict(sub_layers[n].named_parameters())
        if len(group) == 1:
            base_params = dict(base_layers[group[0]].named_parameters())
            assert all(params[k].data_ptr() == base_params[k].data_ptr() for k in params)
        else:
            assert all(p.data_ptr() not in base_ptrs for p in params.values())
    # everything outside the layer list (embeddings, final norm, head) is the base's own
    layer_ptrs = {p.data_ptr() for p in sub_layers.parameters()}
    outside = [p for p in sub.parameters() if p.data_ptr() not in layer_ptrs]
    assert outside and all(p.data_ptr() in base_ptrs for p in outside)
    # frozen bytes: the base's, less the one layer that the fused group replaces
    layer_bytes = sum(p.numel() * p.element_size() for p in base_layers[1].parameters())
    assert (
        frozen_parameter_bytes(sub)
        == frozen_parameter_bytes(model.requires_grad_(False)) - layer_bytes
    )


@pytest.mark.parametrize("family_name", FAMILIES)
def test_singleton_groups_reproduce_the_base_logits(family_name):
    model = base_model(family_name)
    family = family_of(model)
    b = batch()
    with torch.no_grad():
        expected = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    sub = build_submodel(model, family, [[i] for i in range(4)], beta=0.5)

    with torch.no_grad():
        logits = sub(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_submodel_forward_loss_and_generate(family_name):
    model = base_model(family_name)
    family = family_of(model)
    b = batch()

    sub = build_submodel(model, family, [[0, 1], [2, 3]], BETA)

    with torch.no_grad():
        out = sub(**b)
        loss_sum, n = response_loss(sub, b)
    assert out.logits.shape == (*b["input_ids"].shape, sub.config.vocab_size)
    assert torch.isfinite(out.loss) and n > 0
    torch.testing.assert_close(loss_sum / n, out.loss)
    # generate with the KV cache: each step's logits equal a cache-free forward's
    prompt = b["input_ids"][:1, :20]
    gen = sub.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=257,
    )
    assert gen.sequences.shape == (1, 23)
    with torch.no_grad():
        full = sub(input_ids=gen.sequences, use_cache=False).logits
    for k, step_logits in enumerate(gen.logits):
        torch.testing.assert_close(step_logits[0], full[0, 19 + k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family_name", FAMILIES)
def test_base_frozen_and_bit_identical_after_build_and_a_training_step(family_name):
    model = base_model(family_name)
    family = family_of(model)
    before = snapshot(model)

    sub = build_submodel(model, family, GROUPS, BETA)
    assert all(not p.requires_grad for p in sub.parameters())
    assert_base_unchanged(model, before)

    peft = attach_lora(sub, SETTINGS, family)
    trainable = [name for name, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    peft.train()
    loss_sum, n = response_loss(peft, batch())
    (loss_sum / n).backward()
    opt.step()

    assert any(v.abs().sum() > 0 for k, v in get_lora_state(peft).items() if "lora_B" in k)
    assert_base_unchanged(model, before)
    assert len(family.layers(model)) == 4 and num_layers_in_config(model, family) == 4


# ---- per-layer config -------------------------------------------------------------------------


def olmo3_config(num_layers, layer_types):
    return Olmo3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=3,
        layer_types=layer_types,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def test_per_layer_attention_types_follow_the_groups():
    # olmo3 is not in FAMILIES (detected by shape) and mixes sliding and full attention
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    model = AutoModelForCausalLM.from_config(olmo3_config(4, types)).eval()
    family = family_of(model)
    # reference: a native 2-layer model holding base layers 1 (full) and 2 (sliding)
    native = AutoModelForCausalLM.from_config(olmo3_config(2, types[1:3])).eval()
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    for new, old in enumerate([1, 2]):
        state.update(
            {
                k.replace(f".layers.{old}.", f".layers.{new}."): v
                for k, v in model.state_dict().items()
                if f".layers.{old}." in k
            }
        )
    native.load_state_dict(state)
    ids = torch.randint(2, 64, (2, 12))  # longer than the sliding window

    sub = build_submodel(model, family, [[1], [2]], BETA)

    assert sub.config.layer_types == types[1:3]
    with torch.no_grad():
        torch.testing.assert_close(sub(input_ids=ids).logits, native(input_ids=ids).logits)
        gen = sub.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=1)
        ref = native.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(gen, ref)


# ---- stage_model cache --------------------------------------------------------------------------


def test_stage_model_is_cached_per_plan_and_ignores_beta_without_fusion():
    model = base_model("llama").requires_grad_(False)
    base = BaseModel(
        model, byte_tokenizer(), family_of(model), "tiny-stage-cache", torch.device("cpu")
    )
    fused = StagePlan(1, ((0, 1), (2, 3)), 0.1)

    first = stage_model(base, fused, SETTINGS)

    assert stage_model(base, fused, SETTINGS) is first
    assert layer_count(first.base_model.model, base.family) == 2
    other_beta = stage_model(base, StagePlan(1, ((0, 1), (2, 3)), 0.2), SETTINGS)
    assert other_beta is not first
    full = stage_model(base, StagePlan.full(4), SETTINGS)
    assert stage_model(base, StagePlan(2, ((0,), (1,), (2,), (3,)), 0.7), SETTINGS) is full
    # a cached model takes whatever adapter is loaded into it
    state = {k: torch.full_like(v, 0.01) for k, v in get_lora_state(first).items()}
    set_lora_state(first, state)
    assert all(torch.equal(v, state[k]) for k, v in get_lora_state(first).items())
