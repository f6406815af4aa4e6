"""What a 4-bit base (`model.quantization=nf4`) saves a client, and what it costs.

Three measurements, one JSON and one plot (docs/bench/quantized_memory.{json,png}):

- `memory`: client peak RSS in real client processes, with the machinery of
  benchmarks/client_memory.py (the real ServerApp; every train message replayed in fresh
  processes at each batch shape, gradient checkpointing off and on). Runs: FedIT fp32, FedIT
  nf4, DevFT nf4 (every stage), Offsite-tuning nf4. Each peak is also given above the floor
  (VmHWM of a process after the client's imports, no model) and against the limit computed
  from the held stage's tensors.
- `steps`: step time nf4 / fp32 per DevFT stage (contiguous groups, fused), the two stages
  built side by side in one process and stepped alternately (medians of neighbours).
- `fusion`: the error quantizing adds to a fused layer: each fused linear's output on Gaussian
  inputs, nf4 against fp32, relative; the same for unfused layers (NF4's own error); and the
  stage's logits and loss, nf4 against fp32, on 4 x 192 rows of the bundled `tasks` data.
  Also what the server holds: the full-precision base it fuses from, and the nf4 full model
  it evaluates.

    python benchmarks/quantized_memory.py --out docs/bench              # all three
    python benchmarks/quantized_memory.py --only steps,fusion --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import client_memory as cm

MIB = 2**20
RUNS = (("fedit", "fedit", "none"), ("fedit-nf4", "fedit", "nf4"),
        ("devft-nf4", "devft", "nf4"), ("offsite-nf4", "offsite", "nf4"))
"""(label, method, model.quantization) of the measured runs."""


def _variants(shapes: list[tuple[int, int]]):
    def variants(legacy: bool) -> list[dict[str, Any]]:  # the served variant first
        return [{"batch": b, "seq": s, "checkpointing": ckpt, "legacy": False,
                 "release_memory": True} for b, s in shapes for ckpt in (False, True)]
    return variants


def memory(model: str, out: Path, data: Path, shapes: list[tuple[int, int]],
           threads: int) -> dict[str, Any]:
    """Peak RSS of every run's client processes (see module docstring)."""
    from devft.config import load_config
    from devft.federation.server_app import run_server

    cm._variants = _variants(shapes)
    floors = [cm._run_child_floor("floor") for _ in range(3)]
    strict = [cm._run_child_floor("floor-strict") for _ in range(3)]
    no_bnb = [cm._run_child_floor("floor-no-bnb") for _ in range(3)]
    results: list[dict] = []
    for label, method, quantization in RUNS:
        cfg = load_config(None, [
            f"model.path={model}", "model.device=cpu", "model.dtype=fp32", f"method={method}",
            f"model.quantization={quantization}", f"data.name={data}",
            "data.eval_examples=2", "data.eval_batch_size=2", "federation.num_clients=1",
            "train.local_steps=2", f"train.batch_size={shapes[0][0]}",
            f"data.max_seq_len={shapes[0][1]}", f"train.threads={threads}",
            "devft.calibration_examples=2", "output.progress=false",
            f"output.dir={out / 'runs' / model / label}"])
        rounds = 4 if method == "devft" else 1
        cfg = cfg.replace(**{"federation.rounds": rounds, "devft.rounds_per_stage": [1]})
        run_server(cm.make_grid(cfg, results, label, False), cfg)
    rows = cm.summarize(results, min(floors))
    for row in rows:
        row.pop("marks")
    return {"floor_bytes": min(floors), "floor_runs_bytes": floors,
            "floor_strict_bytes": min(strict), "floor_without_bitsandbytes_bytes": min(no_bnb),
            "rows": rows}


def _stage(model: str, layers: int, quantization: str, data: Path, batch: int, seq: int):
    from devft.config import load_config
    from devft.core.grouping import contiguous_groups
    from devft.models.client_stage import HOLDER, client_layout, client_stage_model
    from devft.models.submodel import StagePlan

    cfg = load_config(None, [f"model.path={model}", "model.device=cpu", f"data.name={data}",
                             "federation.num_clients=1", f"train.batch_size={batch}",
                             f"data.max_seq_len={seq}", f"model.quantization={quantization}"])
    groups = tuple(tuple(g) for g in contiguous_groups(client_layout(cfg.model).depth, layers))
    peft = client_stage_model(cfg.model, StagePlan(0, groups, 0.1), cfg.lora)
    HOLDER.model = HOLDER.key = None  # keep it: the next stage must not release this one
    return cfg, peft, groups


def _batch(cfg: Any, batch: int, seq: int) -> dict:
    from devft.data import collate, encode, federated_data
    from devft.models.client_stage import client_tokenizer

    tok = client_tokenizer(cfg.model)
    records = next(iter(federated_data(cfg.data, 1, 0).client_batches(0, 1, 1, batch, 0)))
    return collate([encode(r, tok, seq) for r in records], tok.pad_token_id)


def steps(model: str, data: Path, stages: list[int], shapes: list[tuple[int, int]],
          repeats: int) -> list[dict[str, Any]]:
    """Step time of each stage, nf4 against fp32, alternating (after one warm-up each)."""
    import torch

    from devft.training.loss import response_loss

    rows = []
    for layers in stages:
        for batch, seq in shapes:
            built = {q: _stage(model, layers, q, data, batch, seq) for q in ("none", "nf4")}
            inputs = _batch(built["none"][0], batch, seq)
            opts = {q: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
                    for q, (_, m, _) in built.items()}
            times: dict[str, list[float]] = {"none": [], "nf4": []}
            for i in range(repeats + 1):
                for q, (_, peft, _) in built.items():
                    peft.train()
                    start = time.perf_counter()
                    loss, n = response_loss(peft, inputs)
                    (loss / n).backward()
                    opts[q].step()
                    opts[q].zero_grad(set_to_none=True)
                    if i > 0:
                        times[q].append(time.perf_counter() - start)
            fp32, nf4 = statistics.median(times["none"]), statistics.median(times["nf4"])
            rows.append({"layers": layers, "batch": batch, "seq": seq, "fp32_s": times["none"],
                         "nf4_s": times["nf4"], "ratio_nf4_to_fp32": nf4 / fp32})
            print(json.dumps(rows[-1]), flush=True)
            del built, opts
    return rows


def fusion(model: str, data: Path, stages: list[int]) -> dict[str, Any]:
    """Relative output error nf4 vs fp32 of fused and unfused linears, and of stage logits;
    the server's full-precision base against its nf4 full model."""
    import torch

    from devft.models.loading import load_base_model
    from devft.models.quantize import dense_weight, is_quantized, tensor_bytes_by_dtype
    from devft.models.submodel import StagePlan, stage_model
    from devft.training.loss import response_loss

    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"stages": []}
    for layers in stages:
        cfg, dense, groups = _stage(model, layers, "none", data, 1, 64)
        _, packed, _ = _stage(model, layers, "nf4", data, 1, 64)
        fused, single = [], []
        modules = dict(dense.base_model.model.named_modules())
        for name, module in packed.base_model.model.named_modules():
            if not (is_quantized(module) and name.endswith("base_layer")):
                continue
            w = modules[name].weight.float()
            x = torch.randn(64, w.shape[1], generator=gen)
            ref, got = x @ w.T, x @ dense_weight(module).float().T
            err = ((got - ref).norm() / ref.norm()).item()
            index = int(name.split(".layers.")[1].split(".")[0])
            (fused if len(groups[index]) > 1 else single).append(err)
        batch = _batch(cfg.replace(**{"data.name": "tasks"}), 4, 192)  # real rows
        with torch.no_grad():
            a = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            b = packed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses = [float(loss / n) for loss, n in (response_loss(m, batch)
                                                      for m in (dense, packed))]
        mask = batch["attention_mask"].bool()
        logit_err = ((b - a)[mask].norm() / a[mask].norm()).item()
        row = {"layers": layers, "fused_linears": len(fused), "unfused_linears": len(single),
               "fused_rel_err_mean": statistics.fmean(fused) if fused else None,
               "fused_rel_err_max": max(fused) if fused else None,
               "unfused_rel_err_mean": statistics.fmean(single) if single else None,
               "logits_rel_err": logit_err, "loss_fp32": losses[0], "loss_nf4": losses[1],
               "stage_bytes_fp32": tensor_bytes_by_dtype(dense.base_model.model),
               "stage_bytes_nf4": tensor_bytes_by_dtype(packed.base_model.model)}
        out["stages"].append(row)
        print(json.dumps(row), flush=True)
        del dense, packed
    base = load_base_model(cfg.model)
    start = time.perf_counter()
    full = stage_model(base, StagePlan.full(base.num_layers), cfg.lora, "nf4")
    out["server"] = {"base_bytes": tensor_bytes_by_dtype(base.model),
                     "nf4_full_model_bytes": tensor_bytes_by_dtype(full.base_model.model),
                     "nf4_full_model_build_s": time.perf_counter() - start}
    return out


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.get("memory", {}).get("rows", [])
    shapes = sorted({(r["batch"], r["seq"]) for r in rows})
    fig, axes = plt.subplots(1, max(1, len(shapes)) + 1, figsize=(5 * (len(shapes) + 1), 4))
    for ax, (batch, seq) in zip(axes, shapes):
        here = [r for r in rows if (r["batch"], r["seq"]) == (batch, seq)]
        labels = sorted({(r["method"], r["layers"]) for r in here},
                        key=lambda k: (k[0] != "fedit", k[0], k[1]))
        for k, ckpt in enumerate((False, True)):
            values = [next((r["above_floor_bytes"] / MIB for r in here if
                            (r["method"], r["layers"]) == lab and r["checkpointing"] == ckpt), 0)
                      for lab in labels]
            ax.bar([i + 0.4 * k for i in range(len(labels))], values, 0.4,
                   label="checkpointing" if ckpt else "no checkpointing")
        ax.set_xticks([i + 0.2 for i in range(len(labels))],
                      [f"{'fedit-fp32' if m == 'fedit' else m}\n{n}L" for m, n in labels],
                      fontsize=7)
        ax.set_ylabel("client peak RSS above floor (MiB)")
        ax.set_title(f"{report['model']}, batch {batch}x{seq}", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for batch, seq in sorted({(r["batch"], r["seq"]) for r in report.get("steps", [])}):
        here = [r for r in report["steps"] if (r["batch"], r["seq"]) == (batch, seq)]
        ax.plot([r["layers"] for r in here], [r["ratio_nf4_to_fp32"] for r in here], "o-",
                label=f"step time nf4/fp32, {batch}x{seq}")
    ax.axhline(1.3, ls="--", c="grey", lw=0.8, label="target 1.3")
    ax.set_xlabel("stage layers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--only", default="memory,steps,fusion")
    parser.add_argument("--shapes", default="1x64,4x192", help="memory runs' batch x seq")
    parser.add_argument("--step-shapes", default="1x64")
    parser.add_argument("--stages", default="4,8,15,30")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quantized_memory.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(model=args.model, threads=args.threads)
    data = cm._write_data(Path(cm.tempfile.mkdtemp()) / "long-records.jsonl")
    stages = [int(s) for s in args.stages.split(",")]
    for part in args.only.split(","):
        if part == "memory":
            report["memory"] = memory(args.model, Path(cm.tempfile.mkdtemp()), data,
                                      _shapes(args.shapes), args.threads)
        elif part == "steps":
            report["steps"] = steps(args.model, data, stages, _shapes(args.step_shapes),
                                    args.repeats)
        elif part == "fusion":
            report["fusion"] = fusion(args.model, data, stages)
        path.write_text(json.dumps(report, indent=2))
    _plot(report, out / "quantized_memory.png")


if __name__ == "__main__":
    from common import run_script

    run_script(main)
