"""What a client's data costs in memory: the whole data set (the simulation's path) against
its own shard (`devft shard`, node config `data-shard`), in fresh client processes.

Each child does the imports of a client (`devft.federation.client_app`), then gets client
k's data by `client_shard` either way, draws one round's batches and reports its RSS and
peak RSS (VmHWM) before and after, and which data libraries it has imported. Writes
client_data_memory.json and client_data_memory.png.

    python benchmarks/client_data_memory.py --out runs/bench/client-data-memory
    python benchmarks/client_data_memory.py --set data.name=FILE.jsonl --out /tmp/cdm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import run_script  # noqa: E402

MIB = 2**20
LIBRARIES = ("datasets", "pyarrow", "flwr_datasets")


def status() -> dict[str, int]:
    """VmHWM and VmRSS of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(config: str, overrides: list[str], client: int, shard: str) -> dict[str, Any]:
    """One client's data, the way its ClientApp gets it, in this fresh process."""
    import devft.federation.client_app  # noqa: F401  (a client's imports)
    from devft.config import load_config
    from devft.data import client_shard

    cfg = load_config(config, overrides)
    before = status()
    data = client_shard(cfg.data, cfg.federation.num_clients, cfg.seed, client, shard or None)
    batches = data.batches(1, cfg.train.local_steps, cfg.train.batch_size, cfg.seed)
    after = status()
    return {"before": before, "after": after, "rows": data.size,
            "batch_rows": sum(len(b) for b in batches),
            "libraries": [m for m in LIBRARIES if m in sys.modules]}


def _spawn(config: str, overrides: list[str], client: int, shard: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", "--config", config, "--client", str(client),
            "--shard", shard, *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"client process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(config: str, overrides: list[str], clients: list[int], out: Path) -> dict[str, Any]:
    """Per client: the whole data set against its shard, each in a fresh process."""
    from devft.config import load_config
    from devft.data import write_client_shards

    cfg = load_config(config, overrides)
    paths = write_client_shards(cfg.data, cfg.federation.num_clients, cfg.seed, out / "shards")
    rows = []
    for k in clients:
        for way, shard in (("whole data set", ""), ("own shard", str(paths[k]))):
            r = _spawn(config, overrides, k, shard)
            rows.append({"client": k, "way": way, "rows": r["rows"],
                         "libraries": r["libraries"],
                         "rss_added_mib": (r["after"]["VmRSS"] - r["before"]["VmRSS"]) / MIB,
                         "peak_added_mib": (r["after"]["VmHWM"] - r["before"]["VmRSS"]) / MIB,
                         "shard_file_mib": paths[k].stat().st_size / MIB if shard else None})
            print(json.dumps(rows[-1]), flush=True)
    return {"data": cfg.data.name, "num_clients": cfg.federation.num_clients, "rows": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    clients = sorted({r["client"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    for i, way in enumerate(("whole data set", "own shard")):
        ys = [next(r["peak_added_mib"] for r in rows if r["client"] == k and r["way"] == way)
              for k in clients]
        ax.bar([k + (i - 0.5) * width for k in clients], ys, width, label=way)
    ax.set(xlabel="client", ylabel="peak RSS added by its data (MiB)",
           title=f"client data memory ({result['data']}, {result['num_clients']} clients)",
           xticks=clients)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--clients", default="0,1", help="comma-separated client ids to measure")
    ap.add_argument("--out", default="runs/bench/client-data-memory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        result = child(args.config, args.set, args.client, args.shard)
        print(json.dumps(result))
        return result
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    result = measure(args.config, args.set, clients, out)
    (out / "client_data_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "client_data_memory.png")
    print(f"client_data_memory.json and .png in {out}")
    return result


if __name__ == "__main__":
    run_script(main)
