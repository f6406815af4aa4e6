"""Held-out evaluation: token-weighted mean response loss over fixed batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from devft.config import DataConfig
from devft.training.loss import response_loss


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


def heldout_batches(records: Sequence[Any], tokenizer,
                    cfg: DataConfig) -> list[dict[str, torch.Tensor]]:
    """The fixed evaluation batches of a run (its eval records), length-sorted."""
    from devft.data import encode, length_sorted_batches

    encoded = [encode(r, tokenizer, cfg.max_seq_len) for r in records]
    return length_sorted_batches(encoded, cfg.eval_batch_size, tokenizer.pad_token_id)
