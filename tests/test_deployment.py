"""DevFT on Flower's Deployment Runtime: a real SuperLink and SuperNodes on 127.0.0.1.

TLS and the SuperNode keys come from deploy/pki.py (the deploy example's script);
SuperNode authentication is on, so only SuperNodes whose public keys were registered with
`flwr supernode register` may join. Each SuperNode picks its data partition from
`--node-config "partition-id=I num-partitions=2"`; the second also names its own data shard
(`data-shard=...`, cut by `devft shard`), so it never loads the whole data set, and states
its memory budget (`memory-mb=...`), which the main run reads (`client_memory_mb=node`). Runs are
submitted as `flwr run <repo> <connection> --run-config ...`: the repository's own app
bundle and declared keys. The tests cover: a bad config value reported to the submitter,
per-round progress in the ServerApp's log, a run resumed after a SuperLink restart ending
with the uninterrupted run's adapter, and a SuperNode with `--trusted-entities` refusing an
unsigned bundle, and one signed by an unknown key, without running any of their code, and
running the bundle signed by `deploy/sign_app.py` with its trusted key. docs/deployment.md
and deploy/README.md describe the same commands for separate machines.
"""

import io
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from deployment.cluster import (
    CONNECTION,
    VENV_BIN,
    Cluster,
    DeploymentError,
    run_config_arg,
)
from deployment.pki import make_node_keys, make_server_certs, make_signer, sign_app
from flwr.cli.build import build_fab_from_disk
from safetensors.torch import load_file
from test_models_quantize import _config
from tiny import byte_tokenizer
from transformers import AutoModelForCausalLM

from devft.config import DataConfig, ModelConfig, load_config
from devft.config.budgets import NODE_BUDGET_KEY
from devft.config.flower import REGENERATE, undeclared_keys
from devft.data import SHARD_NODE_KEY, write_client_shards
from devft.evaluation.adapters import _adapter_base
from devft.federation.runner import run_method
from devft.fetch import fetch_run
from devft.models.client_stage import client_tokenizer, tokenizer_digest
from devft.reporting.card import name_base_model
from devft.reporting.recorder import read_metrics

REPO = Path(__file__).resolve().parents[1]
NODES = 2
EVAL_EXAMPLES, MAX_SEQ_LEN = 4, 64  # the run's data settings: node 1's shard is cut with them
NODE_1_BUDGET_MB = 4000  # node 1's `memory-mb`, read where a run sets client_memory_mb=node
RUN_TIMEOUT_S = 300  # typically ~60-100 s on a 2-core CPU; generous for loaded CI machines
FAB_BOUND = 1_000_000  # bytes; Flower refuses bundles over 10 MB

# The base config the run's `config-file` points at (settings the run does not override).
BASE_YAML = f"""\
seed: 0
data: {{max_seq_len: {MAX_SEQ_LEN}, eval_batch_size: 4}}
lora: {{r: 8, alpha: 16}}
train: {{batch_size: 2, lr: 0.01, threads: 1}}
"""

needs_flower_cli = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists() or shutil.which("flwr", path=VENV_BIN) is None,
    reason="Flower's deployment CLI (flower-superlink, flwr) is not installed",
)


# ---- the app bundle and its declared config (no processes) ------------------------------------
def test_app_bundle_holds_only_the_app():
    fab = build_fab_from_disk(REPO)  # what `flwr run .` ships to every SuperNode
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_BOUND, (len(fab), len(names))
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"pyproject.toml", "src", "configs", "deploy", ".info"}, tops
    assert not [n for n in names if n.startswith(("results/", "docs/", "benchmarks/", "tests/"))]
    for needed in ("src/devft/federation/server_app.py", "configs/default.yaml",
                   "deploy/run.yaml"):
        assert needed in names


def test_every_config_key_can_be_set_with_run_config():
    missing = undeclared_keys(REPO / "pyproject.toml")
    assert not missing, (f"[tool.flwr.app.config] lacks {missing}: `flwr run --run-config` "
                         f"could not set them; regenerate the table with `{REGENERATE}`")
    cfg = load_config(REPO / "deploy" / "run.yaml")  # the deploy example's run config
    assert cfg.federation.num_clients == 2 and not cfg.output.progress


def test_adapter_names_its_base_by_the_bundled_name(tmp_path):
    cached = str(Path.home() / ".cache/devft/models/smollm2-135m-instruct")
    for model_path, expected in (("smollm2-135m-instruct", "smollm2-135m-instruct"),
                                 ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
                                 ("/srv/models/mine", cached)):
        (tmp_path / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": cached, "r": 8}))
        name_base_model(tmp_path, model_path)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == expected and config["r"] == 8
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/elsewhere/model"}))
    name_base_model(tmp_path, "smollm2-135m-instruct")
    assert _adapter_base(tmp_path, {}) == "smollm2-135m-instruct"  # loads without --model


# ---- a running federation --------------------------------------------------------------------
def _start(root: Path, node_configs: list[str], extra_args: tuple[str, ...] = ()) -> Cluster:
    """SuperLink (TLS, SuperNode auth) + registered, connected SuperNodes."""
    cluster = Cluster(root, make_server_certs(root / "certs"))
    cluster.start_superlink()
    nodes = []
    for i, node_config in enumerate(node_configs):
        keys = make_node_keys(root / "keys", f"supernode-{i}")
        node_id = cluster.register(keys)
        nodes.append((node_id, cluster.start_supernode(f"supernode-{i}", node_config, keys,
                                                       extra_args=extra_args)))
    for node_id, service in nodes:
        service.wait_for_log(rf"SuperNode ID: {node_id}\b", timeout=60)
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_data_file, tiny_model_dir):
    """Two SuperNodes; node 1 reads its own shard of the tiny data with its token ids (the
    run's data settings, seed 0)."""
    root = tmp_path_factory.mktemp("deployment")
    model = ModelConfig(path=str(tiny_model_dir))
    data = DataConfig(name=str(tiny_data_file), eval_examples=EVAL_EXAMPLES,
                      max_seq_len=MAX_SEQ_LEN)
    shard = write_client_shards(data, NODES, 0, root / "shards", client_tokenizer(model),
                                tokenizer_digest(model))[1]
    configs = [f"partition-id={i} num-partitions={NODES}" for i in range(NODES)]
    configs[1] += f" {SHARD_NODE_KEY}='{shard}' {NODE_BUDGET_KEY}={NODE_1_BUDGET_MB}"
    cluster = None
    try:
        cluster = _start(root, configs)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()


def _overrides(root: Path, tiny_model_dir: Path, tiny_data_file: Path, out: Path,
               **extra: object) -> dict[str, object]:
    base = root / "base.yaml"
    base.write_text(BASE_YAML)
    return {
        "config-file": str(base), "model.path": str(tiny_model_dir),
        "data.name": str(tiny_data_file), "method": "devft", "devft.stages": "2,4",
        "federation.rounds": 2, "federation.num_clients": NODES, "output.dir": str(out),
        "output.progress": False, "train.local_steps": 1, "data.eval_examples": EVAL_EXAMPLES,
        **extra,
    }


def _submit(cluster: Cluster, overrides: dict[str, object], stream: bool = True,
            check: bool = True, app: str = str(REPO)) -> tuple[str, str]:
    """`flwr run <app> <connection> --run-config ...` (default: this repository's bundle):
    (run id, the CLI's stdout)."""
    args = ["run", app, CONNECTION, "--run-config", run_config_arg(overrides)]
    try:
        res = cluster.flwr(*args, *(["--stream"] if stream else []), timeout=RUN_TIMEOUT_S,
                           check=check)
    except DeploymentError as err:
        raise DeploymentError(f"{err}\n{_service_logs(cluster)}") from None
    match = re.search(r"Successfully started run (\d+)", res.stdout)
    assert match, res.stdout + res.stderr
    return match.group(1), res.stdout


def _run_info(cluster: Cluster, run_id: str) -> dict[str, str]:
    return cluster.flwr_json("ls", CONNECTION, "--run-id", run_id)["runs"][0]


@pytest.fixture(scope="module")
def finished(cluster, tiny_model_dir, tiny_data_file, tmp_path_factory):
    """An uninterrupted 2-round DevFT run: (its overrides, out dir, the submitter's stream)."""
    root = tmp_path_factory.mktemp("finished")
    overrides = _overrides(root, tiny_model_dir, tiny_data_file, root / "out",
                           **{"federation.client_memory_mb": "node"})
    run_id, stream = _submit(cluster, overrides)
    info = _run_info(cluster, run_id)
    assert info["status"] == "finished:completed", stream + _service_logs(cluster)
    return overrides, root / "out", stream


@needs_flower_cli
def test_supernodes_without_a_registered_key_are_refused(cluster):
    stranger = make_node_keys(cluster.root / "keys", "stranger")  # never registered
    unregistered = cluster.start_supernode("stranger", "partition-id=0 num-partitions=2", stranger)
    keyless = cluster.start_supernode("keyless", "partition-id=1 num-partitions=2", None)
    # Flower prints its exit code (305) but the process exits with status 1
    assert unregistered.wait_exit(timeout=60) == 1, unregistered.tail()
    assert keyless.wait_exit(timeout=60) == 1, keyless.tail()
    assert "Exit Code: 305" in unregistered.log(), unregistered.tail()
    # activation with an unknown public key fails; self-registration is disabled
    assert "Failed to activate SuperNode" in unregistered.log(), unregistered.tail()
    assert "All SuperNodes must be registered via the CLI" in keyless.log(), keyless.tail()
    # ssh-keygen's default key type cannot be registered: node keys must be ECDSA
    make_signer(cluster.root / "keys", "ed25519-node")  # writes ed25519-node.pub
    res = cluster.flwr("supernode", "register", str(cluster.root / "keys" / "ed25519-node.pub"),
                       CONNECTION, check=False)
    assert res.returncode != 0 and "Not an EC public key" in res.stdout + res.stderr, res
    nodes = cluster.flwr_json("supernode", "list", CONNECTION)["nodes"]
    assert len(nodes) == NODES, nodes


@needs_flower_cli
def test_a_bad_config_value_reaches_the_submitter(cluster, tiny_model_dir, tiny_data_file,
                                                  tmp_path):
    overrides = _overrides(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "out",
                           **{"train.lr": "fast"})
    run_id, stream = _submit(cluster, overrides, check=False)
    message = "devft: error: train.lr = 'fast' is not allowed: a number"  # as the CLI says
    assert message in stream, stream
    info = _run_info(cluster, run_id)
    assert info["status"] == "finished:failed", info
    assert message in info["status-details"], info


@needs_flower_cli
def test_devft_runs_two_stages_through_flwr_run(cluster, finished, tmp_path):
    overrides, out, stream = finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert [s["num_layers"] for s in summary["stages"]] == [2, 4]
    records = read_metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["layers_trained"] for r in records[1:]] == [2, 4]
    assert all(r["clients_ok"] == NODES and r["clients_failed"] == 0 for r in records[1:])
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())
    # each SuperNode read its own budget from its node config (node 0 states none) and
    # planned within it in its own ClientApp process: the whole stage fits, no lever used
    for r, depth in zip(records[1:], (2, 4)):
        assert r["client_budget_mb"] == [0, NODE_1_BUDGET_MB], r
        assert r["client_depth"] == [depth, depth] and r["client_levers"] == ["", ""], r
        assert 0 < r["client_predicted_peak_mb"][1] <= NODE_1_BUDGET_MB, r
        assert 0 < r["client_process_peak_mb"][1] <= NODE_1_BUDGET_MB, r
    # the submitter collects them (`devft fetch`; here output.dir is a local path): the
    # adapter the ServerApp wrote is the one its summary.json recorded
    fetched = fetch_run(str(out), tmp_path / "fetched")
    assert fetched.names == ["adapter", "summary.json", "metrics.jsonl", "config.json",
                             "loss.png"]
    assert "have the SHA-256 that summary.json recorded" in fetched.check.verdict

    # the operator's view (`flwr run --stream` = `flwr log`): one line per global round, not
    # the strategy's per-stage "ROUND 1/1", and the summary with the output directory
    for r in records[1:]:
        line = re.search(rf"devft: round {r['round']}/2 \| stage {r['stage'] + 1}/2 "
                         rf"\({r['layers_trained']} layers, round 1 of it\) \| held-out loss "
                         rf"{r['eval_loss']:.4f} \| bytes down .* \| clients ok {NODES} "
                         r"failed 0 rejected 0", stream)
        assert line, stream
    assert len(re.findall(r"devft: round [12]/2 ", stream)) == 2, stream
    assert f"outputs in {out.resolve()}" in stream, stream
    for i in range(NODES):  # every SuperNode ran a ClientApp in both rounds, and says on what
        log = (cluster.root / f"supernode-{i}.log").read_text()
        assert log.count("Receiving: train message") == 2, log
        source = "from shard " if i == 1 else "from its partition of "
        assert log.count(f"client partition {i} of {NODES}: ") == 2, log
        assert source in log, log

    # Same config in process: the same model, so each SuperNode trained the partition its
    # node config named, node 1 from its shard (a wrong or shared partition would change the
    # result).
    local = run_method(
        load_config(
            overrides["config-file"],
            [f"{k}={v}" for k, v in overrides.items() if k not in ("config-file", "output.dir")]
            + [f"output.dir={tmp_path / 'local'}"],
        )
    )
    assert summary["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)


@needs_flower_cli
def test_a_run_resumes_after_a_superlink_restart(cluster, finished, tmp_path):
    overrides, done_out, _ = finished
    out = tmp_path / "out"
    overrides = {**overrides, "output.dir": str(out)}
    _submit(cluster, overrides, stream=False)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (latest.is_file() and "round-00001" in latest.read_text()):
        assert time.monotonic() < deadline, _service_logs(cluster)
        time.sleep(0.2)
    cluster.restart_superlink()  # the coordinator's machine restarts mid-run (in round 2)
    deadline = time.monotonic() + 120
    while sum(n["status"] == "online" for n in
              cluster.flwr_json("supernode", "list", CONNECTION)["nodes"]) < NODES:
        assert time.monotonic() < deadline, _service_logs(cluster)
        time.sleep(1)

    run_id, stream = _submit(cluster, {**overrides, "output.resume": True})
    assert _run_info(cluster, run_id)["status"] == "finished:completed", stream
    assert "resuming devft after round 1" in stream, stream
    assert re.search(r"devft: round 2/2 ", stream) and not re.search(r"devft: round 1/2 ",
                                                                      stream), stream
    assert [r["round"] for r in read_metrics(out)] == [0, 1, 2]
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(done_out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-7, msg=key)


@needs_flower_cli
def test_an_nf4_run_through_flwr_run_matches_the_in_process_grid(cluster, tiny_data_file,
                                                                 tmp_path):
    """`model.quantization=nf4` on the Deployment Runtime: each SuperNode builds its DevFT
    stages in nf4 (fused, then quantized, layer by layer), and the run ends where the same
    config ends in process."""
    model = tmp_path / "q-llama"  # hidden size 64: one NF4 block per row
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama")).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    overrides = _overrides(tmp_path, model, tiny_data_file, tmp_path / "out",
                           **{"model.quantization": "nf4", "devft.stages": "2,6"})
    run_id, stream = _submit(cluster, overrides)
    assert _run_info(cluster, run_id)["status"] == "finished:completed", stream
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["num_layers"] for s in summary["stages"]] == [2, 6]
    card = (tmp_path / "out" / "adapter" / "README.md").read_text()
    assert "| quantization | `nf4`" in card, card
    local = run_method(load_config(
        overrides["config-file"],
        [f"{k}={v}" for k, v in overrides.items() if k not in ("config-file", "output.dir")]
        + [f"output.dir={tmp_path / 'local'}"]))
    assert summary["final_eval_loss"] == pytest.approx(local["final_eval_loss"], rel=1e-5)


@needs_flower_cli
def test_a_supernode_runs_only_bundles_signed_by_a_trusted_key(tmp_path, tiny_model_dir,
                                                               tiny_data_file):
    """`flower-supernode --trusted-entities`: an unsigned bundle, or one signed by a key the
    node does not trust, is refused and none of its code runs; the same bundle signed with
    `deploy/sign_app.py` by the trusted key runs."""
    trusted = make_signer(tmp_path / "signer", "app-signer")
    make_signer(tmp_path / "other", "stranger-signer")
    guarded = _start(tmp_path / "cluster", ["partition-id=0 num-partitions=1"],
                     ("--trusted-entities", str(trusted)))
    database = guarded.root / "superlink" / "state.db"
    node_log = guarded.root / "supernode-0.log"
    overrides = _overrides(tmp_path, tiny_model_dir, tiny_data_file, tmp_path / "out",
                           **{"method": "fedit", "federation.rounds": 1,
                              "federation.num_clients": 1, "federation.max_skipped_rounds": 1})
    overrides.pop("devft.stages")
    try:
        for name, key in (("unsigned", None), ("stranger", tmp_path / "other" / "stranger-signer"),
                          ("trusted", tmp_path / "signer" / "app-signer")):
            run_overrides = {**overrides, "output.dir": str(tmp_path / name)}
            if key is None:  # `flwr run .`: a locally built bundle carries no signature
                run_id, stream = _submit(guarded, run_overrides, check=False)
            else:
                sign_app.main(["--key", str(key), "--database", str(database),
                               "--app", str(REPO)])
                run_id, stream = _submit(guarded, run_overrides, check=False,
                                         app="@devft/devft")
            status = _run_info(guarded, run_id)["status"]
            if name == "trusted":
                assert status == "finished:completed", stream + node_log.read_text()
                assert "client partition 0 of 1: " in node_log.read_text()
            else:
                assert status == "finished:failed", (name, stream)
                assert "first client error: The FAB could not be verified" in stream, stream
                assert "resubmit the same --run-config plus output.resume=true" in stream
                assert "client partition" not in node_log.read_text()  # no ClientApp ran
        log = node_log.read_text()
        assert "App verification is not supported by the connected SuperLink" in log, log
        assert "FAB verification failed: the provided trusted entities could not verify" in log
    finally:
        guarded.stop()


def _service_logs(cluster: Cluster) -> str:
    return "\n".join(f"---- {s.name} ----\n{s.tail(40)}" for s in cluster.services)
