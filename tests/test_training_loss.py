"""Response-only loss with a boolean `logits_to_keep`, checked against HF's full-logits loss."""

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from devft.config import LoraSettings
from devft.data import IGNORE_INDEX, Record, collate, encode
from devft.models.families import family_of
from devft.models.lora import attach_lora, get_lora_state, set_lora_state
from devft.training.loss import full_logits_response_loss, response_loss

RECORDS = [
    Record("What is 2+2?", "", "4", "m"),
    Record("Name the capital.", "France", "Paris is the capital", "g"),
    Record("Say a color.", "", "blue", "c"),
]


def make_batch(records=RECORDS, max_len=96):
    tok = byte_tokenizer()
    return collate([encode(r, tok, max_len) for r in records], tok.pad_token_id)


def response_count(batch):
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_response_loss_equals_full_logits_loss(family):
    model = tiny_model(family, num_layers=2)
    batch = make_batch()
    lengths = batch["attention_mask"].sum(1)
    assert lengths.unique().numel() == 3  # right padding of different widths
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()  # prompts are masked

    with torch.no_grad():
        loss_sum, n = response_loss(model, batch)
        expected = full_logits_response_loss(model, batch)

    assert n == response_count(batch) > 0
    assert loss_sum.ndim == 0
    assert float(loss_sum) / n == pytest.approx(expected, rel=1e-5)


def test_response_loss_without_response_tokens_is_empty():
    model = tiny_model("llama", num_layers=2)
    batch = make_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)

    loss_sum, n = response_loss(model, batch)

    assert n == 0 and float(loss_sum) == 0.0


def test_only_the_last_label_is_not_a_target():
    # a response token at position 0 has no predicting position; only labels[1:] count
    model = tiny_model("llama", num_layers=2)
    batch = make_batch(RECORDS[:1])
    batch["labels"] = batch["input_ids"].clone()

    with torch.no_grad():
        loss_sum, n = response_loss(model, batch)
        expected = full_logits_response_loss(model, batch)

    assert n == batch["input_ids"].shape[1] - 1
    assert float(loss_sum) / n == pytest.approx(expected, rel=1e-5)


def test_gradients_flow_only_into_lora():
    model = tiny_model("llama", num_layers=2)
    peft = attach_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0), family_of(model))
    gen = torch.Generator().manual_seed(0)
    set_lora_state(
        peft,
        {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in get_lora_state(peft).items()},
    )
    peft.train()

    loss_sum, n = response_loss(peft, make_batch())
    (loss_sum / n).backward()

    for name, p in peft.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
