"""How a round's wall time, memory and bytes grow with the number of clients.

For each client count, runs FedIT and DevFT (two stages, `--stages`, one round each: the small
stage and the full model) with every client sampled every round, on the in-process grid
(clients run one after another in one process, as the simulation would on one machine), and
records per round: wall time, bytes down and up, the process's resident memory and a client's
peak memory. Writes scaling.json and scaling.png (each figure against the client count, per
method and stage).

    python benchmarks/scaling.py --clients 2,4,8,16 --out runs/bench/scaling
    python benchmarks/scaling.py --config /tmp/tiny.yaml --clients 2,4 --stages 2,4 --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import int_list, run_script  # noqa: E402

from devft.cli import setup_logging  # noqa: E402
from devft.config import load_config  # noqa: E402
from devft.federation.runner import run_method  # noqa: E402
from devft.reporting.recorder import read_metrics  # noqa: E402

FIGURES = (("wall_s", "wall time per round (s)", 1.0), ("mb_per_round", "MB per round", 1.0),
           ("process_rss_mib", "server+clients process RSS (MiB)", 1.0),
           ("client_peak_mib", "a client's peak memory (MiB)", 1.0))


def measure(config: str, method: str, clients: int, stages: str, out: Path) -> list[dict]:
    """Per-round figures of one short run with `clients` clients, all sampled every round."""
    overrides = [f"method={method}", f"federation.num_clients={clients}",
                 "federation.clients_per_round=0", f"output.dir={out}", "output.progress=false"]
    if method == "devft":
        overrides += [f"devft.stages=[{stages}]", "devft.rounds_per_stage=[1,1]",
                      "federation.rounds=2"]
    else:
        overrides.append("federation.rounds=1")
    run_method(load_config(config, overrides))
    rows, records = [], read_metrics(out)
    previous = records[0]["wall_time_s"]  # round 0: the initial evaluation, untimed
    for r in records[1:]:
        rows.append({"method": method, "clients": clients, "stage": r["stage"],
                     "layers": r["layers_trained"], "wall_s": r["wall_time_s"] - previous,
                     "mb_per_round": (r["bytes_down"] + r["bytes_up"]) / 1e6,
                     "process_rss_mib": r["process_rss_bytes"] / 2**20,
                     "client_peak_mib": r["client_peak_mem_bytes"] / 2**20})
        previous = r["wall_time_s"]
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(5 * len(FIGURES), 4))
    series = sorted({(r["method"], r["layers"]) for r in rows})
    for ax, (key, label, _) in zip(axes, FIGURES):
        for method, layers in series:
            pts = [(r["clients"], r[key]) for r in rows
                   if (r["method"], r["layers"]) == (method, layers)]
            ax.plot(*zip(*pts), marker="o", label=f"{method}, {layers} layers")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients (all sampled every round)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--clients", type=int_list, default="2,4,8,16")
    ap.add_argument("--stages", default="8,30", help="DevFT's two stages (small, full)")
    ap.add_argument("--out", default="runs/bench/scaling")
    args = ap.parse_args()
    setup_logging(verbose=False)
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    for n in args.clients:
        for method in ("fedit", "devft"):
            rows += measure(args.config, method, n, args.stages, out / f"{method}-{n}")
            (out / "scaling.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    plot(rows, out / "scaling.png")
    for r in rows:
        print(f"{r['method']:6s} {r['layers']:3d} layers, {r['clients']:3d} clients: "
              f"{r['wall_s']:7.1f} s/round, {r['mb_per_round']:7.1f} MB/round, RSS "
              f"{r['process_rss_mib']:6.0f} MiB, client peak {r['client_peak_mib']:6.0f} MiB")
    print(f"scaling.json and scaling.png in {out}")


if __name__ == "__main__":
    run_script(main)
