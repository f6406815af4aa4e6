"""Held-out response loss and perplexity on the rows a run kept out of training.

`heldout_records(name, n, fraction, seed)` picks the same rows as a run's per-round
evaluation (`FederatedData.eval_indices`: a stratified sample of the held-out split), so with
the run's `data.eval_examples` the loss equals the run's final `eval_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from devft.data.formatting import encode, length_sorted_batches
from devft.data.records import Record, load_records
from devft.data.splits import heldout_split, stratified_sample
from devft.training.loss import response_loss


def heldout_records(name: str, n: int, heldout_fraction: float, seed: int) -> list[Record]:
    """`n` held-out rows of data set `name`, stratified over categories (as a run picks them)."""
    records = load_records(name)
    _, heldout = heldout_split(records, heldout_fraction, seed)
    picks = stratified_sample(heldout, [r.category for r in records], n, seed)
    return [records[i] for i in picks]


@torch.no_grad()
def heldout_perplexity(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    max_len: int = 256,
    batch_size: int = 16,
    precision: str = "fp32",
) -> dict[str, Any]:
    """{loss, perplexity, examples, tokens}: token-weighted mean response cross-entropy.

    Records are encoded as in training (chat template, loss on the response + eos only);
    perplexity = exp(loss). The same number as `training.evaluation.heldout_loss` on the same
    batches, plus the token count.
    """
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode(r, tokenizer, max_len) for r in records]
    total, count = 0.0, 0
    for batch in length_sorted_batches(encoded, batch_size, int(pad_id)):
        loss_sum, n = response_loss(model, batch, precision)
        total, count = total + float(loss_sum), count + n
    loss = total / count if count else math.nan
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if count else math.nan,
        "examples": len(records),
        "tokens": count,
    }
