"""Everything data a federated run needs: records, held-out split, client partitions, sampling."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from devft.config import DataConfig
from devft.config.groups import parse_client_groups
from devft.data.partition import partition_indices
from devft.data.records import BUNDLED_DATASETS, Record, load_records
from devft.data.shards import (
    ClientShard,
    draw_batches,
    encode_shard,
    read_shard,
    shard_key,
    write_shard,
)
from devft.data.splits import heldout_split, stratified_sample

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
            [categories[i] for i in train], num_clients, cfg.partition, cfg.dirichlet_alpha, seed,
            parse_client_groups(cfg.client_groups),
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
        """`steps` batches of `batch_size` records from the client's partition
        (`draw_batches`: deterministic for (seed, client, round))."""
        return draw_batches(self._partition_rows(client), client, round, steps, batch_size,
                            seed)

    def shard(self, client: int, key: dict[str, Any]) -> ClientShard:
        """The client's own data (`devft.data.shards`), cut with the run's `key`."""
        return ClientShard(client, self._partition_rows(client), self.eval_records(),
                           self.categories, key)

    @cached_property
    def categories(self) -> list[str]:
        """Every category of the data set, sorted."""
        return sorted({r.category for r in self.records})

    def _partition_rows(self, client: int) -> list[Record]:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range (0..{self.num_clients - 1})")
        return self.select(self.partitions[client])

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
    return (name,) if name in BUNDLED_DATASETS else _file_stamp(name)


def _file_stamp(name: str) -> tuple[Any, ...]:
    path = Path(name).expanduser()
    try:
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return (name,)


def _data_key(cfg: DataConfig, num_clients: int, seed: int) -> tuple[Any, ...]:
    """The config fields `FederatedData.build` depends on (with a user file's stamp)."""
    return (
        _source_key(cfg.name),
        float(cfg.heldout_fraction),
        int(cfg.eval_examples),
        cfg.partition,
        float(cfg.dirichlet_alpha),
        int(num_clients),
        int(seed),
        tuple(parse_client_groups(cfg.client_groups)),
    )


def federated_data(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """`FederatedData.build`, cached per process on the config fields it depends on."""
    return _cached_build(_data_key(cfg, num_clients, seed), cfg.name)


@lru_cache(maxsize=8)
def _cached_build(key: tuple[Any, ...], name: str) -> FederatedData:
    _, fraction, eval_examples, partition, alpha, num_clients, seed, client_groups = key
    cfg = DataConfig(
        name=name,
        heldout_fraction=fraction,
        eval_examples=eval_examples,
        partition=partition,
        dirichlet_alpha=alpha,
        client_groups=",".join(map(str, client_groups)),
    )
    return FederatedData.build(cfg, num_clients, seed)


def client_shard(cfg: DataConfig, num_clients: int, seed: int, partition: int,
                 shard_path: str | None = None) -> ClientShard:
    """A client's own data: read from its shard file when the node names one (nothing else
    of the data set is loaded), else cut from the run's `federated_data`. A shard file is
    read once per process (cached on its path, size and mtime)."""
    key = shard_key(cfg, num_clients, seed)
    if shard_path:
        return _cached_shard_file(_file_stamp(shard_path), tuple(key.items()), partition)
    return federated_data(cfg, num_clients, seed).shard(partition, key)  # ms: not cached


@lru_cache(maxsize=4)
def _cached_shard_file(stamp: tuple[Any, ...], key: tuple[Any, ...],
                       partition: int) -> ClientShard:
    return read_shard(stamp[0], dict(key), partition)  # stamp[0]: the path


def write_client_shards(cfg: DataConfig, num_clients: int, seed: int, out_dir: str | Path,
                        tokenizer: Any = None, tokenizer_sha256: str = "") -> list[Path]:
    """`devft shard`: every client's shard, as out_dir/client-<k>.json; with a tokenizer,
    also every row's token ids at `cfg.max_seq_len`."""
    data, key = federated_data(cfg, num_clients, seed), shard_key(cfg, num_clients, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(data.num_clients):
        shard = data.shard(k, key)
        if tokenizer is not None:
            encode_shard(shard, tokenizer, cfg.max_seq_len, tokenizer_sha256)
        paths.append(write_shard(shard, out / f"client-{k}.json"))
    return paths
