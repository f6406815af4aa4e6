"""A client's own data: its partition, the evaluation rows and the category names, cut once
(`devft shard`) and read by its ClientApp instead of the whole data set, the way a data
owner holds only its own rows. A client reading a shard never builds or caches the mixture
and never imports `datasets` or `flwr-datasets` (together ~200 MiB with the bundled tasks).

The shard is checked against the run: it must have been cut with the same data fields,
number of clients, seed and partition id, so it holds exactly the rows the simulation
would give that client; its batches are drawn by the same rule (`draw_batches`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from devft.config import DataConfig
from devft.data.records import Record
from devft.data.splits import seed_key
from devft.errors import DataError
from devft.files import atomic_write_json

SHARD_FORMAT = "devft-client-shard/1"
SHARD_NODE_KEY = "data-shard"
"""The node-config key naming a SuperNode's shard file."""


def shard_key(cfg: DataConfig, num_clients: int, seed: int) -> dict[str, Any]:
    """The fields a client's rows depend on (a shard cut with other values is refused)."""
    return {"data.name": cfg.name, "data.heldout_fraction": float(cfg.heldout_fraction),
            "data.eval_examples": int(cfg.eval_examples), "data.partition": cfg.partition,
            "data.dirichlet_alpha": float(cfg.dirichlet_alpha),
            "federation.num_clients": int(num_clients), "seed": int(seed)}


def draw_batches(rows: list[Record], client: int, round: int, steps: int, batch_size: int,
                 seed: int) -> list[list[Record]]:
    """`steps` batches of `batch_size` rows of a client's partition, deterministic for (seed,
    client, round): without replacement within the round when the partition holds at least
    steps * batch_size rows, with replacement otherwise."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    need = steps * batch_size
    rng = np.random.default_rng([seed_key(seed), client, seed_key(round)])
    picks = rng.choice(len(rows), size=need, replace=len(rows) < need)
    chosen = [rows[j] for j in picks.tolist()]
    return [chosen[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


@dataclass
class ClientShard:
    """One client's view of the run's data."""

    partition: int
    rows: list[Record]
    """The client's partition, in partition order."""
    eval_rows: list[Record]
    """The held-out rows the server scores (client-side evaluation scores the same)."""
    categories: list[str]
    """Every category of the data set, sorted (C2A's descriptor is a histogram over them)."""
    key: dict[str, Any]

    @property
    def size(self) -> int:
        """n_k, the client's FedAvg weight."""
        return len(self.rows)

    def batches(self, round: int, steps: int, batch_size: int,
                seed: int) -> list[list[Record]]:
        return draw_batches(self.rows, self.partition, round, steps, batch_size, seed)


def write_shard(shard: ClientShard, path: Path) -> Path:
    """Write `shard` as one JSON file (atomically)."""
    atomic_write_json(path, {"format": SHARD_FORMAT, "partition": shard.partition,
                             "key": shard.key, "categories": shard.categories,
                             "rows": [asdict(r) for r in shard.rows],
                             "eval_rows": [asdict(r) for r in shard.eval_rows]}, indent=None)
    return path


def read_shard(path: str | Path, expected_key: dict[str, Any], partition: int) -> ClientShard:
    """The shard at `path`, checked against the run's key and this node's partition id; a
    DataError naming the file and the first field that differs otherwise."""
    path = Path(path).expanduser()
    where = f"client data shard {str(path)!r} (node config {SHARD_NODE_KEY})"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where} cannot be read: {err}") from None
    if not isinstance(data, dict) or data.get("format") != SHARD_FORMAT:
        raise DataError(f"{where} is not a devft client shard (expected \"format\": "
                        f"{SHARD_FORMAT!r}; write one with `devft shard`)")
    if data.get("partition") != partition:
        raise DataError(f"{where} holds partition {data.get('partition')!r}, but this node's "
                        f"partition-id is {partition}")
    key = data.get("key") or {}
    for field, want in expected_key.items():
        if key.get(field) != want:
            raise DataError(f"{where} was cut with {field} = {key.get(field)!r}, but the run "
                            f"has {want!r}: cut it again with the run's config")
    try:
        rows = [Record(**r) for r in data["rows"]]
        eval_rows = [Record(**r) for r in data["eval_rows"]]
        categories = [str(c) for c in data["categories"]]
    except (KeyError, TypeError) as err:
        raise DataError(f"{where} is malformed ({err})") from None
    if not rows:
        raise DataError(f"{where} holds no training rows")
    return ClientShard(partition, rows, eval_rows, categories, key)
