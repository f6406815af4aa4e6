"""Client shards (`devft shard`): a node's own rows, the same rows and batches as the
simulation's partition, checked against the run, and read without the whole data set."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from devft.cli import main
from devft.config import DataConfig
from devft.data import SHARD_NODE_KEY, client_shard, federated_data, read_shard, shard_key
from devft.data import federated as federated_module
from devft.data.federated import write_client_shards
from devft.errors import DataError

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


def test_devft_shard_writes_every_clients_file(tiny_data_file, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(["shard", "--set", f"data.name={tiny_data_file}", "--set",
               "federation.num_clients=2", "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["client-0.json", "client-1.json"]
    printed = capsys.readouterr().out
    assert f"partition-id=1 num-partitions=2 {SHARD_NODE_KEY}=" in printed
    assert main(["shard", "--set", f"data.name={tiny_data_file}"]) == 2  # no --out
    assert "--out" in capsys.readouterr().err


def test_client_data_memory_benchmark_compares_both_ways(tiny_data_file, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import client_data_memory

    result = client_data_memory.main(["--config", str(ROOT / "configs" / "default.yaml"),
                                      "--set", f"data.name={tiny_data_file}", "--clients", "1",
                                      "--out", str(tmp_path)])
    whole, own = result["rows"]
    assert (whole["way"], own["way"]) == ("whole data set", "own shard")
    assert whole["rows"] == own["rows"] > 0
    assert "flwr_datasets" in whole["libraries"] and own["libraries"] == []
    assert own["shard_file_mib"] > 0 and (tmp_path / "client_data_memory.png").stat().st_size
