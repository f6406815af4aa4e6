"""Held-out evaluation: a token-weighted mean over batches of different sizes."""

import math

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from devft.data import IGNORE_INDEX, Record, collate, encode
from devft.training.evaluation import heldout_loss
from devft.training.loss import full_logits_response_loss


def make_batch(pairs):
    tok = byte_tokenizer()
    records = [Record(q, "", a, "c") for q, a in pairs]
    return collate([encode(r, tok, 96) for r in records], tok.pad_token_id)


def test_heldout_loss_is_token_weighted_over_batches():
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)  # spread the per-batch losses apart
    small = make_batch([("What is 2+2?", "4")])
    large = make_batch(
        [
            ("Name a river.", "The Amazon, the longest one"),
            ("Say a color.", "deep ocean blue"),
            ("Count.", "one two three four"),
        ]
    )
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in (small, large)]
    with torch.no_grad():
        means = [full_logits_response_loss(model, b) for b in (small, large)]
    expected = (means[0] * counts[0] + means[1] * counts[1]) / sum(counts)

    loss = heldout_loss(model, [small, large])

    assert loss == pytest.approx(expected, rel=1e-5)
    assert counts[0] != counts[1]
    assert abs(loss - sum(means) / 2) > 1e-3  # not the plain mean of the batch means


def test_heldout_loss_skips_batches_without_responses_and_is_nan_when_empty():
    model = tiny_model("llama", num_layers=2)
    batch = make_batch([("What is 2+2?", "4")])
    empty = make_batch([("Say a color.", "blue")])
    empty["labels"] = torch.full_like(empty["labels"], IGNORE_INDEX)

    assert heldout_loss(model, [batch, empty]) == pytest.approx(heldout_loss(model, [batch]))
    assert math.isnan(heldout_loss(model, []))
    assert math.isnan(heldout_loss(model, [empty]))
