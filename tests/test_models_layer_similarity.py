"""Layer-similarity matrices: effective-weight cosine and hidden-state cosine."""

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from devft.config import LoraSettings
from devft.data import Record, collate, encode
from devft.models.families import family_of
from devft.models.layer_similarity import hidden_similarity, weight_similarity
from devft.models.lora import attach_lora, get_lora_state, set_lora_state

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")

SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
TARGETS = ["self_attn.q_proj", "self_attn.v_proj"]


@pytest.fixture
def peft():
    model = tiny_model("llama", num_layers=4)
    return attach_lora(model, SETTINGS, family_of(model))


def set_random_b(peft, scale=0.5):
    gen = torch.Generator().manual_seed(3)
    state = {
        k: v if "lora_A" in k else scale * torch.randn(v.shape, generator=gen)
        for k, v in get_lora_state(peft).items()
    }
    set_lora_state(peft, state)
    return state


def assert_similarity_matrix(sim, n):
    assert sim.shape == (n, n)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(n, dtype=sim.dtype))
    assert sim.abs().max() <= 1 + 1e-9


def batch(tokenizer, pairs):
    records = [Record(q, "", a, "c") for q, a in pairs]
    return collate([encode(r, tokenizer, 64) for r in records], tokenizer.pad_token_id)


def test_weight_similarity_is_a_cosine_matrix(peft):
    sim = weight_similarity(peft, family_of(peft.base_model.model))

    assert_similarity_matrix(sim, 4)
    off = sim[~torch.eye(4, dtype=torch.bool)]
    assert (off.abs() < 0.99).all()  # random layers are not identical


def test_weight_similarity_uses_effective_weights_with_the_lora_delta(peft):
    family = family_of(peft.base_model.model)
    before = weight_similarity(peft, family)
    state = set_random_b(peft)

    sim = weight_similarity(peft, family)

    assert not torch.allclose(sim, before, atol=1e-4)
    layers = family.layers(peft.base_model.model)
    scale = SETTINGS.alpha / SETTINGS.r

    def flat(i):  # W0 + (alpha / r) * B @ A over the LoRA-targeted modules of layer i
        parts = []
        for target in TARGETS:
            w0 = layers[i].get_submodule(target).base_layer.weight.detach()
            key = f"base_model.model.model.layers.{i}.{target}.lora_"
            parts.append((w0 + scale * state[key + "B.weight"] @ state[key + "A.weight"]).flatten())
        return torch.cat(parts).double()

    for i, j in [(0, 2), (1, 3)]:
        expected = flat(i) @ flat(j) / (flat(i).norm() * flat(j).norm())
        torch.testing.assert_close(sim[i, j], expected, rtol=1e-6, atol=1e-7)


def test_hidden_similarity_is_a_cosine_matrix_of_layer_outputs(peft):
    tokenizer = byte_tokenizer()
    b = batch(tokenizer, [("What is 2+2?", "4"), ("Name a long river please.", "Nile")])
    assert (b["attention_mask"] == 0).any()  # right padding present
    family = family_of(peft.base_model.model)

    sim = hidden_similarity(peft, family, b)

    assert_similarity_matrix(sim, 4)
    # layer 0 vs 1 by hand: mean over real tokens of the per-token cosine;
    # hidden_states[k + 1] is layer k's output (before the final norm)
    with torch.no_grad():
        hidden = peft(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
        ).hidden_states
    mask = b["attention_mask"].bool()
    h0, h1 = hidden[1][mask].double(), hidden[2][mask].double()  # (N, d) real tokens
    per_token = (h0 * h1).sum(-1) / (h0.norm(dim=-1) * h1.norm(dim=-1))
    torch.testing.assert_close(sim[0, 1], per_token.mean())


def test_hidden_similarity_ignores_padded_positions(peft):
    tokenizer = byte_tokenizer()
    b = batch(tokenizer, [("What is 2+2?", "4"), ("Name a long river please.", "Nile")])
    family = family_of(peft.base_model.model)
    sim = hidden_similarity(peft, family, b)
    extra = 7  # append padded columns holding arbitrary tokens
    padded = {
        "input_ids": torch.cat([b["input_ids"], torch.randint(0, 256, (2, extra))], dim=1),
        "attention_mask": torch.cat(
            [b["attention_mask"], torch.zeros(2, extra, dtype=torch.long)], dim=1
        ),
    }

    sim_padded = hidden_similarity(peft, family, padded)

    torch.testing.assert_close(sim_padded, sim, rtol=1e-5, atol=1e-6)


def test_weight_similarity_transposes_conv1d_deltas_for_gpt2():
    # GPT-2's Conv1D stores weights as (in, out); PEFT's delta must be laid out the same way
    model = tiny_model("gpt2", num_layers=3)
    family = family_of(model)
    settings = LoraSettings(r=2, alpha=6, dropout=0.0, target_modules=["c_attn", "c_fc"])
    peft = attach_lora(model, settings, family)
    set_random_b(peft)

    sim = weight_similarity(peft, family)

    assert_similarity_matrix(sim, 3)
    layers = family.layers(peft.base_model.model)

    def flat(i):
        parts = []
        for target in ["attn.c_attn", "mlp.c_fc"]:
            module = layers[i].get_submodule(target)
            w0 = module.base_layer.weight.detach()  # (in, out)
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight  # (out, in)
            assert delta.T.shape == w0.shape != delta.shape
            parts.append((w0 + settings.alpha / settings.r * delta.T).detach().flatten())
        return torch.cat(parts).double()

    expected = flat(0) @ flat(2) / (flat(0).norm() * flat(2).norm())
    torch.testing.assert_close(sim[0, 2], expected, rtol=1e-6, atol=1e-7)
