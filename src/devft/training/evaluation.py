"""Held-out evaluation: token-weighted mean response loss over fixed batches, overall and per
category of the rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from devft.config import DataConfig
from devft.training.loss import IGNORE, response_logits, response_loss


@torch.no_grad()
def heldout_loss(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], precision: str = "fp32"
) -> float:
    """Mean cross-entropy per response token over all `batches` (nan if there are none)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = response_loss(model, batch, precision)
        total, count = total + float(loss_sum), count + n
    return total / count if count else math.nan


@torch.no_grad()
def heldout_losses(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
    categories: Sequence[Sequence[str]], precision: str = "fp32",
) -> tuple[float, dict[str, float]]:
    """(`heldout_loss` of `batches`, to the bit; {category: mean cross-entropy per response
    token of its rows}), from one forward pass per batch. `categories[b][i]` is the category
    of row i of batch b (`categorized_heldout_batches`); a category without a response token
    is left out. Both means weight every response token alike."""
    model.eval()
    total, count = 0.0, 0
    sums: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for batch, names in zip(batches, categories, strict=True):
        labels = batch["labels"]
        if len(names) != labels.shape[0]:
            raise ValueError(f"{len(names)} categories for a batch of {labels.shape[0]} rows")
        got = response_logits(model, batch, precision)
        if got is None:  # heldout_loss adds 0.0 and 0 tokens: the same total
            continue
        logits, targets = got
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")  # as response_loss
        total, count = total + float(loss_sum), count + int(targets.numel())
        per_token = F.cross_entropy(logits.float(), targets, reduction="none").double().cpu()
        rows = (labels[:, 1:] != IGNORE).nonzero()[:, 0]  # row of each target, row-major
        row_sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, rows, per_token)
        row_tokens = torch.bincount(rows, minlength=len(names))
        for name, s, n in zip(names, row_sums.tolist(), row_tokens.tolist()):
            if n:
                sums[name], tokens[name] = sums.get(name, 0.0) + s, tokens.get(name, 0) + n
    overall = total / count if count else math.nan
    return overall, {name: sums[name] / tokens[name] for name in sorted(sums)}


def heldout_batches(records: Sequence[Any], tokenizer,
                    cfg: DataConfig) -> list[dict[str, torch.Tensor]]:
    """The fixed evaluation batches of a run (its eval records), length-sorted."""
    return categorized_heldout_batches(records, tokenizer, cfg)[0]


def categorized_heldout_batches(
    records: Sequence[Any], tokenizer, cfg: DataConfig
) -> tuple[list[dict[str, torch.Tensor]], list[list[str]]]:
    """(`heldout_batches`' batches, the categories of each batch's rows in row order)."""
    from devft.data import encode, length_sorted_batches

    encoded = [encode(r, tokenizer, cfg.max_seq_len) for r in records]
    batches = length_sorted_batches(encoded, cfg.eval_batch_size, tokenizer.pad_token_id)
    # length_sorted_batches' own stable sort on the same keys: the same row order
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    names = [records[i].category for i in order]
    size = cfg.eval_batch_size
    return batches, [names[i : i + size] for i in range(0, len(names), size)]
