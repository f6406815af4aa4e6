"""Held-out evaluation: a token-weighted mean over batches of different sizes, overall and per
category of the rows."""

import math

import pytest
import torch
from tiny import byte_tokenizer, tiny_model

from devft.config import DataConfig
from devft.data import IGNORE_INDEX, Record, collate, encode
from devft.training.evaluation import (
    categorized_heldout_batches,
    heldout_batches,
    heldout_loss,
    heldout_losses,
)
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


ROWS = [("What is 2+2?", "4", "math"), ("Name a river.", "The Amazon, the longest one", "geo"),
        ("Say a color.", "deep ocean blue", "color"), ("What is 3+5?", "eight", "math"),
        ("Name a city.", "Paris", "geo"), ("Count.", "one two three four", "math"),
        ("Say a color.", "red", "color")]


def _records(rows=ROWS):
    return [Record(q, "", a, c) for q, a, c in rows]


def test_per_category_losses_keep_the_overall_loss_to_the_bit():
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
    tok, cfg = byte_tokenizer(), DataConfig(max_seq_len=96, eval_batch_size=3)
    batches, names = categorized_heldout_batches(_records(), tok, cfg)
    assert [len(n) for n in names] == [3, 3, 1]  # batches mix categories
    assert all(len(n) == b["input_ids"].shape[0] for n, b in zip(names, batches))
    reference = heldout_batches(_records(), tok, cfg)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, reference) for k in a)

    overall, by_category = heldout_losses(model, batches, names)

    assert overall == heldout_loss(model, batches)  # bit for bit
    assert sorted(by_category) == ["color", "geo", "math"]
    for name, loss in by_category.items():  # each equals the loss of its rows alone
        alone = heldout_batches(_records([r for r in ROWS if r[2] == name]), tok, cfg)
        assert loss == pytest.approx(heldout_loss(model, alone), rel=1e-6)
    assert len(set(by_category.values())) == 3


def test_per_category_losses_skip_rows_without_responses():
    model = tiny_model("llama", num_layers=2)
    tok, cfg = byte_tokenizer(), DataConfig(max_seq_len=96, eval_batch_size=4)
    batches, names = categorized_heldout_batches(_records(), tok, cfg)
    empty = make_batch([("Say a color.", "blue")])
    empty["labels"] = torch.full_like(empty["labels"], IGNORE_INDEX)
    overall, by_category = heldout_losses(model, [*batches, empty], [*names, ["none"]])
    assert overall == heldout_loss(model, [*batches, empty])
    assert "none" not in by_category and len(by_category) == 3
    assert heldout_losses(model, [], [])[1] == {}
    with pytest.raises(ValueError, match="2 categories for a batch of 4 rows"):
        heldout_losses(model, batches[:1], [["math", "geo"]])
