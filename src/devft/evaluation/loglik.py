"""Batched log-likelihood of continuations given a shared context.

For each request the result is, per choice, sum_t log p(cont_t | context, cont_<t): the
lm-eval-harness `loglikelihood`. Only positions that predict a continuation token go through
the LM head (a boolean `logits_to_keep`, see `devft.training.loss`).

Two equivalent paths (equal up to float rounding; tested):

- ``cache_context=True``: one forward over the batch's contexts (right-padded, with
  KV cache), whose last position scores every choice's first token; then one forward over all
  choices' remaining tokens on top of the cached contexts (the cache rows are gathered per
  choice; padding holes are masked, positions passed explicitly). A context shared by k
  choices is computed once instead of k times, and single-token choices (BoolQ) need no
  second forward.
- ``cache_context=False``: every (context + choice) sequence in full, right-padded.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from devft.evaluation.requests import Request
from devft.training.loss import autocast

log = logging.getLogger(__name__)

CACHE_GAIN = 0.75
"""`cache_context=None` shares contexts when that needs < this share of the padded tokens."""


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) int64 tensors, width = longest row (>= 1)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = 1
    return ids, mask


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[n, targets[n]] for (N, V) logits, in float32."""
    logits = logits.float()
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def _positions(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids 0.. (or start..) per row; 0 at padding (unused, kept in range)."""
    pos = torch.arange(mask.shape[1], dtype=torch.int64).expand_as(mask)
    return (pos if start is None else pos + start[:, None]) * mask


def _cache_kwarg(model: nn.Module) -> str:
    """`cache` (transformers >= 5.2x) or the older `past_key_values` forward argument."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _output_cache(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _sum_by_choice(values: torch.Tensor, owners: list[int], count: int) -> list[float]:
    out = torch.zeros(count, dtype=torch.float64)
    out.index_add_(0, torch.tensor(owners, dtype=torch.int64), values.double().cpu())
    return out.tolist()


def _cached_batch(
    model: nn.Module, batch: Sequence[Request], pad_id: int, precision: str
) -> list[float]:
    """Per choice (flattened in request order): summed log-prob, sharing each context."""
    device = next(model.parameters()).device
    ctx_ids, ctx_mask = _pad([r.context for r in batch], pad_id)
    ctx_len = ctx_mask.sum(1)
    last = torch.zeros_like(ctx_mask, dtype=torch.bool)
    last[torch.arange(len(batch)), ctx_len - 1] = True
    with autocast(device, precision):
        out = model(
            input_ids=ctx_ids.to(device),
            attention_mask=ctx_mask.to(device),
            position_ids=_positions(ctx_mask).to(device),
            logits_to_keep=last.to(device),
            use_cache=True,
        )
    choice_row = [b for b, r in enumerate(batch) for _ in r.continuations]
    conts = [c for r in batch for c in r.continuations]
    first = torch.tensor([c[0] for c in conts], device=device)
    first_lp = _token_logprobs(out.logits[torch.tensor(choice_row, device=device)], first)
    totals = first_lp.double().cpu()
    rest = [j for j, c in enumerate(conts) if len(c) > 1]
    if not rest:
        return totals.tolist()
    cache = _output_cache(out)
    rows = torch.tensor([choice_row[j] for j in rest], dtype=torch.int64)
    cache.batch_select_indices(rows.to(device))
    inputs, in_mask = _pad([conts[j][:-1] for j in rest], pad_id)
    targets, _ = _pad([conts[j][1:] for j in rest], pad_id)
    keep = in_mask.bool()
    with autocast(device, precision):
        out = model(
            input_ids=inputs.to(device),
            attention_mask=torch.cat([ctx_mask[rows], in_mask], dim=1).to(device),
            position_ids=_positions(in_mask, ctx_len[rows]).to(device),
            logits_to_keep=keep.to(device),
            use_cache=True,
            **{_cache_kwarg(model): cache},
        )
    lp = _token_logprobs(out.logits, targets[keep].to(device))
    owners = torch.tensor(rest).repeat_interleave(keep.sum(1)).tolist()
    return (totals + torch.tensor(_sum_by_choice(lp, owners, len(conts)))).tolist()


def _full_batch(
    model: nn.Module, batch: Sequence[Request], pad_id: int, precision: str
) -> list[float]:
    """Per choice (flattened in request order): summed log-prob from full sequences."""
    device = next(model.parameters()).device
    seqs, spans = [], []
    for r in batch:
        for c in r.continuations:
            seqs.append(list(r.context) + list(c[:-1]))
            spans.append((len(r.context) - 1, len(c)))
    ids, mask = _pad(seqs, pad_id)
    keep = torch.zeros_like(mask, dtype=torch.bool)
    targets = []
    for i, ((start, n), c) in enumerate(zip(spans, (c for r in batch for c in r.continuations))):
        keep[i, start : start + n] = True
        targets += list(c)
    with autocast(device, precision):
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            logits_to_keep=keep.to(device),
            use_cache=False,
        )
    lp = _token_logprobs(out.logits, torch.tensor(targets, device=device))
    owners = torch.arange(len(seqs)).repeat_interleave(keep.sum(1)).tolist()
    return _sum_by_choice(lp, owners, len(seqs))


def _prefer_cache(batch: Sequence[Request]) -> bool:
    """Whether sharing contexts saves enough padded tokens over full sequences (~25%)."""
    conts = [len(c) for r in batch for c in r.continuations]
    full = len(conts) * max(len(r.context) + max(map(len, r.continuations)) for r in batch)
    rest = [n - 1 for n in conts if n > 1]
    cached = len(batch) * max(len(r.context) for r in batch) + len(rest) * max(rest, default=0)
    return cached < CACHE_GAIN * full


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    requests: Sequence[Request],
    pad_id: int,
    batch_size: int = 16,
    precision: str = "fp32",
    cache_context: bool | None = None,
    progress: bool = False,
) -> list[list[float]]:
    """Per request, per choice: the summed log-probability of the choice's tokens.

    Requests are processed longest first in batches of `batch_size` requests (each with all
    its choices); results come back in the input order. `cache_context`: True/False force
    either path (module docstring); None picks, per batch, the one with fewer padded tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if any(not c for r in requests for c in r.continuations):
        raise ValueError("every continuation needs at least one token")
    model.eval()
    order = sorted(
        range(len(requests)),
        key=lambda i: -(len(requests[i].context) + max(map(len, requests[i].continuations))),
    )
    results: list[list[float]] = [[] for _ in requests]
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log-likelihood", unit="batch", leave=False)
    for s in starts:
        idx = order[s : s + batch_size]
        batch = [requests[i] for i in idx]
        cached = _prefer_cache(batch) if cache_context is None else cache_context
        flat = iter((_cached_batch if cached else _full_batch)(model, batch, pad_id, precision))
        for i in idx:
            results[i] = [next(flat) for _ in requests[i].continuations]
    return results
