"""Everything data a federated run needs: records, held-out split, client partitions, sampling."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from devft.config import DataConfig
from devft.data.partition import partition_indices
from devft.data.records import BUNDLED_DATASETS, Record, load_records
from devft.data.splits import heldout_split, seed_key, stratified_sample

log = logging.getLogger(__name__)


@dataclass(repr=False)
class FederatedData:
    """Records plus index lists into them (all indices refer to positions in `records`)."""

    records: list[Record]
    train_indices: list[int]
    heldout_indices: list[int]
    partitions: list[list[int]]
    """Per client, its share of the training indices."""
    eval_indices: list[int]
    """Stratified sample of held-out rows the server scores every round."""
    seed: int = 0

    @classmethod
    def build(cls, cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
        """Load `cfg.name`, hold out `cfg.heldout_fraction` per category, partition the rest."""
        records = load_records(cfg.name)
        categories = [r.category for r in records]
        train, heldout = heldout_split(records, cfg.heldout_fraction, seed)
        local = partition_indices(
            [categories[i] for i in train], num_clients, cfg.partition, cfg.dirichlet_alpha, seed
        )
        partitions = [[train[j] for j in part] for part in local]
        eval_indices = stratified_sample(heldout, categories, cfg.eval_examples, seed)
        if len(eval_indices) < cfg.eval_examples:
            log.warning(
                "data.eval_examples=%d but only %d held-out rows; evaluating on all",
                cfg.eval_examples,
                len(eval_indices),
            )
        data = cls(records, train, heldout, partitions, eval_indices, seed)
        log.info(
            "data %s: %d records, %d categories, %d train / %d held-out, %d eval rows, "
            "%s partition over %d clients (sizes %s)",
            cfg.name,
            len(records),
            len(set(categories)),
            len(train),
            len(heldout),
            len(eval_indices),
            cfg.partition,
            num_clients,
            [len(p) for p in partitions],
        )
        return data

    def __repr__(self) -> str:
        return (
            f"FederatedData({len(self.records)} records, {len(self.train_indices)} train, "
            f"{len(self.heldout_indices)} held-out, {len(self.eval_indices)} eval, "
            f"client sizes {[len(p) for p in self.partitions]})"
        )

    @property
    def num_clients(self) -> int:
        return len(self.partitions)

    def select(self, indices: list[int]) -> list[Record]:
        """The records at `indices`."""
        return [self.records[i] for i in indices]

    def eval_records(self) -> list[Record]:
        return self.select(self.eval_indices)

    def calibration_indices(self, n: int) -> list[int]:
        """A stratified sample of `n` held-out rows, disjoint from `eval_indices` when there
        are enough other held-out rows (otherwise topped up with eval rows)."""
        categories = [r.category for r in self.records]
        used = set(self.eval_indices)
        rest = [i for i in self.heldout_indices if i not in used]
        out = stratified_sample(rest, categories, n, self.seed + 1)
        if len(out) < n:
            out += stratified_sample(self.eval_indices, categories, n - len(out), self.seed + 1)
        return out

    def client_batches(
        self, client: int, round: int, steps: int, batch_size: int, seed: int
    ) -> list[list[Record]]:
        """`steps` batches of `batch_size` records from the client's partition.

        Deterministic for (seed, client, round); rows are drawn without replacement within the
        round when the partition holds at least steps * batch_size rows, with replacement
        otherwise.
        """
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range (0..{self.num_clients - 1})")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
        part = self.partitions[client]
        need = steps * batch_size
        rng = np.random.default_rng([seed_key(seed), client, seed_key(round)])
        picks = rng.choice(len(part), size=need, replace=len(part) < need)
        rows = [self.records[part[j]] for j in picks.tolist()]
        return [rows[s * batch_size : (s + 1) * batch_size] for s in range(steps)]

    def partition_summary(self) -> list[dict[str, Any]]:
        """Per client: its size and how many rows of each category it holds."""
        out = []
        for client, part in enumerate(self.partitions):
            counts = Counter(self.records[i].category for i in part)
            out.append(
                {"client": client, "size": len(part), "categories": dict(sorted(counts.items()))}
            )
        return out


def _source_key(name: str) -> tuple[Any, ...]:
    """Bundled name, or a user file's resolved path + mtime + size (edits invalidate)."""
    if name in BUNDLED_DATASETS:
        return (name,)
    path = Path(name).expanduser()
    try:
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return (name,)


def federated_data(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """`FederatedData.build`, cached per process on the config fields it depends on."""
    key = (
        _source_key(cfg.name),
        float(cfg.heldout_fraction),
        int(cfg.eval_examples),
        cfg.partition,
        float(cfg.dirichlet_alpha),
        int(num_clients),
        int(seed),
    )
    return _cached_build(key, cfg.name)


@lru_cache(maxsize=8)
def _cached_build(key: tuple[Any, ...], name: str) -> FederatedData:
    _, fraction, eval_examples, partition, alpha, num_clients, seed = key
    cfg = DataConfig(
        name=name,
        heldout_fraction=fraction,
        eval_examples=eval_examples,
        partition=partition,
        dirichlet_alpha=alpha,
    )
    return FederatedData.build(cfg, num_clients, seed)
