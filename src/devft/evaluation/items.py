"""Which multiple-choice items to score: held-out rows of trained tasks, seeded subsamples.

The `tasks` training mixture builds each trained task's records from the same rows, in the
same order, as `multiple_choice_items(task)` (checked here and in the tests), and a run holds
out rows with `heldout_split(records, data.heldout_fraction, seed)`, whose choice for a
category depends only on the seed, the category name and its row count. So item j of a
trained task is held out exactly when row j of that task's records is.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from devft.data.splits import heldout_split, seed_key
from devft.data.tasks import MC_TASKS, TRAIN_TASKS, MCItem, multiple_choice_items
from devft.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_HELDOUT_FRACTION = 0.1
"""`DataConfig.heldout_fraction`'s default."""
GROUP_UNSEEN = "unseen"
GROUP_HELDOUT = "trained_heldout"


def check_tasks(tasks: Iterable[str], field: str = "tasks") -> list[str]:
    """The task names, de-duplicated in order; ConfigError(field, ...) for an unknown one."""
    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    unknown = [t for t in names if t not in MC_TASKS]
    if unknown or not names:
        raise ConfigError(
            field,
            ",".join(unknown) if unknown else "",
            f"comma-separated multiple-choice tasks from: {', '.join(MC_TASKS)}",
        )
    return names


def task_group(task: str, trained_tasks: Sequence[str] = TRAIN_TASKS) -> str:
    """'trained_heldout' for a task of the training mixture, else 'unseen'."""
    return GROUP_HELDOUT if task in trained_tasks else GROUP_UNSEEN


@lru_cache(maxsize=32)
def _heldout_positions(task: str, fraction: float, seed: int) -> tuple[int, ...]:
    from devft.data.tasks import _build_task  # the training records of this one task

    records = _build_task(task)
    n_items = len(multiple_choice_items(task))
    if len(records) != n_items:
        raise RuntimeError(
            f"task {task!r}: {len(records)} training records but {n_items} multiple-choice "
            "items; the row mapping between them is broken"
        )
    _, heldout = heldout_split(records, fraction, seed)
    return tuple(heldout)


def heldout_multiple_choice_items(
    task: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0
) -> list[MCItem]:
    """The items of a trained task whose rows a run with this fraction and seed held out."""
    if task not in TRAIN_TASKS or task not in MC_TASKS:
        allowed = [t for t in MC_TASKS if t in TRAIN_TASKS]
        raise ConfigError("task", task, f"a trained multiple-choice task: {', '.join(allowed)}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError("heldout_fraction", heldout_fraction, "a number in (0, 1)")
    items = multiple_choice_items(task)
    return [items[j] for j in _heldout_positions(task, float(heldout_fraction), int(seed))]


def subsample(items: Sequence[MCItem], limit: int | None, seed: int, task: str) -> list[MCItem]:
    """Up to `limit` items, chosen by a generator seeded by (seed, task); kept in order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ConfigError("limit", limit, "a positive integer (or none for all items)")
    rng = np.random.default_rng([seed_key(seed), zlib.crc32(task.encode("utf-8")), 2])
    picks = np.sort(rng.choice(len(items), size=limit, replace=False))
    return [items[int(j)] for j in picks]


def task_items(
    task: str,
    limit: int | None = None,
    seed: int = 0,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    trained_tasks: Sequence[str] = TRAIN_TASKS,
) -> tuple[list[MCItem], int]:
    """(items to score, size of the pool they were drawn from) for one task.

    Trained tasks draw only from their held-out rows; unseen tasks from all their items.
    """
    if task in trained_tasks and task in TRAIN_TASKS:
        pool = heldout_multiple_choice_items(task, heldout_fraction, seed)
    else:
        pool = multiple_choice_items(task)
    return subsample(pool, limit, seed, task), len(pool)
