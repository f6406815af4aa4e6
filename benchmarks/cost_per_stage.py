"""Client cost of each DevFT stage, as a ratio to the full model, next to the L_s/L limit.

For every stage size L_s (and the full model) this builds the stage exactly as devft's client
does (`devft.models.client_stage.client_stage_model`: the stage's layers read memory-mapped
from the base's safetensors files and fused tensor by tensor, plus embeddings, final norm and
head, LoRA attached; one stage held at a time), and measures on the same batches:
- training FLOPs per token with torch's FlopCounterMode (and the estimate devft logs),
  split into the decoder layers and the fixed embedding/LM-head part;
- peak memory of building the stage and its training steps beyond what was allocated before
  (CUDA allocator peak on GPU; sampled RSS on CPU, which `client_memory.py` measures properly,
  one process per stage);
- time per step (median after a warm-up step);
- LoRA bytes a client sends per round (float32 on the wire).
The expected ratio is (L_s/L)·layers + fixed, over layers + fixed, with "layers" and "fixed"
the full model's measured shares. Writes cost_per_stage.json and cost_per_stage.png.

    python benchmarks/cost_per_stage.py --out runs/bench/cost               # bundled model, CPU
    python benchmarks/cost_per_stage.py --random-llama7b --device cuda --out runs/bench/cost-gpu
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from devft.config import DataConfig, LoraSettings, ModelConfig
from devft.core.grouping import contiguous_groups
from devft.core.schedule import doubling_stages
from devft.data import collate, encode, federated_data
from devft.models.client_stage import HOLDER, client_layout, client_stage_model, client_tokenizer
from devft.models.loading import resolve_device
from devft.models.lora import seeded_lora_init, set_lora_state
from devft.models.submodel import StagePlan
from devft.training.accounting import (
    PeakMemory,
    attention_flops,
    estimate_train_flops,
    lora_params,
    matmul_params,
)
from devft.training.loss import response_loss


@dataclass
class Client:
    """What a stage client knows without loading the base: config, tokenizer, depth."""

    cfg: ModelConfig
    tokenizer: object
    family: object
    num_layers: int
    device: torch.device


def client_of(cfg: ModelConfig) -> Client:
    layout = client_layout(cfg)
    return Client(cfg, client_tokenizer(cfg), layout.family, layout.depth,
                  resolve_device(cfg.device))


def batches(base: Client, n: int, batch: int, seq: int,
            data: str) -> list[dict[str, torch.Tensor]]:
    """`n` batches from the held-out rows of `data`, or fixed synthetic ones (`synthetic`)."""
    if data == "synthetic":
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(n):
            ids = torch.randint(0, 250, (batch, seq), generator=gen)
            labels = torch.full_like(ids, -100)
            labels[:, seq * 3 // 4:] = ids[:, seq * 3 // 4:]
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": labels})
        return out
    fd = federated_data(DataConfig(name=data, max_seq_len=seq), 1, 0)
    rows = fd.partitions[0][: n * batch]
    tok = base.tokenizer
    enc = [encode(fd.records[i], tok, seq) for i in rows]
    return [collate(enc[i:i + batch], tok.pad_token_id) for i in range(0, len(enc), batch)]


def client_stage(base: Client, k: int, lora: LoraSettings):
    """The k-layer stage (contiguous groups, β = 0.1) as devft's client builds and holds it."""
    groups = tuple(tuple(g) for g in contiguous_groups(base.num_layers, k))
    return client_stage_model(base.cfg, StagePlan(0, groups, 0.1), lora)


def measure(base: Client, k: int, data: list[dict], steps: int, lora: LoraSettings,
            device: torch.device) -> dict:
    HOLDER.release()  # the previous stage, as a client does on a stage change
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as mem:
        model = client_stage(base, k, lora)
        set_lora_state(model, seeded_lora_init(model, 0))
        inner = model.base_model.model
        layers, head = base.family.layers(inner), inner.get_output_embeddings()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times, counted = [], None
        model.train()
        for step, batch in enumerate(data[: steps + 1]):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if step == 1:  # count one non-warm-up step
                with FlopCounterMode(display=False) as counter:
                    loss, n = response_loss(model, batch)
                    (loss / n).backward()
                counted = counter
            else:
                loss, n = response_loss(model, batch)
                (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > 0:
                times.append(time.perf_counter() - start)
    b, t = data[1]["input_ids"].shape
    tokens = int(data[1]["attention_mask"].sum())
    resp = int((data[1]["labels"][:, 1:] != -100).sum())
    by_module = counted.get_flop_counts()
    head_name = next((name for name in by_module if name.endswith(("lm_head", "embed_out"))),
                     None)
    total = counted.get_total_flops()
    head_flops = sum(by_module[head_name].values()) if head_name else 0
    estimate = estimate_train_flops(matmul_params(layers), lora_params(layers),
                                    matmul_params(head), b * t, resp,
                                    attention_flops(b, t, inner.config.hidden_size, k))
    result = {
        "layers": k, "flops_per_token": total / tokens,
        "head_flops_per_token": head_flops / tokens,
        "layer_flops_per_token": (total - head_flops) / tokens,
        "estimate_per_token": estimate / tokens,
        "peak_mem_bytes": mem.peak_bytes - mem.start_bytes,
        "step_time_s": statistics.median(times),
        "lora_bytes_per_round": 4 * sum(p.numel() for n, p in model.named_parameters()
                                        if "lora_" in n),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    del model, opt
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/bench/cost")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-llama7b", action="store_true",
                        help="a LLaMA-2-7B-shaped model with random weights (cost only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="tasks", help="a data set name, or 'synthetic'")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path, dtype = args.model, "fp32"
    if args.random_llama7b:
        from transformers import LlamaConfig

        from devft.models.synthetic import save_random_model

        model_path, dtype, args.data = str(out / "random-llama7b"), "bf16", "synthetic"
        if not (Path(model_path) / "config.json").is_file():
            save_random_model(LlamaConfig(vocab_size=32000, bos_token_id=256, eos_token_id=257,
                                          pad_token_id=257), Path(model_path),
                              dtype=torch.bfloat16, device=args.device)
    base = client_of(ModelConfig(path=model_path, dtype=dtype, device=args.device))
    device = base.device
    data = batches(base, args.steps + 1, args.batch, args.seq, args.data)
    lora = LoraSettings(r=args.rank, alpha=2.0 * args.rank)
    stages = doubling_stages(base.num_layers, 4)
    rows = [measure(base, k, data, args.steps, lora, device) for k in stages]
    full = rows[-1]
    layer_share = full["layer_flops_per_token"] / full["flops_per_token"]
    for row in rows:
        frac = row["layers"] / base.num_layers
        row["ratio"] = {key: row[key] / full[key] for key in (
            "flops_per_token", "peak_mem_bytes", "step_time_s", "lora_bytes_per_round")}
        row["limit_layers_only"] = frac
        row["expected_flops_ratio"] = frac * layer_share + (1 - layer_share)
    report = {"model": model_path, "device": str(device), "dtype": dtype,
              "depth": base.num_layers, "batch": args.batch, "seq": args.seq,
              "rank": args.rank, "data": args.data, "stages": rows,
              "fixed_flops_share_full_model": 1 - layer_share}
    (out / "cost_per_stage.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / "cost_per_stage.png", f"{Path(model_path).name} on {device}")
    for row in rows:
        print(row["layers"], {k: round(v, 3) for k, v in row["ratio"].items()},
              "expected flops", round(row["expected_flops_ratio"], 3))


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("flops_per_token", "peak_mem_bytes", "step_time_s", "lora_bytes_per_round")
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    for i, key in enumerate(keys):
        ax.bar([v + i * 0.2 for v in x], [r["ratio"][key] for r in rows], 0.2,
               label=key.replace("_", " "))
    ax.plot([v + 0.3 for v in x], [r["limit_layers_only"] for r in rows], "k_", ms=30,
            label="L_s / L")
    ax.plot([v + 0.3 for v in x], [r["expected_flops_ratio"] for r in rows], "r_", ms=30,
            label="L_s / L + fixed (FLOPs)")
    ax.set_xticks([v + 0.3 for v in x], [f"{r['layers']} layers" for r in rows])
    ax.set_ylabel("ratio to the full model")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
