"""FederatedData on the tiny 60-row, 3-category file."""

from collections import Counter

import pytest

from devft.config import DataConfig
from devft.data.federated import FederatedData, federated_data
from devft.errors import DataError


@pytest.fixture(scope="module")
def cfg(tiny_data_file):
    return DataConfig(name=str(tiny_data_file), heldout_fraction=0.2, eval_examples=6)


@pytest.fixture(scope="module")
def data(cfg):
    return FederatedData.build(cfg, num_clients=3, seed=0)


def test_split_and_partitions(data):
    assert len(data.records) == 60
    assert sorted(data.train_indices + data.heldout_indices) == list(range(60))
    assert Counter(data.records[i].category for i in data.heldout_indices) == {
        "math": 4,
        "geo": 4,
        "color": 4,
    }
    flat = sorted(i for p in data.partitions for i in p)
    assert flat == data.train_indices  # partitions cover exactly the training rows
    assert data.num_clients == 3 and all(data.partitions)


def test_eval_and_calibration(data):
    assert len(data.eval_indices) == 6
    assert set(data.eval_indices) <= set(data.heldout_indices)
    assert Counter(r.category for r in data.eval_records()) == {"math": 2, "geo": 2, "color": 2}
    calib = data.calibration_indices(6)
    assert len(calib) == 6 and set(calib) <= set(data.heldout_indices)
    assert not set(calib) & set(data.eval_indices)  # 12 held-out rows: room for both
    big = data.calibration_indices(10)  # only 6 non-eval rows left: topped up from eval
    assert len(big) == len(set(big)) == 10 and set(big) <= set(data.heldout_indices)


def test_client_batches(data):
    batches = data.client_batches(client=1, round=2, steps=3, batch_size=4, seed=5)
    assert [len(b) for b in batches] == [4, 4, 4]
    # rows are compared by identity: the tiny file has equal records in different rows
    part = {id(data.records[i]) for i in data.partitions[1]}
    rows = [id(r) for b in batches for r in b]
    assert set(rows) <= part and len(part) >= 12
    assert len(rows) == len(set(rows))  # partition >= 12 rows: no repeats within a round
    assert batches == data.client_batches(1, 2, 3, 4, seed=5)
    assert batches != data.client_batches(1, 3, 3, 4, seed=5)
    assert batches != data.client_batches(1, 2, 3, 4, seed=6)
    other = data.client_batches(0, 2, 3, 4, seed=5)
    assert not {id(r) for b in other for r in b} & part  # another client's data


def test_client_batches_with_replacement_when_partition_is_small(data):
    n = len(data.partitions[0])
    batches = data.client_batches(0, 0, steps=n, batch_size=2, seed=0)
    rows = [id(r) for b in batches for r in b]
    assert len(rows) == 2 * n and len(set(rows)) < len(rows)
    with pytest.raises(IndexError):
        data.client_batches(3, 0, 1, 1, seed=0)


def test_partition_summary(data):
    summary = data.partition_summary()
    assert [s["client"] for s in summary] == [0, 1, 2]
    assert [s["size"] for s in summary] == [len(p) for p in data.partitions]
    assert all(sum(s["categories"].values()) == s["size"] for s in summary)


def test_dirichlet_and_cache(cfg):
    dcfg = DataConfig(
        name=cfg.name,
        heldout_fraction=0.2,
        eval_examples=6,
        partition="dirichlet",
        dirichlet_alpha=0.1,
    )
    a = federated_data(dcfg, 4, 1)
    assert federated_data(dcfg, 4, 1) is a  # cached per process
    b = federated_data(DataConfig(name=cfg.name, heldout_fraction=0.2, eval_examples=6), 4, 1)
    assert b is not a and sorted(i for p in a.partitions for i in p) == a.train_indices
    assert a.train_indices == b.train_indices and a.partitions != b.partitions


def test_too_many_clients(cfg):
    with pytest.raises(DataError, match="federation.num_clients=100"):
        FederatedData.build(cfg, num_clients=100, seed=0)


# ---- partition by task group (data.partition=groups) -----------------------------------------
def _groups_cfg(cfg, client_groups):
    return DataConfig(name=cfg.name, heldout_fraction=0.2, eval_examples=6, partition="groups",
                      client_groups=client_groups)


def test_groups_give_each_client_group_its_own_categories(cfg):
    data = FederatedData.build(_groups_cfg(cfg, "2x0,2x1"), num_clients=4, seed=0)
    # sorted categories color, geo, math cut into [color, geo] and [math]
    seen = [{data.records[i].category for i in p} for p in data.partitions]
    assert seen == [{"color", "geo"}, {"color", "geo"}, {"math"}, {"math"}]
    assert sorted(i for p in data.partitions for i in p) == data.train_indices
    assert abs(len(data.partitions[0]) - len(data.partitions[1])) <= 1  # IID within a group
    assert abs(len(data.partitions[2]) - len(data.partitions[3])) <= 1
    # held-out rows and the rows the server scores stay per category, every category
    plain = FederatedData.build(cfg, num_clients=4, seed=0)
    assert data.heldout_indices == plain.heldout_indices
    assert data.eval_indices == plain.eval_indices
    # deterministic for a seed, another seed gives other shares
    again = FederatedData.build(_groups_cfg(cfg, "0,0,1,1"), num_clients=4, seed=0)
    assert again.partitions == data.partitions
    other = FederatedData.build(_groups_cfg(cfg, "2x0,2x1"), num_clients=4, seed=1)
    assert other.partitions[0] != data.partitions[0]


def test_category_groups_are_contiguous_and_near_equal():
    from devft.data import category_groups

    names = [f"c{i:02d}" for i in range(12)] * 2
    assert category_groups(names, 2) == [[f"c{i:02d}" for i in range(6)],
                                         [f"c{i:02d}" for i in range(6, 12)]]
    assert [len(g) for g in category_groups(names, 5)] == [3, 3, 2, 2, 2]
    assert category_groups(["b", "a"], 1) == [["a", "b"]]


def test_more_groups_than_categories_is_refused(cfg):
    from devft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.client_groups.*the data set has 3 categories"):
        FederatedData.build(_groups_cfg(cfg, "0,1,2,3"), num_clients=4, seed=0)


def test_a_group_with_more_clients_than_rows_is_refused(tiny_data_file, tmp_path):
    import json

    path = tmp_path / "few.jsonl"
    rows = [{"instruction": f"q{i}", "input": "", "output": "a", "category": c}
            for i, c in enumerate(["a"] * 20 + ["b"] * 3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dcfg = DataConfig(name=str(path), heldout_fraction=0.2, eval_examples=4,
                      partition="groups", client_groups="1x0,3x1")
    with pytest.raises(DataError, match="client group 1"):
        FederatedData.build(dcfg, num_clients=4, seed=0)


def test_groups_cache_and_shard_key(cfg):
    from devft.data import shard_key

    a = federated_data(_groups_cfg(cfg, "2x0,2x1"), 4, 0)
    assert federated_data(_groups_cfg(cfg, "0,0,1,1"), 4, 0) is a  # the same groups
    assert federated_data(_groups_cfg(cfg, "1x0,3x1"), 4, 0) is not a
    assert shard_key(_groups_cfg(cfg, "2x0,2x1"), 4, 0)["data.client_groups"] == [0, 0, 1, 1]
    assert "data.client_groups" not in shard_key(cfg, 4, 0)  # older shards stay valid
