"""A client's own data: its partition, the evaluation rows and the category names, cut once
(`devft shard`) and read by its ClientApp instead of the whole data set, the way a data
owner holds only its own rows. A client reading a shard never builds or caches the mixture
and never imports `datasets` or `flwr-datasets` (together ~200 MiB with the bundled tasks).

The shard is checked against the run: it must have been cut with the same data fields,
number of clients, seed and partition id, so it holds exactly the rows the simulation
would give that client; its batches are drawn by the same rule (`draw_batches`). A shard
cut with the model's tokenizer also carries every row's token ids (`encode`), so a client
whose tokenizer files and `data.max_seq_len` match never loads its tokenizer either.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from devft.config import DataConfig
from devft.config.groups import parse_client_groups
from devft.data.formatting import Encoded, encode
from devft.data.records import Record
from devft.data.splits import seed_key
from devft.data.token_table import TokenTable
from devft.errors import DataError
from devft.files import atomic_write_json

Row = TypeVar("Row")
SHARD_FORMAT = "devft-client-shard/1"
SHARD_NODE_KEY = "data-shard"
"""The node-config key naming a SuperNode's shard file."""


def shard_key(cfg: DataConfig, num_clients: int, seed: int) -> dict[str, Any]:
    """The fields a client's rows depend on (a shard cut with other values is refused);
    data.client_groups only under partition=groups, so shards cut before it existed hold."""
    key = {"data.name": cfg.name, "data.heldout_fraction": float(cfg.heldout_fraction),
           "data.eval_examples": int(cfg.eval_examples), "data.partition": cfg.partition,
           "data.dirichlet_alpha": float(cfg.dirichlet_alpha),
           "federation.num_clients": int(num_clients), "seed": int(seed)}
    if cfg.partition == "groups":
        key["data.client_groups"] = parse_client_groups(cfg.client_groups)
    return key


def draw_batches(rows: Sequence[Row], client: int, round: int, steps: int, batch_size: int,
                 seed: int) -> list[list[Row]]:
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
    encoding: dict[str, Any] | None = None
    """{"max_seq_len", "tokenizer_sha256", "pad_token_id"} of `encoded` (None: not encoded)."""
    encoded: TokenTable | None = None
    """Token ids of `rows`, in the same order."""
    eval_encoded: TokenTable | None = None

    @property
    def size(self) -> int:
        """n_k, the client's FedAvg weight."""
        return len(self.rows)

    def batches(self, round: int, steps: int, batch_size: int,
                seed: int) -> list[list[Record]]:
        return draw_batches(self.rows, self.partition, round, steps, batch_size, seed)

    def encoded_batches(self, round: int, steps: int, batch_size: int,
                        seed: int) -> list[list[Encoded]]:
        """The token ids of `batches`' rows (same draw)."""
        assert self.encoded is not None
        return draw_batches(self.encoded, self.partition, round, steps, batch_size, seed)

    def encoding_mismatch(self, max_seq_len: int, tokenizer_sha256: str) -> str | None:
        """Why the stored token ids cannot serve this run (None: they can)."""
        if self.encoding is None:
            return "the shard holds no token ids (cut without a model)"
        for field, want in (("max_seq_len", max_seq_len),
                            ("tokenizer_sha256", tokenizer_sha256)):
            if self.encoding.get(field) != want:
                return f"it was tokenized with {field} = {self.encoding.get(field)!r}, not {want!r}"
        return None


def encode_shard(shard: ClientShard, tokenizer: Any, max_seq_len: int,
                 tokenizer_sha256: str) -> ClientShard:
    """`shard` with every row's token ids, as the client's `encode` would make them."""
    shard.encoded = TokenTable.of([encode(r, tokenizer, max_seq_len) for r in shard.rows])
    shard.eval_encoded = TokenTable.of([encode(r, tokenizer, max_seq_len)
                                        for r in shard.eval_rows])
    shard.encoding = {"max_seq_len": int(max_seq_len), "tokenizer_sha256": tokenizer_sha256,
                      "pad_token_id": int(tokenizer.pad_token_id)}
    return shard


def _ids(table: TokenTable | None) -> dict[str, Any] | None:
    return None if table is None else table.to_json()


def _from_ids(data: dict[str, Any] | None) -> TokenTable | None:
    return None if data is None else TokenTable.from_json(data)


def write_shard(shard: ClientShard, path: Path) -> Path:
    """Write `shard` as one JSON file (atomically)."""
    atomic_write_json(path, {"format": SHARD_FORMAT, "partition": shard.partition,
                             "key": shard.key, "categories": shard.categories,
                             "rows": [asdict(r) for r in shard.rows],
                             "eval_rows": [asdict(r) for r in shard.eval_rows],
                             "encoding": shard.encoding, "encoded": _ids(shard.encoded),
                             "eval_encoded": _ids(shard.eval_encoded)}, indent=None)
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
        encoded, eval_encoded = _from_ids(data.get("encoded")), _from_ids(data.get("eval_encoded"))
    except (KeyError, TypeError, ValueError, binascii.Error) as err:
        raise DataError(f"{where} is malformed ({err})") from None
    if not rows:
        raise DataError(f"{where} holds no training rows")
    if data.get("encoding") is not None and (
            encoded is None or eval_encoded is None or len(encoded) != len(rows)
            or len(eval_encoded) != len(eval_rows)):
        raise DataError(f"{where} is malformed (its token ids do not match its rows)")
    return ClientShard(partition, rows, eval_rows, categories, key, data.get("encoding"),
                       encoded, eval_encoded)
