"""Client shards (`devft shard`): a node's own rows, the same rows and batches as the
simulation's partition, checked against the run, and read without the whole data set."""

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from devft.cli import main
from devft.config import DataConfig, ModelConfig, RunConfig
from devft.data import (
    SHARD_NODE_KEY,
    client_shard,
    collate,
    encode,
    federated_data,
    read_shard,
    shard_key,
)
from devft.data import federated as federated_module
from devft.data.federated import write_client_shards
from devft.data.formatting import Encoded
from devft.data.token_table import TokenTable
from devft.errors import DataError
from devft.federation import client_app
from devft.models.client_stage import client_tokenizer, tokenizer_digest
from devft.training.evaluation import heldout_batches

CLIENTS, SEED = 3, 0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(tiny_data_file):
    return DataConfig(name=str(tiny_data_file), heldout_fraction=0.2, eval_examples=6,
                      partition="dirichlet", dirichlet_alpha=0.5)


@pytest.fixture(scope="module")
def shards(cfg, tmp_path_factory):
    return write_client_shards(cfg, CLIENTS, SEED, tmp_path_factory.mktemp("shards"))


def test_a_shard_holds_the_partition_and_draws_the_simulations_batches(cfg, shards):
    data = federated_data(cfg, CLIENTS, SEED)
    assert [p.name for p in shards] == ["client-0.json", "client-1.json", "client-2.json"]
    sizes = []
    for k, path in enumerate(shards):
        shard = client_shard(cfg, CLIENTS, SEED, k, str(path))
        assert shard.rows == data.select(data.partitions[k])
        assert shard.eval_rows == data.eval_records()
        assert shard.categories == ["color", "geo", "math"]
        for round_ in (1, 2, 7):
            for steps, batch in ((2, 3), (40, 2)):  # without and with replacement
                assert shard.batches(round_, steps, batch, SEED) == data.client_batches(
                    k, round_, steps, batch, SEED)
        sizes.append(shard.size)
    assert sorted(sizes) != [sizes[0]] * CLIENTS  # Dirichlet: unequal n_k travel with them
    assert client_shard(cfg, CLIENTS, SEED, 1) == client_shard(cfg, CLIENTS, SEED, 1,
                                                                str(shards[1]))


def test_a_shard_file_is_read_without_building_the_data_set(cfg, shards, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a client with a shard built the whole data set")

    federated_module._cached_build.cache_clear()
    monkeypatch.setattr(federated_module.FederatedData, "build", refuse)
    assert client_shard(cfg, CLIENTS, SEED, 2, str(shards[2])).partition == 2


def test_a_client_reading_a_shard_never_imports_the_data_libraries(cfg, shards):
    code = (
        "import sys\n"
        "from devft.config import DataConfig\n"
        "from devft.data import client_shard\n"
        "import devft.federation.client_app\n"
        f"cfg = DataConfig(**{json.dumps(cfg.__dict__)})\n"
        f"shard = client_shard(cfg, {CLIENTS}, {SEED}, 0, {str(shards[0])!r})\n"
        "print(len(shard.rows), [m for m in ('datasets', 'pyarrow', 'flwr_datasets')"
        " if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) > 0 and out[1:] == ["[]"]


@pytest.mark.parametrize("field, value", [("eval_examples", 4), ("heldout_fraction", 0.3),
                                          ("partition", "iid"), ("name", "other.jsonl")])
def test_a_shard_cut_with_other_data_settings_is_refused(cfg, shards, field, value):
    other = replace(cfg, **{field: value})
    with pytest.raises(DataError, match=rf"data\.{field} = .*but the run has"):
        read_shard(shards[0], shard_key(other, CLIENTS, SEED), 0)
    with pytest.raises(DataError, match="federation.num_clients"):
        read_shard(shards[0], shard_key(cfg, CLIENTS + 1, SEED), 0)
    with pytest.raises(DataError, match="seed = 0"):
        read_shard(shards[0], shard_key(cfg, CLIENTS, SEED + 1), 0)


def test_a_wrong_partition_or_file_is_a_clear_error(cfg, shards, tmp_path):
    key = shard_key(cfg, CLIENTS, SEED)
    with pytest.raises(DataError, match="holds partition 0, but this node's partition-id is 1"):
        read_shard(shards[0], key, 1)
    with pytest.raises(DataError, match=f"{SHARD_NODE_KEY}.*cannot be read"):
        read_shard(tmp_path / "missing.json", key, 0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(DataError, match="not a devft client shard"):
        read_shard(bad, key, 0)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot be read"):
        read_shard(bad, key, 0)


def test_devft_shard_writes_every_clients_file(tiny_data_file, tiny_model_dir, tmp_path,
                                              capsys):
    out = tmp_path / "shards"
    rc = main(["shard", "--set", f"data.name={tiny_data_file}", "--set",
               "federation.num_clients=2", "--set", f"model.path={tiny_model_dir}",
               "--set", "data.max_seq_len=32", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["client-0.json", "client-1.json"]
    encoding = json.loads((out / "client-1.json").read_text())["encoding"]
    assert encoding["max_seq_len"] == 32
    assert encoding["tokenizer_sha256"] == tokenizer_digest(ModelConfig(path=str(tiny_model_dir)))
    printed = capsys.readouterr().out
    assert f"partition-id=1 num-partitions=2 {SHARD_NODE_KEY}=" in printed
    assert main(["shard", "--set", f"data.name={tiny_data_file}"]) == 2  # no --out
    assert "--out" in capsys.readouterr().err


def test_client_data_memory_benchmark_compares_three_ways(tiny_data_file, tiny_model_dir,
                                                        tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import client_data_memory

    result = client_data_memory.main(["--config", str(ROOT / "configs" / "default.yaml"),
                                      "--set", f"data.name={tiny_data_file}", "--set",
                                      f"model.path={tiny_model_dir}", "--clients", "1",
                                      "--out", str(tmp_path)])
    whole, own, tokens = result["rows"]
    assert [r["way"] for r in result["rows"]] == ["whole data set", "own shard",
                                                   "own shard, token ids"]
    assert whole["rows"] == own["rows"] == tokens["rows"] > 0
    assert "flwr_datasets" in whole["libraries"] and own["libraries"] == tokens["libraries"] == []
    assert whole["tokenizer_loaded"] and own["tokenizer_loaded"]
    assert not tokens["tokenizer_loaded"]
    assert tokens["shard_file_mib"] > own["shard_file_mib"] > 0
    assert (tmp_path / "client_data_memory.png").stat().st_size


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir):
    return ModelConfig(path=str(tiny_model_dir))


@pytest.fixture(scope="module")
def encoded_shards(cfg, model_cfg, tmp_path_factory):
    cut = replace(cfg, max_seq_len=48)
    return write_client_shards(cut, CLIENTS, SEED, tmp_path_factory.mktemp("encoded"),
                               client_tokenizer(model_cfg), tokenizer_digest(model_cfg))


def _run_cfg(cfg, model_cfg, max_seq_len):
    return RunConfig(model=model_cfg, data=replace(cfg, max_seq_len=max_seq_len),
                     federation=replace(RunConfig().federation, num_clients=CLIENTS),
                     train=replace(RunConfig().train, local_steps=3, batch_size=2), seed=SEED)


def _tokenized(run, shard):
    """The batches a client makes by tokenizing its rows itself."""
    tok = client_tokenizer(run.model)
    return [collate([encode(r, tok, run.data.max_seq_len) for r in rows], tok.pad_token_id)
            for rows in shard.batches(5, run.train.local_steps, run.train.batch_size, run.seed)]


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_an_encoded_shard_serves_the_client_without_its_tokenizer(cfg, model_cfg,
                                                                  encoded_shards, monkeypatch):
    run = _run_cfg(cfg, model_cfg, 48)
    shard = client_shard(run.data, CLIENTS, SEED, 1, str(encoded_shards[1]))
    assert shard.encoding["max_seq_len"] == 48 and len(shard.encoded) == shard.size
    expected_train, tok = _tokenized(run, shard), client_tokenizer(model_cfg)
    expected_eval = heldout_batches(shard.eval_rows, tok, run.data)

    def refuse(*args):
        raise AssertionError("the client loaded its tokenizer")

    monkeypatch.setattr(client_app, "client_tokenizer", refuse)
    env = SimpleNamespace(round=5, data=shard)
    _same_batches(client_app._train_batches(run, env, None), expected_train)
    _same_batches(client_app._eval_batches(run, env, None), expected_eval)


def test_token_ids_cut_for_another_length_or_tokenizer_are_not_used(cfg, model_cfg,
                                                                    encoded_shards, caplog):
    run = _run_cfg(cfg, model_cfg, 40)  # the shard was tokenized at 48
    shard = client_shard(run.data, CLIENTS, SEED, 2, str(encoded_shards[2]))
    env = SimpleNamespace(round=5, data=shard)
    with caplog.at_level(logging.WARNING, logger="devft"):
        _same_batches(client_app._train_batches(run, env, None), _tokenized(run, shard))
    assert "max_seq_len = 48, not 40" in caplog.text
    assert shard.encoding_mismatch(48, "0" * 64).startswith(
        "it was tokenized with tokenizer_sha256")
    assert shard.encoding_mismatch(48, tokenizer_digest(model_cfg)) is None


def test_a_token_table_round_trips_and_refuses_parts_that_do_not_fit(model_cfg, cfg):
    tok = client_tokenizer(model_cfg)
    rows = federated_data(cfg, CLIENTS, SEED).eval_records()
    encoded = [encode(r, tok, 24) for r in rows]
    table = TokenTable.from_json(json.loads(json.dumps(TokenTable.of(encoded).to_json())))
    assert [table[i] for i in range(len(table))] == encoded
    bad = TokenTable.of(encoded).to_json()
    bad["prompt_lengths"][0] = bad["lengths"][0] + 1
    with pytest.raises(ValueError, match="do not fit"):
        TokenTable.from_json(bad)
    with pytest.raises(ValueError, match="labels"):
        TokenTable.of([Encoded([1, 2, 3], [1, -100, 3])])
