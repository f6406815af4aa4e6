"""A data owner's install: the core set in a fresh venv, its size, and a SuperNode from it.

    .venv/bin/python benchmarks/client_install.py [--venv /tmp/devft-client] [--out FILE]

1. Creates a fresh venv and installs what a data owner needs: `pip install torch==2.13.0`
   (the CPU wheel) and `pip install <repo>` (devft's core set, = `devft[client]`).
2. Measures its installed size (every file under the venv) and the packages it holds.
3. Runs a real deployment: a SuperLink from this repository's full environment and one
   SuperNode from the client venv (its `flower-supernode` and `flwr-clientapp`, so the
   ClientApp imports devft from the client venv), training one FedIT round of a tiny model on
   its own shard (`devft shard` with token ids). The run must finish and the node must log
   its shard.
4. Installs the `[server]` extra into the same venv and measures again: the coordinator's
   install. (`[bench]` adds no package to it: its scipy already comes with scikit-learn.)
Prints (and with --out writes) the numbers as JSON. Takes ~5-10 min (pip, mostly).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from deployment.cluster import CONNECTION, Cluster, run_config_arg  # noqa: E402
from deployment.pki import make_node_keys, make_server_certs  # noqa: E402
from tiny import save_tiny_model  # noqa: E402

from devft.config import DataConfig, ModelConfig  # noqa: E402
from devft.data import SHARD_NODE_KEY, write_client_shards  # noqa: E402
from devft.models.client_stage import client_tokenizer, tokenizer_digest  # noqa: E402


def tree_bytes(root: Path) -> int:
    """Bytes of every regular file under `root` (symlinks not followed)."""
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def pip(venv: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args],
                   check=True)
    return time.perf_counter() - start


def packages(venv: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list",
                          "--format=freeze"], check=True, capture_output=True, text=True)
    return sorted(line.split("==")[0].lower() for line in out.stdout.splitlines() if line)


def tiny_data(path: Path) -> Path:
    rows = [{"instruction": f"What is {i} plus 1?", "input": "", "output": str(i + 1),
             "category": ["a", "b", "c"][i % 3]} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def smoke_run(client_bin: Path, root: Path) -> dict[str, object]:
    """One FedIT round with a SuperNode from `client_bin` training on its shard."""
    model_dir = save_tiny_model(root / "tiny-model", "llama", num_layers=4)
    data_file = tiny_data(root / "tiny.jsonl")
    data = DataConfig(name=str(data_file), eval_examples=4, max_seq_len=64)
    model = ModelConfig(path=str(model_dir))
    shard = write_client_shards(data, 1, 0, root / "shards", client_tokenizer(model),
                                tokenizer_digest(model))[0]
    base = root / "base.yaml"
    base.write_text("seed: 0\ndata: {max_seq_len: 64, eval_batch_size: 4}\n"
                    "train: {batch_size: 2, lr: 0.01, threads: 1}\n")
    cluster = Cluster(root / "cluster", make_server_certs(root / "cluster" / "certs"))
    try:
        cluster.start_superlink()
        keys = make_node_keys(root / "cluster" / "keys", "owner")
        node_id = cluster.register(keys)
        node = cluster.start_supernode(
            "owner", f"partition-id=0 num-partitions=1 {SHARD_NODE_KEY}='{shard}'", keys,
            bin_dir=client_bin)
        node.wait_for_log(rf"SuperNode ID: {node_id}\b", timeout=120)
        overrides = {"config-file": str(base), "model.path": str(model_dir),
                     "data.name": str(data_file), "method": "fedit", "federation.rounds": 1,
                     "federation.num_clients": 1, "output.dir": str(root / "out"),
                     "output.progress": False, "train.local_steps": 1,
                     "data.eval_examples": 4}
        start = time.perf_counter()
        res = cluster.flwr("run", str(REPO), CONNECTION, "--run-config",
                           run_config_arg(overrides), "--stream", timeout=600)
        run_id = re.search(r"Successfully started run (\d+)", res.stdout).group(1)
        status = cluster.flwr_json("ls", CONNECTION, "--run-id", run_id)["runs"][0]["status"]
        served = re.search(r"client partition 0 of 1: \d+ training rows from shard .*",
                           node.log())
        return {"status": status, "run_s": round(time.perf_counter() - start, 1),
                "node_log_line": served.group(0) if served else None}
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/devft-client-venv"))
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    venv = args.venv
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result: dict[str, object] = {"venv": str(venv)}
    result["pip_s_core"] = round(pip(venv, "torch==2.13.0") + pip(venv, str(REPO)), 1)
    core = packages(venv)
    result["core_bytes"], result["core_packages"] = tree_bytes(venv), len(core)
    with tempfile.TemporaryDirectory(prefix="devft-client-smoke-") as tmp:
        result["smoke"] = smoke_run(venv / "bin", Path(tmp))
    result["pip_s_server"] = round(pip(venv, f"{REPO}[server]"), 1)
    full = packages(venv)
    result["full_bytes"], result["full_packages"] = tree_bytes(venv), len(full)
    result["server_only_packages"] = sorted(set(full) - set(core))
    result["core_share_of_full"] = round(result["core_bytes"] / result["full_bytes"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = result["smoke"]["status"] == "finished:completed" and result["smoke"]["node_log_line"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
