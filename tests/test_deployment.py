"""DevFT on Flower's Deployment Runtime: a real SuperLink and two SuperNodes on 127.0.0.1.

TLS uses a CA and server certificate generated here; SuperNode authentication is on, so
only SuperNodes whose public keys were registered with `flwr supernode register` may join.
Each SuperNode picks its data partition from `--node-config "partition-id=I
num-partitions=2"`; the second also names its own data shard (`data-shard=...`, cut by
`devft shard`), so it never loads the whole data set. The run is submitted with
`flwr run <app> <connection> --run-config`.
docs/deployment.md describes the same commands for separate machines.
"""

import json
import re
import shutil

import pytest
from deployment.cluster import (
    CONNECTION,
    VENV_BIN,
    Cluster,
    DeploymentError,
    run_config_arg,
    write_app,
)
from deployment.pki import make_node_keys, make_server_certs
from safetensors.torch import load_file

from devft.config import DataConfig, ModelConfig, load_config
from devft.data import SHARD_NODE_KEY, write_client_shards
from devft.federation.runner import run_method
from devft.models.client_stage import client_tokenizer, tokenizer_digest
from devft.reporting.recorder import read_metrics

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists() or shutil.which("flwr", path=VENV_BIN) is None,
    reason="Flower's deployment CLI (flower-superlink, flwr) is not installed",
)

NODES = 2
EVAL_EXAMPLES, MAX_SEQ_LEN = 4, 64  # the run's data settings: node 1's shard is cut with them
RUN_TIMEOUT_S = 300  # typically ~60-100 s on a 2-core CPU; generous for loaded CI machines

# The base config the run's `config-file` points at (settings the run does not override).
BASE_YAML = f"""\
seed: 0
data: {{max_seq_len: {MAX_SEQ_LEN}, eval_batch_size: 4}}
lora: {{r: 8, alpha: 16}}
train: {{batch_size: 2, lr: 0.01, threads: 1}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data_file, tiny_model_dir):
    """SuperLink (TLS, SuperNode auth) + two registered, connected SuperNodes; node 1 reads
    its own shard of the tiny data with its token ids (the run's data settings, seed 0)."""
    root = tmp_path_factory.mktemp("deployment")
    model = ModelConfig(path=str(tiny_model_dir))
    data = DataConfig(name=str(tiny_data_file), eval_examples=EVAL_EXAMPLES,
                      max_seq_len=MAX_SEQ_LEN)
    shard = write_client_shards(data, NODES, 0, root / "shards", client_tokenizer(model),
                                tokenizer_digest(model))[1]
    cluster = Cluster(root, make_server_certs(root / "certs"))
    try:
        cluster.start_superlink()
        nodes = []
        for i in range(NODES):
            keys = make_node_keys(root / "keys", f"supernode-{i}")
            node_id = cluster.register(keys)
            node_config = f"partition-id={i} num-partitions={NODES}"
            if i == 1:
                node_config += f" {SHARD_NODE_KEY}='{shard}'"
            service = cluster.start_supernode(f"supernode-{i}", node_config, keys)
            nodes.append((node_id, service))
        for node_id, service in nodes:
            service.wait_for_log(rf"SuperNode ID: {node_id}\b", timeout=60)
        yield cluster
    finally:
        cluster.stop()


def test_supernodes_without_a_registered_key_are_refused(cluster):
    stranger = make_node_keys(cluster.root / "keys", "stranger")  # never registered
    unregistered = cluster.start_supernode("stranger", "partition-id=0 num-partitions=2", stranger)
    keyless = cluster.start_supernode("keyless", "partition-id=1 num-partitions=2", None)
    assert unregistered.wait_exit(timeout=60) != 0, unregistered.tail()
    assert keyless.wait_exit(timeout=60) != 0, keyless.tail()
    # activation with an unknown public key fails; self-registration is disabled
    assert "Failed to activate SuperNode" in unregistered.log(), unregistered.tail()
    assert "All SuperNodes must be registered via the CLI" in keyless.log(), keyless.tail()
    nodes = cluster.flwr_json("supernode", "list", CONNECTION)["nodes"]
    assert len(nodes) == NODES, nodes


def test_devft_runs_two_stages_through_flwr_run(cluster, tiny_model_dir, tiny_data_file, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(BASE_YAML)
    out = tmp_path / "out"
    overrides = {
        "config-file": str(base),
        "model.path": str(tiny_model_dir),
        "data.name": str(tiny_data_file),
        "method": "devft",
        "devft.stages": "2,4",
        "federation.rounds": 2,
        "federation.num_clients": NODES,
        "output.dir": str(out),
        "output.progress": False,
        "train.local_steps": 1,
        "data.eval_examples": EVAL_EXAMPLES,
    }
    # [tool.flwr.app.config] must declare every key that --run-config overrides
    placeholders = {k: "" if isinstance(v, str) else v for k, v in overrides.items()}
    # (the app's own default method is fedit: the [2, 4] layer counts below show the override won)
    app = write_app(tmp_path / "devft-app", {**placeholders, "method": "fedit"})

    try:
        res = cluster.flwr(
            "run",
            str(app),
            CONNECTION,
            "--run-config",
            run_config_arg(overrides),
            "--stream",  # returns when the run has finished
            timeout=RUN_TIMEOUT_S,
        )
    except DeploymentError as err:
        raise DeploymentError(f"{err}\n{_service_logs(cluster)}") from None
    run_id = re.search(r"Successfully started run (\d+)", res.stdout).group(1)
    runs = cluster.flwr_json("ls", CONNECTION, "--run-id", run_id)["runs"]
    assert runs[0]["status"] == "finished:completed", res.stdout + _service_logs(cluster)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert [s["num_layers"] for s in summary["stages"]] == [2, 4]
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["layers_trained"] for r in records[1:]] == [2, 4]
    assert all(r["clients_ok"] == NODES and r["clients_failed"] == 0 for r in records[1:])
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())
    for i in range(NODES):  # every SuperNode ran a ClientApp in both rounds
        log = (cluster.root / f"supernode-{i}.log").read_text()
        assert log.count("Receiving: train message") == 2, log

    # Same config in process: the same model, so each SuperNode trained the partition its
    # node config named, node 1 from its shard (a wrong or shared partition would change the
    # result).
    local = run_method(
        load_config(
            base,
            [f"{k}={v}" for k, v in overrides.items() if k != "config-file"]
            + [f"output.dir={tmp_path / 'local'}"],
        )
    )
    assert summary["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)


def _service_logs(cluster: Cluster) -> str:
    return "\n".join(f"---- {s.name} ----\n{s.tail(40)}" for s in cluster.services)
