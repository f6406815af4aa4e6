"""Response-only language-modelling loss, computing the LM head only where the loss needs it.

Position t predicts token t+1, so only positions whose next label is a response token need
logits. Passing that boolean mask as `logits_to_keep` makes the HF model project just those
hidden states onto the vocabulary (for a 49k-vocab head this is most of the cost of a small
submodel). The result equals the full-logits loss (tested).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA when precision == "bf16", else a no-op."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def response_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], precision: str = "fp32"
) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over response tokens, number of such tokens).

    Args:
        batch: input_ids, attention_mask, labels, each (B, T); labels = -100 off-response.
    """
    got = response_logits(model, batch, precision)
    if got is None:
        device = next(model.parameters()).device
        return torch.zeros((), device=device, requires_grad=model.training), 0
    logits, targets = got
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, int(targets.numel())


def response_logits(
    model: nn.Module, batch: dict[str, torch.Tensor], precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits (N, V), targets (N,)) at the N positions whose next token is a response
    token, in row-major order (row by row, position by position); None when N = 0."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): position t predicts t+1
    keep[:, :-1] = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep[:, :-1]]  # (N,)
    if targets.numel() == 0:
        return None
    with autocast(device, precision):
        out = model(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"].to(device),
            logits_to_keep=keep,
            use_cache=False,
        )
    return out.logits.reshape(-1, out.logits.shape[-1]), targets  # (N, V), (N,)


def full_logits_response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Reference: the same mean loss from full logits (HF's own shifted CE); for tests."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    return float(out.loss)
