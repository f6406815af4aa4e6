"""Deterministic per-category held-out splits and stratified samples of record indices."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import numpy as np

from devft.data.records import Record

log = logging.getLogger(__name__)


def seed_key(seed: int) -> int:
    """A non-negative int for numpy seed sequences (negative seeds stay distinct)."""
    return int(seed) % (1 << 63)


def _category_rng(seed: int, category: str, salt: int = 0) -> np.random.Generator:
    """A generator that depends only on the seed and the category's name (not its position)."""
    return np.random.default_rng([seed_key(seed), zlib.crc32(category.encode("utf-8")), salt])


def group_by_category(indices: Sequence[int], categories: Sequence[str]) -> dict[str, list[int]]:
    """Indices grouped by `categories[i]`, keeping their order within each group."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(categories[i], []).append(int(i))
    return groups


def heldout_split(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): `fraction` of every category, chosen per category.

    Each category's rows get their own seeded permutation (seeded by the seed and the category
    name), so the split does not depend on how the categories are interleaved or on which
    other categories exist. A category with >= 2 rows keeps at least one row on each side; a
    single-row category stays in training. Both lists are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    categories = [r.category for r in records]
    train: list[int] = []
    heldout: list[int] = []
    for category, rows in sorted(group_by_category(range(len(records)), categories).items()):
        m = len(rows)
        k = 0 if m < 2 else min(max(round(fraction * m), 1), m - 1)
        order = _category_rng(seed, category).permutation(m)
        heldout += [rows[j] for j in order[:k]]
        train += [rows[j] for j in order[k:]]
    log.debug("held-out split: %d train, %d held-out rows", len(train), len(heldout))
    return sorted(train), sorted(heldout)


def stratified_sample(
    indices: Sequence[int], categories: Sequence[str], n: int, seed: int
) -> list[int]:
    """Up to `n` of `indices`, spread evenly over their categories (`categories[i]`).

    Each category's indices are shuffled with a generator seeded by the seed and the category
    name; then categories (in a seeded order of their sorted names) are visited round-robin,
    one index each turn, skipping exhausted ones. Returns all indices when n >= len(indices).
    """
    if n <= 0:
        return []
    groups = group_by_category(indices, categories)
    names = sorted(groups)
    names = [names[j] for j in np.random.default_rng([seed_key(seed), 1]).permutation(len(names))]
    queues = [
        [groups[c][j] for j in _category_rng(seed, c, 1).permutation(len(groups[c]))] for c in names
    ]
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return out
