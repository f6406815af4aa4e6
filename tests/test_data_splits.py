"""Held-out splits, stratified samples and client partitions."""

import logging
from collections import Counter

import pytest

from devft.data.partition import partition_indices
from devft.data.records import Record
from devft.data.splits import heldout_split, stratified_sample
from devft.errors import ConfigError, DataError


def recs(categories):
    return [Record(f"q{i}", "", f"a{i}", c) for i, c in enumerate(categories)]


def by_rank(records, indices):
    """(category, rank of the row within its category) - an order-free identity of a row."""
    rank, seen = {}, Counter()
    for i, r in enumerate(records):
        rank[i] = (r.category, seen[r.category])
        seen[r.category] += 1
    return {rank[i] for i in indices}


# ---- heldout_split ----------------------------------------------------------------------------
def test_heldout_split_is_a_deterministic_disjoint_cover():
    records = recs(["a"] * 50 + ["b"] * 30 + ["c"] * 20)
    train, held = heldout_split(records, 0.2, seed=3)
    assert (train, held) == heldout_split(records, 0.2, seed=3)
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(100))
    assert train == sorted(train) and held == sorted(held)
    assert Counter(records[i].category for i in held) == {"a": 10, "b": 6, "c": 4}
    assert heldout_split(records, 0.2, seed=4)[1] != held


def test_heldout_split_small_categories():
    records = recs(["one"] + ["two"] * 2 + ["three"] * 3 + ["big"] * 40)
    train, held = heldout_split(records, 0.01, seed=0)  # 0.01 rounds to 0 rows everywhere
    cats_held = Counter(records[i].category for i in held)
    cats_train = Counter(records[i].category for i in train)
    assert cats_held == {"two": 1, "three": 1, "big": 1}
    assert cats_train == {"one": 1, "two": 1, "three": 2, "big": 39}
    _, held = heldout_split(records, 0.99, seed=0)  # never everything
    assert Counter(records[i].category for i in held) == {"two": 1, "three": 2, "big": 39}


def test_heldout_split_ignores_category_interleaving_and_other_categories():
    blocks = recs(["a"] * 20 + ["b"] * 20)
    mixed = recs(["a", "b"] * 20)
    assert by_rank(blocks, heldout_split(blocks, 0.25, 7)[1]) == by_rank(
        mixed, heldout_split(mixed, 0.25, 7)[1]
    )
    only_a = recs(["a"] * 20)
    held_a = {x for x in by_rank(blocks, heldout_split(blocks, 0.25, 7)[1]) if x[0] == "a"}
    assert held_a == by_rank(only_a, heldout_split(only_a, 0.25, 7)[1])


def test_heldout_split_rejects_bad_fraction():
    with pytest.raises(ValueError):
        heldout_split(recs(["a"] * 4), 1.0, 0)


# ---- stratified_sample ------------------------------------------------------------------------
def test_stratified_sample_spreads_over_categories():
    cats = ["a"] * 50 + ["b"] * 30 + ["c"] * 4
    indices = list(range(len(cats)))
    sample = stratified_sample(indices, cats, 12, seed=1)
    assert len(sample) == len(set(sample)) == 12
    assert Counter(cats[i] for i in sample) == {"a": 4, "b": 4, "c": 4}
    assert sample == stratified_sample(indices, cats, 12, seed=1)
    assert sample != stratified_sample(indices, cats, 12, seed=2)
    # an exhausted category leaves its turns to the others
    big = stratified_sample(indices, cats, 20, seed=1)
    assert Counter(cats[i] for i in big) == {"a": 8, "b": 8, "c": 4}
    # uneven n: counts differ by at most one
    counts = Counter(cats[i] for i in stratified_sample(indices, cats, 7, seed=5)).values()
    assert max(counts) - min(counts) <= 1 and sum(counts) == 7


def test_stratified_sample_subset_and_overflow():
    cats = ["a", "b"] * 10
    subset = [0, 1, 2, 3, 4, 5]
    sample = stratified_sample(subset, cats, 100, seed=0)
    assert sorted(sample) == subset
    assert stratified_sample(subset, cats, 0, seed=0) == []


# ---- partition_indices ------------------------------------------------------------------------
CATS = ["a"] * 200 + ["b"] * 120 + ["c"] * 80


def check_cover(parts, n, num_clients):
    assert len(parts) == num_clients
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))
    assert all(len(p) >= 1 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_cover_and_are_deterministic(scheme):
    parts = partition_indices(CATS, 4, scheme, 0.5, seed=11)
    check_cover(parts, len(CATS), 4)
    assert parts == partition_indices(CATS, 4, scheme, 0.5, seed=11)
    assert parts != partition_indices(CATS, 4, scheme, 0.5, seed=12)


def test_iid_is_balanced_and_mixed():
    parts = partition_indices(CATS, 4, "iid", 0.5, seed=0)
    assert [len(p) for p in parts] == [100] * 4
    for p in parts:  # each client sees every category near its global share (50 / 30 / 20 %)
        counts = Counter(CATS[i] for i in p)
        assert 30 <= counts["a"] <= 70 and 15 <= counts["b"] <= 45 and 8 <= counts["c"] <= 32


def skew(parts):
    """Mean total-variation distance between each client's category mix and the global mix."""
    total = Counter(CATS)
    out = []
    for p in parts:
        c = Counter(CATS[i] for i in p)
        out.append(0.5 * sum(abs(c[k] / len(p) - total[k] / len(CATS)) for k in total))
    return sum(out) / len(out)


def test_dirichlet_is_skewed_compared_to_iid():
    iid = skew(partition_indices(CATS, 4, "iid", 0.5, seed=0))
    dirichlet = skew(partition_indices(CATS, 4, "dirichlet", 0.3, seed=0))
    assert iid < 0.08
    assert dirichlet > 0.2 > iid


@pytest.mark.parametrize("n, k, alpha", [(4, 4, 0.01), (10, 8, 0.05), (100, 20, 0.01)])
def test_dirichlet_never_leaves_a_client_empty(n, k, alpha, caplog):
    cats = ["x"] * (n // 2) + ["y"] * (n - n // 2)
    with caplog.at_level(logging.INFO):
        parts = partition_indices(cats, k, "dirichlet", alpha, seed=0)
    check_cover(parts, n, k)
    assert parts == partition_indices(cats, k, "dirichlet", alpha, seed=0)


def test_too_few_rows_names_num_clients():
    with pytest.raises(DataError, match="federation.num_clients=5"):
        partition_indices(["a"] * 4, 5, "iid", 0.5, seed=0)


def test_unknown_scheme():
    with pytest.raises(ConfigError, match="data.partition"):
        partition_indices(["a"] * 4, 2, "shards", 0.5, seed=0)
