"""Inside one measured client process (benchmarks/client_memory.py runs this file fresh).

`python client_memory_process.py SPEC.json`: one ClientApp call on the message and Context
saved beside SPEC.json, printing the process's memory marks, the reply's metrics and the
limit computed from tensors as one JSON line; `floor` / `floor-strict` instead print the
VmHWM after the client's imports only (`floor-no-bnb`: as if bitsandbytes were not
installed). A spec with `plan` (the rows' response fraction) also records the memory
planner's floor and prediction (`devft.models.memory_plan`), made just before the stage is
built, as the mark `plan`. `breakdown` and `step_times` are the parent's --breakdown and
--step-times probes, which also run in a fresh process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out



def child(spec_path: str) -> None:
    """One ClientApp call (or a floor) in this process; prints one JSON line."""
    if spec_path == "floor-strict":  # torch, transformers and flwr only
        import flwr.clientapp  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        print(json.dumps({"floor": status()}))
        return
    if spec_path == "floor-no-bnb":  # the floor had bitsandbytes not been installed (peft
        sys.modules["bitsandbytes"] = None  # imports it whenever it is, quantizing or not)
        spec_path = "floor"
    import devft.federation.client_app as client_app  # the imports every client does

    if spec_path == "floor":  # + peft and devft, + the data libraries a client imports
        import datasets  # noqa: F401
        import flwr_datasets.partitioner  # noqa: F401

        print(json.dumps({"floor": status()}))
        return
    after_import = status()
    from flwr.app import Context, RecordDict
    from flwr.common.serde import context_from_proto, context_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec_path).parent
    objects = json.loads((work / "message.json").read_text())
    contents = {k: bytes.fromhex(v) for k, v in objects["objects"].items()}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = inflate_object_from_contents(objects["root"], contents)
    msg.metadata.__dict__["_message_id"] = objects["message_id"]
    context = context_from_proto(ProtoContext.FromString((work / "context.pb").read_bytes()))
    context = Context(run_id=context.run_id, node_id=context.node_id,
                      node_config=context.node_config, state=context.state or RecordDict(),
                      run_config=dict(spec["run_config"]))
    marks: dict[str, Any] = {"after_import": after_import}
    if spec.get("legacy"):
        _use_legacy_client(client_app)
    build = client_app._model

    def timed_build(*args, **kwargs):
        if "plan" in spec:  # args: cfg, rule, plan, settings, ...
            marks["plan"] = _predict(args[0], args[2].num_layers, spec["plan"])
        out = build(*args, **kwargs)
        marks["after_build"] = status()
        return out

    client_app._model = timed_build
    reply = client_app.app(msg, context)
    marks["after_train"] = status()
    if reply.has_error():
        raise SystemExit(f"client failed: {reply.error.reason}")
    metrics = dict(reply.content["metrics"])
    limit = _limit_from_tensors(client_app, spec)
    objs = {k: v.deflate().hex() for k, v in get_all_nested_objects(reply).items()}
    (work / "reply.json").write_text(json.dumps({"root": reply.object_id, "objects": objs}))
    context_out = context_to_proto(context).SerializeToString()
    (work / "context-out.pb").write_bytes(context_out)
    print(json.dumps({"marks": marks, "metrics": metrics, "limit": limit}))


def _use_legacy_client(client_app: Any) -> None:
    """The client before issue 10: the whole base loaded by transformers, stage fused from it."""
    from devft.models.loading import load_base_model
    from devft.models.submodel import stage_model

    def legacy(cfg, rule, plan, settings, msg, context, received, env):
        base = load_base_model(cfg.model)
        return stage_model(base, plan, settings), base.tokenizer

    client_app._model = legacy


def _limit_from_tensors(client_app: Any, spec: dict) -> dict[str, int]:
    """Weights, LoRA state and activations of the held stage, counted from its tensors (the
    activations with `devft.models.memory_probes.saved_tensor_peak`)."""
    from devft.config import from_run_config
    from devft.data import collate, encode, federated_data
    from devft.models.client_stage import HOLDER, client_tokenizer
    from devft.models.memory_probes import saved_tensor_peak
    from devft.models.submodel import frozen_parameter_bytes

    model = HOLDER.model
    if model is None:  # the legacy client's model is not held: its limit is the stage's
        return {}
    cfg = from_run_config(spec["run_config"])
    tok = client_tokenizer(cfg.model)
    data = federated_data(cfg.data, cfg.federation.num_clients, cfg.seed)
    records = next(iter(data.client_batches(0, 1, 1, cfg.train.batch_size, cfg.seed)))
    batch = collate([encode(r, tok, cfg.data.max_seq_len) for r in records], tok.pad_token_id)
    lora = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    saved = saved_tensor_peak(model, batch, cfg.train.precision)
    return {"weights": frozen_parameter_bytes(model), "lora_state": 4 * lora,
            "activations": saved.peak, "largest_activation": saved.largest,
            "total": frozen_parameter_bytes(model) + 4 * lora + saved.peak + saved.largest,
            "batch_shape": list(batch["input_ids"].shape)}


def _predict(cfg: Any, layers: int, response_fraction: float) -> dict[str, Any]:
    """The memory planner's floor and prediction for this client's stage, made where a
    budgeted client makes it: after its data is loaded, before its stage is built."""
    from devft.models.memory_plan import client_floor_bytes, planner_for

    floor = client_floor_bytes()
    start = time.perf_counter()
    planner = planner_for(cfg.model, cfg.lora, cfg.train.batch_size, cfg.data.max_seq_len,
                          cfg.train.precision, response_fraction)
    parts = planner.predict(layers, cfg.model.quantization, cfg.train.gradient_checkpointing,
                            floor)
    return {"layers": layers, "response_fraction": response_fraction, "parts": parts.as_dict(),
            "plan_s": time.perf_counter() - start, "after_plan": status()}


def breakdown(model: str, layers: int, batch: int, seq: int, data: Path,
              quantization: str = "none") -> list[dict]:
    """Where a client's memory goes, step by step, in this (fresh) process: the calls
    `client_train` makes, one after another, with RSS (anonymous / file-backed) after each."""
    import datasets  # noqa: F401
    import flwr_datasets.partitioner  # noqa: F401
    import torch

    import devft.federation.client_app  # noqa: F401  (the client's imports)
    from devft.config import load_config
    from devft.core.grouping import contiguous_groups
    from devft.data import collate, encode, federated_data
    from devft.models.client_stage import client_layout, client_stage_model, client_tokenizer
    from devft.models.submodel import StagePlan
    from devft.training.loss import response_loss

    steps = [("floor (imports)", status())]
    cfg = load_config(None, [f"model.path={model}", "model.device=cpu", f"data.name={data}",
                             "federation.num_clients=1", f"train.batch_size={batch}",
                             f"data.max_seq_len={seq}", f"model.quantization={quantization}"])
    if cfg.train.release_memory:  # as client_train does (set MALLOC_MMAP_THRESHOLD_ to compare)
        from devft.training.allocator import return_freed_memory

        return_freed_memory()
    fd = federated_data(cfg.data, 1, 0)
    steps.append(("data", status()))
    depth = client_layout(cfg.model).depth
    steps.append(("config + meta model", status()))
    tok = client_tokenizer(cfg.model)
    steps.append(("tokenizer", status()))
    groups = tuple(tuple(g) for g in contiguous_groups(depth, layers))
    model = client_stage_model(cfg.model, StagePlan(0, groups, 0.1), cfg.lora)
    steps.append((f"stage built ({layers} layers, LoRA attached)", status()))
    records = next(iter(fd.client_batches(0, 1, 1, batch, 0)))
    batch_ = collate([encode(r, tok, seq) for r in records], tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.train()
    for step in (1, 2, 3):
        start = time.perf_counter()
        loss, n = response_loss(model, batch_)
        steps.append((f"step {step}: forward", status()))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append((f"step {step}: backward + AdamW", status()
                      | {"step_s": time.perf_counter() - start}))
    return [{"step": name, **values} for name, values in steps]


def step_times(model: str, layers: int, batch: int, seq: int, data: Path,
               repeats: int = 3) -> dict[str, Any]:
    """Step time with gradient checkpointing off and on, side by side in one process:
    after a warm-up step of each, `repeats` alternating pairs; medians and their ratio (a
    ratio of neighbours is robust to other jobs on the cores, absolute times are not)."""
    import statistics

    import torch

    from devft.config import load_config
    from devft.core.grouping import contiguous_groups
    from devft.data import collate, encode, federated_data
    from devft.models.client_stage import (
        client_layout,
        client_stage_model,
        client_tokenizer,
        set_gradient_checkpointing,
    )
    from devft.models.submodel import StagePlan
    from devft.training.loss import response_loss

    cfg = load_config(None, [f"model.path={model}", "model.device=cpu", f"data.name={data}",
                             "federation.num_clients=1", f"train.batch_size={batch}",
                             f"data.max_seq_len={seq}"])
    fd, tok = federated_data(cfg.data, 1, 0), client_tokenizer(cfg.model)
    groups = tuple(tuple(g) for g in contiguous_groups(client_layout(cfg.model).depth, layers))
    peft = client_stage_model(cfg.model, StagePlan(0, groups, 0.1), cfg.lora)
    records = next(iter(fd.client_batches(0, 1, 1, batch, 0)))
    batch_ = collate([encode(r, tok, seq) for r in records], tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
    peft.train()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats + 1):
        for ckpt in (False, True):
            set_gradient_checkpointing(peft, ckpt)
            start = time.perf_counter()
            loss, n = response_loss(peft, batch_)
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:  # the first pair warms up
                times[ckpt].append(time.perf_counter() - start)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"model": model, "layers": layers, "batch": batch, "seq": seq,
            "off_s": times[False], "on_s": times[True], "ratio_on_to_off": on / off}


if __name__ == "__main__":
    child(sys.argv[1])
