"""What a client's data costs in memory, in fresh client processes, three ways: the whole
data set (the simulation's path), its own shard's rows (`devft shard`, node config
`data-shard`), and its own shard's token ids (no tokenizer loaded).

Each child does the imports of a client (`devft.federation.client_app`), then gets client
k's data by `client_shard` and makes one round's batches with the ClientApp's own
`_train_batches` (which tokenizes, loading the tokenizer, unless the shard's token ids
serve the run). It reports RSS and peak RSS (VmHWM) before and after, which data libraries
it imported and whether it loaded the tokenizer. Writes client_data_memory.json and .png.

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
from client_memory import MIB  # noqa: E402
from client_memory_process import status  # noqa: E402  (this process's VmHWM, VmRSS, ...)
from common import run_script  # noqa: E402

LIBRARIES = ("datasets", "pyarrow", "flwr_datasets")


def child(config: str, overrides: list[str], client: int, shard: str) -> dict[str, Any]:
    """One client's data, the way its ClientApp gets it, in this fresh process."""
    from types import SimpleNamespace

    import devft.federation.client_app as client_app  # a client's imports
    from devft.config import load_config
    from devft.data import client_shard
    from devft.models.loading import load_tokenizer

    cfg = load_config(config, overrides)
    before = status()
    data = client_shard(cfg.data, cfg.federation.num_clients, cfg.seed, client, shard or None)
    batches = client_app._train_batches(cfg, SimpleNamespace(round=1, data=data), None)
    after = status()
    return {"before": before, "after": after, "rows": data.size,
            "batch_rows": sum(int(b["input_ids"].shape[0]) for b in batches),
            "libraries": [m for m in LIBRARIES if m in sys.modules],
            "tokenizer_loaded": load_tokenizer.cache_info().currsize > 0}


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
    from devft.models.client_stage import client_tokenizer, tokenizer_digest

    cfg = load_config(config, overrides)
    n, seed = cfg.federation.num_clients, cfg.seed
    plain = write_client_shards(cfg.data, n, seed, out / "shards-rows")
    tokens = write_client_shards(cfg.data, n, seed, out / "shards-tokens",
                                 client_tokenizer(cfg.model), tokenizer_digest(cfg.model))
    rows = []
    for k in clients:
        for way, shard in (("whole data set", ""), ("own shard", str(plain[k])),
                           ("own shard, token ids", str(tokens[k]))):
            r = _spawn(config, overrides, k, shard)
            rows.append({"client": k, "way": way, "rows": r["rows"],
                         "libraries": r["libraries"], "tokenizer_loaded": r["tokenizer_loaded"],
                         "rss_added_mib": (r["after"]["VmRSS"] - r["before"]["VmRSS"]) / MIB,
                         "peak_added_mib": (r["after"]["VmHWM"] - r["before"]["VmRSS"]) / MIB,
                         "shard_file_mib": Path(shard).stat().st_size / MIB if shard else None})
            print(json.dumps(rows[-1]), flush=True)
    return {"data": cfg.data.name, "model": cfg.model.path, "max_seq_len": cfg.data.max_seq_len,
            "num_clients": n, "rows": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    clients = sorted({r["client"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ways = ("whole data set", "own shard", "own shard, token ids")
    width = 0.8 / len(ways)
    for i, way in enumerate(ways):
        ys = [next(r["peak_added_mib"] for r in rows if r["client"] == k and r["way"] == way)
              for k in clients]
        ax.bar([k + (i - (len(ways) - 1) / 2) * width for k in clients], ys, width, label=way)
    ax.set(xlabel="client", ylabel="peak RSS added by data + tokenizer (MiB)",
           title=f"client data memory ({Path(result['model']).name}, {result['data']}, "
                 f"{result['num_clients']} clients)", xticks=clients)
    ax.set_ylim(0, 1.35 * max(r["peak_added_mib"] for r in rows))  # room for the legend
    ax.legend(fontsize=8, ncol=3, loc="upper center")
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
