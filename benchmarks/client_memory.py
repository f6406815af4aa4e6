"""Peak memory of a client process per stage, measured in real client processes.

The real ServerApp (`ServerRun`) runs DevFT and FedIT with one client over a grid that hands
every train message to a fresh Python process, as a SuperNode hands it to a ClientApp
process: the message travels in Flower's own wire form (its deflated object tree), the node's
Context as Flower's protobuf, and the child runs `devft.federation.client_app:app`, which
reads the run config from the Context like under `flwr run`. The child's peak RSS (VmHWM) is
the client's peak. The same message is also replayed in fresh processes at the other batch
shapes and with gradient checkpointing on, and with the legacy client (the whole base loaded
by transformers, the stage fused from it), for comparison; only the first reply goes back to
the server.

Per child it reports: the peak; the peak above the "floor" (VmHWM of the same kind of
process after the same imports, with no model: torch, transformers, flwr, peft, devft's client
and the data libraries it imports, datasets and flwr-datasets; the strict floor of torch,
transformers and flwr alone is reported too); and the limit computed from tensors:
frozen weights + LoRA with its gradient and AdamW's two moments (4 x fp32) + the peak of the
tensors autograd saves for backward at the batch's shape (+ the largest of them, for the
gradient in flight), measured with saved_tensors_hooks on one extra step after the peak was
read. Records are all of max_seq_len tokens, so shapes are exact. Writes client_memory.json
and client_memory.png.

    python benchmarks/client_memory.py --out runs/bench/client-memory          # both models
    python benchmarks/client_memory.py --models smollm2-135m-instruct --out /tmp/cm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = ((4, 192), (1, 64))
VARIANT = ("batch", "seq", "checkpointing", "legacy", "release_memory")
MIB = 2**20
CHILD = Path(__file__).with_name("client_memory_process.py")
"""The script each measured client process runs."""


# ---- parent: the real ServerApp over a grid of client processes ----------------------------
def _child_json(arg: str, env: dict[str, str] | None = None) -> dict:
    """Run CHILD with `arg` (a spec path, `floor` or `floor-strict`) in a fresh process; its
    last stdout line, parsed."""
    proc = subprocess.run([sys.executable, str(CHILD), arg], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"client process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_child(spec: dict, work: Path) -> dict:
    (work / "spec.json").write_text(json.dumps(spec))
    return _child_json(str(work / "spec.json"),
                       {**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _variants(legacy: bool) -> list[dict[str, Any]]:
    """The served variant first (default shape, checkpointing off), then the replays (a
    variant may add `overrides` of the run config and `spec` entries for the child):
    checkpointing at the default shape (where activations dominate), the small shape, and,
    when `legacy`, at both shapes: the stage client with glibc's default allocator
    (train.release_memory=false) and the legacy client (whole base, default allocator)."""
    (big, seq), (small, small_seq) = SHAPES

    def v(batch, seq, ckpt=False, legacy=False, release=True):
        return {"batch": batch, "seq": seq, "checkpointing": ckpt, "legacy": legacy,
                "release_memory": release}

    out = [v(big, seq), v(big, seq, ckpt=True), v(small, small_seq)]
    if legacy:
        out += [v(b, t, release=False) for b, t in SHAPES]
        out += [v(b, t, legacy=True, release=False) for b, t in SHAPES]
    return out


def make_grid(cfg, results: list[dict], label: str, legacy: bool):
    """An InProcessGrid whose ClientApp call is a set of fresh client processes."""
    from flwr.app import Context
    from flwr.common.serde import context_from_proto, context_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from devft.federation.client_app import make_client_app
    from devft.federation.grid import InProcessGrid

    def call(msg, context: Context):
        plan_layers = len(msg.content["config"]["group-sizes"])
        reply = None
        for variant in _variants(legacy):
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                objs = {k: v.deflate().hex() for k, v in get_all_nested_objects(msg).items()}
                (work / "message.json").write_text(json.dumps({
                    "root": msg.object_id, "objects": objs,
                    "message_id": msg.metadata.message_id}))
                (work / "context.pb").write_bytes(context_to_proto(context).SerializeToString())
                run_cfg = cfg.replace(**{
                    "train.batch_size": variant["batch"], "data.max_seq_len": variant["seq"],
                    "train.gradient_checkpointing": variant["checkpointing"],
                    "train.release_memory": variant["release_memory"],
                    **variant.get("overrides", {})})
                start = time.perf_counter()
                out = _run_child({"run_config": run_cfg.to_run_config(),
                                  "legacy": variant["legacy"], **variant.get("spec", {})}, work)
                out.update(variant, method=label, layers=plan_layers,
                           process_s=time.perf_counter() - start)
                results.append(out)
                print(json.dumps({k: out[k] for k in ("method", "layers", *VARIANT)}),
                      "peak MiB", out["marks"]["after_train"]["VmHWM"] // MIB, flush=True)
                if reply is None:  # the served variant: its reply and state go back
                    data = json.loads((work / "reply.json").read_text())
                    contents = {k: bytes.fromhex(v) for k, v in data["objects"].items()}
                    reply = inflate_object_from_contents(data["root"], contents)
                    new = context_from_proto(ProtoContext.FromString(
                        (work / "context-out.pb").read_bytes()))
                    context.state = new.state
        return reply

    grid = InProcessGrid(make_client_app(cfg), 1)
    grid._app = call
    return grid


def _write_data(path: Path) -> Path:
    """Records longer than any max_seq_len here: every row is exactly max_seq_len tokens."""
    import random

    rng = random.Random(0)
    words = ["river", "stone", "market", "cloud", "seven", "garden", "signal", "amber",
             "harbor", "violet", "engine", "paper", "winter", "copper", "forest", "table"]
    rows = [{"instruction": " ".join(rng.choice(words) for _ in range(400)), "input": "",
             "output": " ".join(rng.choice(words) for _ in range(400)), "category": "long"}
            for _ in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_model(model: str, out: Path, data: Path, threads: int, legacy: bool) -> list[dict]:
    from devft.config import load_config
    from devft.federation.server_app import run_server
    from devft.models.client_stage import client_layout

    results: list[dict] = []
    depth = None
    for method in ("fedit", "devft"):
        overrides = [
            f"model.path={model}", "model.device=cpu", "model.dtype=fp32", f"method={method}",
            f"data.name={data}", "data.eval_examples=2", "data.eval_batch_size=2",
            "federation.num_clients=1", "train.local_steps=2", "train.batch_size=4",
            "data.max_seq_len=192", f"train.threads={threads}", "devft.calibration_examples=2",
            "output.progress=false", f"output.dir={out / 'runs' / model / method}"]
        cfg = load_config(None, overrides)
        depth = depth or client_layout(cfg.model).depth
        rounds = 1 if method == "fedit" else 4
        cfg = cfg.replace(**{"federation.rounds": rounds, "devft.rounds_per_stage": [1]})
        run_server(make_grid(cfg, results, method, legacy), cfg)
    return results


def summarize(results: list[dict], floor: int) -> list[dict]:
    rows = []
    for r in results:
        peak = r["marks"]["after_train"]["VmHWM"]
        rows.append({"method": r["method"], "layers": r["layers"],
                     **{k: r.get(k, True) for k in VARIANT}} | {
            "peak_bytes": peak, "above_floor_bytes": peak - floor,
            "build_peak_above_import_bytes": (r["marks"]["after_build"]["VmHWM"]
                                              - r["marks"]["after_import"]["VmRSS"]),
            "marks": r["marks"],
            "rss_file_bytes": r["marks"]["after_train"]["RssFile"],
            "limit": r["limit"],
            "step_s": r["metrics"]["train-time-s"] / max(1, r["metrics"]["steps"]),
            "process_s": r["process_s"]})
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Ratio to the FedIT client of the same variant, to the limit, and step time to the same
    stage without checkpointing."""
    for row in rows:
        ref = next((x for x in rows if x["method"] == "fedit"
                    and all(x[k] == row[k] for k in VARIANT)), None)
        row["ratio_to_fedit"] = row["above_floor_bytes"] / ref["above_floor_bytes"] if ref else None
        row["vs_limit"] = (row["above_floor_bytes"] / row["limit"]["total"]
                           if row["limit"] else None)
        off = next(x for x in rows if x["method"] == row["method"]
                   and x["layers"] == row["layers"] and x["batch"] == row["batch"]
                   and not x["checkpointing"] and x["legacy"] == row["legacy"]
                   and x["release_memory"] == row["release_memory"])
        row["step_time_vs_no_checkpointing"] = row["step_s"] / off["step_s"]
    return rows



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench/client-memory")
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--legacy-models", default="smollm2-135m-instruct",
                        help="models also measured with the legacy (full-base) client")
    parser.add_argument("--merge", metavar="OLD.json,...,NEW.json",
                        help="combine the rows of several runs' JSON (later runs win)")
    parser.add_argument("--step-times", metavar="MODEL:LAYERS:BATCHxSEQ",
                        help="time steps with checkpointing off and on, side by side, and exit")
    parser.add_argument("--breakdown", metavar="MODEL:LAYERS:BATCHxSEQ",
                        help="print where one client's memory goes, step by step, and exit")
    args = parser.parse_args()
    if args.merge:  # rows of earlier runs (e.g. the legacy client's) beside the latest
        paths = [Path(p) for p in args.merge.split(",")]
        report = json.loads(paths[-1].read_text())
        for path in paths[:-1]:
            for model, rows in json.loads(path.read_text())["models"].items():
                have = {(r["method"], r["layers"], *(r[k] for k in VARIANT))
                        for r in report["models"].get(model, [])}
                extra = [r for r in rows if (r["method"], r["layers"],
                                             *(r.get(k, True) for k in VARIANT)) not in have]
                report["models"].setdefault(model, []).extend(extra)
        for model, rows in report["models"].items():
            report["models"][model] = with_ratios(rows)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "client_memory.json").write_text(json.dumps(report, indent=2))
        _plot(report, out / "client_memory.png")
        return
    if args.breakdown or args.step_times:
        model, layers, shape = (args.breakdown or args.step_times).rsplit(":", 2)
        batch, seq = (int(v) for v in shape.split("x"))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = _write_data(out / "long-records.jsonl")
        from client_memory_process import breakdown, step_times

        fn = breakdown if args.breakdown else step_times
        print(json.dumps(fn(model, int(layers), batch, seq, data)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _write_data(out / "long-records.jsonl")
    floors = [_run_child_floor("floor") for _ in range(3)]
    strict = [_run_child_floor("floor-strict") for _ in range(3)]
    floor = min(floors)
    report: dict[str, Any] = {"floor_bytes": floor, "floor_runs_bytes": floors,
                              "floor_strict_bytes": min(strict), "floor_strict_runs": strict,
                              "shapes": SHAPES, "models": {}}
    for model in args.models.split(","):
        results = run_model(model, out, data, args.threads,
                            model in args.legacy_models.split(","))
        report["models"][model] = summarize(results, floor)
        (out / "client_memory.json").write_text(json.dumps(report, indent=2))
    _plot(report, out / "client_memory.png")


def _run_child_floor(kind: str) -> int:
    return _child_json(kind)["floor"]["VmHWM"]


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, (batch, seq) in enumerate(SHAPES):
            ax = axes[i][j]
            rows = [r for r in report["models"][model] if r["batch"] == batch]
            labels = sorted({(r["method"], r["layers"]) for r in rows},
                            key=lambda k: (k[0] == "fedit", k[1]))
            x = range(len(labels))

            def pick(method, layers, ckpt, legacy, release, key, rows=rows):
                r = next((r for r in rows if (r["method"], r["layers"]) == (method, layers)
                          and r["checkpointing"] == ckpt and r["legacy"] == legacy
                          and r["release_memory"] == release), None)
                if r is None:
                    return 0.0  # not measured at this shape
                return (r[key] if key != "limit" else r["limit"]["total"]) / MIB

            bars = (("legacy client (full base)", False, True, False, "above_floor_bytes"),
                    ("stage client, glibc default", False, False, False, "above_floor_bytes"),
                    ("stage client", False, False, True, "above_floor_bytes"),
                    ("stage client + checkpointing", True, False, True, "above_floor_bytes"),
                    ("limit from tensors", False, False, True, "limit"))
            for k, (name, ckpt, legacy, release, key) in enumerate(bars):
                ax.bar([v + k * 0.16 for v in x], [pick(m, n, ckpt, legacy, release, key)
                                                   for m, n in labels], 0.16, label=name)
            ax.set_xticks([v + 0.32 for v in x], [f"{m} {n}L" for m, n in labels], fontsize=8)
            ax.set_ylabel("peak RSS above floor (MiB)")
            ax.set_title(f"{model}, batch {batch}x{seq}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
