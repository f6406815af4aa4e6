"""Overhead of a devft client round over a bare peft loop, and the server's stage-change cost.

Client round: the train message is built as `StagedStrategy.configure_train` builds it (the
rule's tensors + the stage plan in a ConfigRecord) and sent through `InProcessGrid` to the real
ClientApp (`make_client_app` -> `client_train`), as `devft run` does. The bare loop is plain
torch on a peft `get_peft_model` of the same submodel (same groups and fusion), with the same
LoRA state, batches, optimizer (AdamW, same lr), precision and response-only loss:
forward, backward, step, zero_grad, nothing else. The two alternate (A, B, A, B, ...) after
one warm-up each; the reported ratio is median(project) / median(bare). The project's parts
are timed by wrapping the names `client_train` calls (and torch's clip_grad_norm_);
`train_loop` is train_local's own timer (the part the bare loop stands for), `unaccounted` the
rest (ClientApp dispatch, make_rule, plan parsing, the reply Message).

Server, per stage change: layer similarity, spectral grouping and LoRA fusion
(`GlobalModel.plan_stage`), plus one uncached build of the stage submodel with LoRA (done
once per stage by the server for the submodel's evaluation and by every client process), as
seconds and as a ratio to one full-model client round. Writes overhead.json and overhead.png.
Run it on an otherwise idle machine: with other jobs on the cores, `--threads` above the free
cores oversubscribes them and times inflate many-fold and unevenly (then try --threads 1).

    python benchmarks/overhead.py --out runs/bench/overhead                    # bundled, CPU
    python benchmarks/overhead.py --model /tmp/tiny-llama --repeats 2 --out /tmp/overhead
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from peft import get_peft_model, set_peft_model_state_dict

import devft.federation.client_app as client_app
from devft.config import RunConfig, load_config
from devft.core.grouping import group_layers
from devft.core.recipes import stage_groups
from devft.core.schedule import Stage
from devft.core.stagemaps import fuse_state
from devft.data import collate, encode, federated_data
from devft.federation.global_model import GlobalModel
from devft.federation.grid import InProcessGrid
from devft.federation.wire import plan_to_config, to_array_record, wire_bytes
from devft.models.lora import attach_lora, peft_config
from devft.models.submodel import StagePlan, build_submodel
from devft.rules import NodeSlot, make_rule
from devft.training.loss import response_loss

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
# part of a client round -> the name `client_train` looks up in devft.federation.client_app
PARTS = {"deserialize": "from_array_record", "plan+env": "_env",
         "stage_model": "client_stage_model",
         "load_lora": "set_lora_state", "get_lora": "get_lora_state", "data": "federated_data",
         "encode": "encode", "collate": "collate", "train_local": "train_local",
         "serialize": "to_array_record"}


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def timed_parts(acc: dict[str, float]) -> Iterator[None]:
    """Wrap the functions `client_train` calls (and clip_grad_norm_) to add their time to acc."""
    def wrap(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[part] += time.perf_counter() - start
        return inner

    saved = {name: getattr(client_app, name) for name in PARTS.values()}
    clip = torch.nn.utils.clip_grad_norm_
    for part, name in PARTS.items():
        setattr(client_app, name, wrap(part, saved[name]))
    torch.nn.utils.clip_grad_norm_ = wrap("clip_grad_norm", clip)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(client_app, name, fn)
        torch.nn.utils.clip_grad_norm_ = clip


def server_stage_change(gm: GlobalModel, stage: Stage) -> tuple[StagePlan, dict, dict]:
    """The server's work at the start of `stage`, timed part by part (then the real call)."""
    k, cfg = stage.num_layers, gm.cfg
    start = time.perf_counter()
    sim = gm.similarity().numpy() if k < gm.depth else None  # the full stage needs none
    similarity = time.perf_counter() - start
    start = time.perf_counter()
    groups = stage_groups(gm.method.recipe, gm.depth, k, lambda: sim, cfg.devft.laplacian,
                          seed=cfg.seed)
    grouping = time.perf_counter() - start
    start = time.perf_counter()
    fuse_state(gm.lora, groups, cfg.devft.beta, gm.method.fusion, gm.prefix)
    fusion = time.perf_counter() - start
    start = time.perf_counter()
    sub = build_submodel(gm.base.model, gm.base.family, groups, cfg.devft.beta,
                         gm.method.fusion)
    attach_lora(sub, cfg.lora, gm.base.family)
    build = time.perf_counter() - start
    start = time.perf_counter()
    plan, sub_lora = gm.plan_stage(stage)
    plan_s = time.perf_counter() - start
    assert plan.group_lists() == groups
    cost = {"layers": k, "similarity_s": similarity, "grouping_s": grouping,
            "fusion_s": fusion, "submodel_build_s": build,
            "total_s": similarity + grouping + fusion + build, "plan_stage_call_s": plan_s}
    return plan, sub_lora, cost


def measure_stage(cfg: RunConfig, gm: GlobalModel, plan: StagePlan, sub_lora: dict,
                  repeats: int) -> dict[str, Any]:
    """Interleaved project rounds (through the ClientApp) and bare peft loops on one stage."""
    base, n, round_ = gm.base, cfg.federation.num_clients, 1
    grid = InProcessGrid(client_app.make_client_app(cfg), n)
    node = min(grid.get_node_ids())
    server_rule = make_rule(cfg)
    server_rule.start_stage(sub_lora, plan)
    # the bare loop: its own peft model of the same submodel, the same batches as partition 0
    sub = build_submodel(base.model, base.family, plan.group_lists(), plan.beta, plan.fusion)
    bare = get_peft_model(sub, peft_config(cfg.lora, base.family, sub))
    tok = base.tokenizer
    data = federated_data(cfg.data, n, cfg.seed)
    batches = [collate([encode(r, tok, cfg.data.max_seq_len) for r in records], tok.pad_token_id)
               for records in data.client_batches(0, round_, cfg.train.local_steps,
                                                  cfg.train.batch_size, cfg.seed)]
    parts: dict[str, list[float]] = defaultdict(list)

    def project() -> float:
        tensors, extra = server_rule.message(NodeSlot(node, 0, n))
        config = {**plan_to_config(plan), **extra, "server-round": 1, "global-round": round_}
        msg = Message(RecordDict({"arrays": to_array_record(tensors),
                                  "config": ConfigRecord(config)}),
                      message_type=MessageType.TRAIN, dst_node_id=node)
        acc: dict[str, float] = defaultdict(float)
        gc.collect()
        with timed_parts(acc):
            start = now(base.device)
            (reply,) = grid.send_and_receive([msg])
            elapsed = now(base.device) - start
        if reply.has_error():
            raise RuntimeError(f"client round failed: {reply.error.reason}")
        acc["unaccounted"] = elapsed - sum(acc[part] for part in PARTS)
        acc["train_loop"] = float(reply.content["metrics"]["train-time-s"])
        start = time.perf_counter()
        _ = wire_bytes(msg) + wire_bytes(reply)
        acc["server_metering"] = time.perf_counter() - start  # MeteredGrid; not in elapsed
        for key, value in acc.items():
            parts[key].append(value)
        return elapsed

    def bare_loop() -> float:
        set_peft_model_state_dict(bare, sub_lora)
        bare.train()
        gc.collect()
        start = now(base.device)
        opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad],
                                lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        for batch in batches:
            loss_sum, count = response_loss(bare, batch, cfg.train.precision)
            (loss_sum / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return now(base.device) - start

    first, _ = project(), bare_loop()  # warm-up (the project's builds the cached submodel)
    parts.clear()
    proj, bare_s = [], []
    for _ in range(repeats):
        proj.append(project())
        bare_s.append(bare_loop())
    med_p, med_b = statistics.median(proj), statistics.median(bare_s)
    loop = statistics.median(parts["train_loop"])
    return {"layers": plan.num_layers, "groups": plan.group_lists(), "first_round_s": first,
            "project_s": proj, "bare_s": bare_s, "median_project_s": med_p,
            "median_bare_s": med_b, "ratio": med_p / med_b,
            "median_pair_ratio": statistics.median(p / b for p, b in zip(proj, bare_s)),
            "loop_ratio": loop / med_b, "outside_loop_s": med_p - loop,
            "parts_median_s": {k: statistics.median(v) for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=1, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--stage-layers", type=int, default=8,
                        help="the DevFT stage measured besides the full model (nearest one)")
    parser.add_argument("--out", default="runs/bench/overhead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG).replace(**{
        "model.path": args.model, "train.local_steps": args.steps,
        "train.batch_size": args.batch_size, "data.max_seq_len": args.max_seq_len,
        "train.precision": args.precision, "train.threads": args.threads,
        "output.progress": False})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    gm = GlobalModel(cfg, make_rule(cfg))
    setup_s = time.perf_counter() - start
    schedule = gm.schedule()
    start = time.perf_counter()  # once per server process: sklearn's import, first KMeans
    group_layers(np.eye(4) + 0.1, 2)
    first_grouping_s = time.perf_counter() - start
    plans, server = {}, []
    for stage in schedule:
        plan, sub_lora, cost = server_stage_change(gm, stage)
        plans[stage.num_layers] = (plan, sub_lora)
        server.append(cost)
    small = min((s.num_layers for s in schedule if s.num_layers < gm.depth),
                key=lambda k: abs(k - args.stage_layers), default=None)
    rows = [measure_stage(cfg, gm, *plans[k], args.repeats)
            for k in ([small] if small else []) + [gm.depth]]
    by_layers = {r["layers"]: r for r in rows}
    full_round = by_layers[gm.depth]["median_project_s"]
    for cost in server:
        cost["ratio_to_full_round"] = cost["total_s"] / full_round
        own = by_layers.get(cost["layers"])
        cost["ratio_to_stage_round"] = cost["total_s"] / own["median_project_s"] if own else None
    report = {"model": args.model, "device": str(gm.base.device), "depth": gm.depth,
              "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
              "max_seq_len": args.max_seq_len, "precision": args.precision,
              "repeats": args.repeats, "lr": cfg.train.lr,
              "max_grad_norm": cfg.train.max_grad_norm, "server_setup_s": setup_s,
              "first_grouping_call_s": first_grouping_s,
              "client_rounds": rows, "server_stage_change": server}
    (out / "overhead.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / "overhead.png", f"{Path(args.model).name}, {args.steps} step(s), "
          f"batch {args.batch_size}x{args.max_seq_len}, {args.threads} threads")
    for r in rows:
        print(f"{r['layers']:>3} layers: project {r['median_project_s']:.3f} s, bare "
              f"{r['median_bare_s']:.3f} s, ratio {r['ratio']:.3f} "
              f"(pairs {r['median_pair_ratio']:.3f}, loop only {r['loop_ratio']:.3f}); "
              f"first round {r['first_round_s']:.3f} s")
        print("     parts:", {k: round(v, 4) for k, v in r["parts_median_s"].items()})
    for c in server:
        print(f"stage change to {c['layers']:>3} layers: {c['total_s']:.3f} s "
              f"(= {c['ratio_to_full_round']:.2f} full-model rounds)",
              {k: round(v, 4) for k, v in c.items() if k.endswith("_s")})


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = list(range(len(rows)))
    ax.bar([v - 0.2 for v in x], [r["median_project_s"] for r in rows], 0.4,
           label="devft client round (ClientApp)")
    ax.bar([v + 0.2 for v in x], [r["median_bare_s"] for r in rows], 0.4,
           label="bare peft loop")
    for v, r in zip(x, rows):
        top = max(r["median_project_s"], r["median_bare_s"])
        ax.annotate(f"devft / bare = {r['ratio']:.3f}", (v, top), ha="center", va="bottom",
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(x, [f"{r['layers']} layers" for r in rows])
    ax.set_ylabel("median seconds per round")
    ax.set_ylim(0, 1.25 * max(max(r["median_project_s"], r["median_bare_s"]) for r in rows))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
