"""Split row positions over federated clients with flwr-datasets partitioners (offline)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

from devft.data.splits import seed_key
from devft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PARTITION_SCHEMES = ("iid", "dirichlet", "groups")


def partition_indices(
    categories: Sequence[str], num_clients: int, scheme: str, alpha: float, seed: int,
    client_groups: Sequence[int] = (),
) -> list[list[int]]:
    """Positions 0..len(categories)-1 split over `num_clients` clients (sorted lists).

    iid: a seeded shuffle cut into equal contiguous shards (`IidPartitioner`).
    dirichlet: per category, shares drawn from Dirichlet(alpha) (`DirichletPartitioner`).
    groups: `client_groups[k]` is client k's group; group g's clients split the rows of
    category group g (`category_groups`) IID, as `iid` does.
    Every client gets at least one row; the result is deterministic for a seed.
    """
    n = len(categories)
    if num_clients < 1:
        raise ConfigError("federation.num_clients", num_clients, "a positive integer")
    if n < num_clients:
        raise DataError(
            f"only {n} training rows for federation.num_clients={num_clients}: every "
            f"client needs at least one row (use fewer clients or more data)"
        )
    if scheme == "iid":
        parts = _iid(categories, num_clients, seed)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ConfigError("data.dirichlet_alpha", alpha, "a positive number")
        parts = _dirichlet(categories, num_clients, alpha, seed)
    elif scheme == "groups":
        parts = _groups(categories, num_clients, client_groups, seed)
    else:
        raise ConfigError("data.partition", scheme, f"one of {', '.join(PARTITION_SCHEMES)}")
    assert sum(len(p) for p in parts) == n and min(len(p) for p in parts) >= 1
    log.info(
        "%s partition of %d rows over %d clients: sizes %s",
        scheme,
        n,
        num_clients,
        [len(p) for p in parts],
    )
    return parts


def _dataset(positions: Sequence[int], categories: Sequence[str]):
    import datasets

    return datasets.Dataset.from_dict(
        {"idx": [int(i) for i in positions], "category": [categories[i] for i in positions]}
    )


def _positions(partition) -> list[int]:
    # a slice is one vectorised read; `partition["idx"]` is a lazy Column read row by row
    return sorted(partition[:]["idx"]) if len(partition) else []


def _iid(categories: Sequence[str], num_clients: int, seed: int,
         salt: tuple[int, ...] = ()) -> list[list[int]]:
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner cuts contiguous shards without shuffling: shuffle first
    order = np.random.default_rng([seed_key(seed), 0, *salt]).permutation(len(categories))
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = _dataset(order.tolist(), categories)
    return [_positions(partitioner.load_partition(i)) for i in range(num_clients)]


def _dirichlet(
    categories: Sequence[str], num_clients: int, alpha: float, seed: int
) -> list[list[int]]:
    """DirichletPartitioner; it resamples up to 10 times when a client is below
    min_partition_size and then raises ValueError. We retry with smaller minimums and, last,
    with no minimum plus a deterministic repair that moves rows into empty clients."""
    from flwr_datasets.partitioner import DirichletPartitioner

    n = len(categories)
    ds = _dataset(range(n), categories)
    preferred = max(1, min(5, n // num_clients))
    for min_size in dict.fromkeys((preferred, 1, 0)):
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="category",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed_key(seed),
        )
        partitioner.dataset = ds
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                parts = [_positions(partitioner.load_partition(i)) for i in range(num_clients)]
            except ValueError as exc:
                log.info(
                    "Dirichlet partition with min_partition_size=%d failed after "
                    "retries (%s); trying a smaller minimum",
                    min_size,
                    exc,
                )
                continue
        if caught:
            log.debug("Dirichlet partitioner resampled %d times", len(caught))
        if min_size == 0:
            parts = _fill_empty(parts)
        return parts
    raise AssertionError("unreachable: min_partition_size=0 always succeeds")


def _fill_empty(parts: list[list[int]]) -> list[list[int]]:
    """Give every empty client the last row of the currently largest client."""
    if all(parts):
        return parts
    log.warning("Dirichlet partition left clients empty; moving one row into each of them")
    parts = [list(p) for p in parts]
    for part in parts:
        if not part:
            donor = max(range(len(parts)), key=lambda j: (len(parts[j]), -j))
            part.append(parts[donor].pop())
    return [sorted(p) for p in parts]


def category_groups(categories: Sequence[str], num_groups: int) -> list[list[str]]:
    """The sorted distinct categories cut into `num_groups` contiguous groups of near-equal
    size (the first ones one larger when they do not divide evenly)."""
    names = sorted(set(categories))
    if not 1 <= num_groups <= len(names):
        raise ConfigError("data.client_groups", f"{num_groups} groups",
                          f"1 to {len(names)} groups: the data set has {len(names)} categories")
    size, extra = divmod(len(names), num_groups)
    bounds = [g * size + min(g, extra) for g in range(num_groups + 1)]
    return [names[a:b] for a, b in zip(bounds, bounds[1:])]


def _groups(categories: Sequence[str], num_clients: int, client_groups: Sequence[int],
            seed: int) -> list[list[int]]:
    """Group g's clients split the rows of category group g IID (salted per group)."""
    if len(client_groups) != num_clients:
        raise ConfigError("data.client_groups", list(client_groups),
                          f"one group per client ({num_clients}, federation.num_clients)")
    chunks = category_groups(categories, max(client_groups) + 1)
    group_of = {c: g for g, chunk in enumerate(chunks) for c in chunk}
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for g, chunk in enumerate(chunks):
        rows = [i for i, c in enumerate(categories) if group_of[c] == g]
        members = [k for k, kg in enumerate(client_groups) if kg == g]
        if len(rows) < len(members):
            raise DataError(
                f"only {len(rows)} training rows in client group {g} (categories "
                f"{', '.join(chunk)}) for its {len(members)} clients: every client needs at "
                f"least one row (use fewer clients in the group or more data)")
        local = _iid([categories[i] for i in rows], len(members), seed, salt=(g + 1,))
        for k, part in zip(members, local):
            parts[k] = [rows[j] for j in part]
    return parts
