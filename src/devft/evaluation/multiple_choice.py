"""Multiple-choice accuracy by log-likelihood, as lm-eval-harness scores it.

Every choice gets the summed log-probability of its tokens given the context. `acc` is the
share of items whose highest-scoring choice is the answer; `acc_norm` divides each choice's
score by the choice's length in characters first (lm-eval's `acc_norm`), which removes the
bias towards short answers. Ties go to the first choice (numpy argmax, as lm-eval).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from devft.data.tasks import TRAIN_TASKS, MCItem
from devft.errors import ConfigError
from devft.evaluation.items import (
    DEFAULT_HELDOUT_FRACTION,
    GROUP_HELDOUT,
    GROUP_UNSEEN,
    check_tasks,
    task_group,
    task_items,
)
from devft.evaluation.loglik import continuation_logprobs
from devft.evaluation.requests import DEFAULT_MAX_LEN, PROMPT_STYLES, PromptStyle, build_requests

log = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "mmlu", "piqa", "hellaswag")
"""Routine evaluation: two unseen tasks plus held-out rows of three trained ones."""
DEFAULT_LIMIT = 200
"""Items per task by default (a seeded subsample)."""


@dataclass(frozen=True)
class ItemScore:
    """Scores of one item: log-likelihood per choice and the two predictions."""

    logprobs: tuple[float, ...]
    pred: int
    pred_norm: int
    answer: int


@dataclass
class MCResult:
    """Accuracy over a list of items (`stderr*` = binomial sqrt(p (1 - p) / n))."""

    n: int
    acc: float
    acc_norm: float
    stderr: float
    stderr_norm: float
    seconds: float
    details: list[ItemScore] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        """The numbers without per-item details."""
        return {k: v for k, v in asdict(self).items() if k != "details"}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / n) if n else math.nan


def score_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MCItem],
    batch_size: int = 16,
    precision: str = "fp32",
    progress: bool = False,
    *,
    prompt_style: PromptStyle = "plain",
    max_len: int = DEFAULT_MAX_LEN,
    cache_context: bool | None = None,
    details: bool = False,
) -> MCResult:
    """acc and acc_norm of `model` on `items` (see the module docstring).

    `batch_size` counts items per forward (each with all its choices); `max_len` caps
    context + continuation tokens (contexts are cut from the left).
    """
    if prompt_style not in PROMPT_STYLES:
        raise ConfigError("prompt_style", prompt_style, f"one of {', '.join(PROMPT_STYLES)}")
    start = time.perf_counter()
    requests = build_requests(items, tokenizer, prompt_style, max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logprobs = continuation_logprobs(
        model, requests, int(pad_id), batch_size, precision, cache_context, progress
    )
    scores = []
    for item, request, lps in zip(items, requests, logprobs):
        normed = [lp / n for lp, n in zip(lps, request.norm_lengths)]
        scores.append(ItemScore(tuple(lps), _argmax(lps), _argmax(normed), item.answer))
    n = len(scores)
    acc = sum(s.pred == s.answer for s in scores) / n if n else math.nan
    acc_norm = sum(s.pred_norm == s.answer for s in scores) / n if n else math.nan
    return MCResult(
        n=n,
        acc=acc,
        acc_norm=acc_norm,
        stderr=binomial_stderr(acc, n),
        stderr_norm=binomial_stderr(acc_norm, n),
        seconds=time.perf_counter() - start,
        details=scores if details else [],
    )


def _group_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Macro averages (each task counts once) of acc and acc_norm over a group's tasks."""
    if not rows:
        return {"tasks": [], "n": 0, "acc": math.nan, "acc_norm": math.nan}
    return {
        "tasks": list(rows),
        "n": sum(r["n"] for r in rows.values()),
        "acc": sum(r["acc"] for r in rows.values()) / len(rows),
        "acc_norm": sum(r["acc_norm"] for r in rows.values()) / len(rows),
    }


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = DEFAULT_LIMIT,
    seed: int = 0,
    *,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    trained_tasks: Sequence[str] = TRAIN_TASKS,
    prompt_style: PromptStyle = "plain",
    batch_size: int = 16,
    precision: str = "fp32",
    max_len: int = DEFAULT_MAX_LEN,
    progress: bool = False,
) -> dict[str, Any]:
    """Score several tasks; report per task and per group (unseen vs trained-task held-out).

    Tasks in `trained_tasks` (default: the `tasks` mixture) are scored only on the rows a run
    with this `heldout_fraction` and `seed` held out of training; the others (MMLU,
    ARC-Challenge, COPA) on all their items. `limit` = a seeded subsample per task.
    Returns {"tasks": {task: {acc, acc_norm, n, stderr, stderr_norm, seconds, group, pool}},
    "groups": {"unseen": ..., "trained_heldout": ...}, "settings": {...}}.
    """
    names = check_tasks(tasks)
    per_task: dict[str, dict[str, Any]] = {}
    for task in names:
        items, pool = task_items(task, limit, seed, heldout_fraction, trained_tasks)
        result = score_multiple_choice(
            model,
            tokenizer,
            items,
            batch_size,
            precision,
            progress,
            prompt_style=prompt_style,
            max_len=max_len,
        )
        group = task_group(task, trained_tasks)
        per_task[task] = {**result.summary(), "group": group, "pool": pool}
        log.info(
            "%s (%s, %d of %d items): acc %.4f, acc_norm %.4f in %.1f s",
            task,
            group,
            result.n,
            pool,
            result.acc,
            result.acc_norm,
            result.seconds,
        )
    groups = {
        g: _group_summary({t: r for t, r in per_task.items() if r["group"] == g})
        for g in (GROUP_UNSEEN, GROUP_HELDOUT)
    }
    settings = {
        "limit": limit,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "prompt_style": prompt_style,
        "max_len": max_len,
        "precision": precision,
    }
    return {"tasks": per_task, "groups": groups, "settings": settings}
