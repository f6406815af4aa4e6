"""Per-stage client cost of DevFT at the paper's scale, on a CUDA GPU.

A LLaMA-2-7B-shaped model (32 layers, hidden 4096, vocab 32000) with *random* weights stands
in for the real one (its weights cannot be fetched here): cost per stage (time per local
step, peak GPU memory, LoRA bytes per round, FLOPs) does not depend on the weights' values.
Learning claims are not made from this run. Uses configs/paper/llama2-7b-devft.yaml with
fewer clients, rounds and steps. Writes paper_scale_gpu.json and paper_scale_gpu.png.

    python benchmarks/paper_scale_gpu.py --out runs/paper-scale-gpu
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from devft.config import load_config
from devft.federation.runner import run_method
from devft.models.synthetic import save_random_model
from devft.reporting.recorder import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from his her an were are".split()


def synthetic_records(path: Path, n: int, seed: int = 0) -> Path:
    """Instruction records of ~400/~100 characters (one byte-level token per character)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(90))[:400]
            answer = " ".join(rng.choice(WORDS) for _ in range(25))[:100]
            f.write(json.dumps({"instruction": text, "input": "", "output": answer,
                                "category": f"c{i % 4}"}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/paper-scale-gpu",
                        help="report folder (paper_scale_gpu.json / .png)")
    parser.add_argument("--work", default=None,
                        help="where the random model and the runs go (default: --out)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    report_dir = Path(args.out)
    out = Path(args.work or args.out)
    report_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "random-llama"
    t0 = time.time()
    if not (model_dir / "config.json").is_file():
        cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden,
                          intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.heads,
                          max_position_embeddings=4096, bos_token_id=256, eos_token_id=257,
                          pad_token_id=257)
        save_random_model(cfg, model_dir, dtype=torch.bfloat16, device=args.device)
        torch.cuda.empty_cache() if args.device == "cuda" else None
    build_s = time.time() - t0
    print(f"model ready in {build_s:.0f} s", flush=True)
    data = synthetic_records(out / "data.jsonl", 400)
    stages = [max(1, args.layers // 8), max(2, args.layers // 4), args.layers // 2, args.layers]
    results = {}
    for method in ("devft", "fedit"):
        cfg = load_config(ROOT / "configs/paper/llama2-7b-devft.yaml", [
            f"method={method}", f"model.path={model_dir}", f"data.name={data}",
            f"model.device={args.device}", f"federation.num_clients={args.clients}",
            "federation.rounds=4", "devft.rounds_per_stage=1",
            f"devft.stages={','.join(map(str, stages))}", f"train.local_steps={args.steps}",
            f"train.batch_size={args.batch}", "data.eval_examples=8", "data.eval_batch_size=8",
            f"output.dir={out / method}", "output.progress=false"])
        start = time.time()
        summary = run_method(cfg)
        print(f"{method}: {time.time() - start:.0f} s", flush=True)
        records = read_metrics(out / method)[1:]
        results[method] = {
            "run_s": time.time() - start, "summary": summary,
            "rounds": [{k: r.get(k) for k in (
                "round", "stage", "layers_trained", "trainable_params", "bytes_up", "bytes_down",
                "client_time_max_s", "client_time_sum_s", "client_peak_mem_bytes",
                "client_flops", "client_tokens", "wall_time_s")} for r in records],
        }
    full = results["fedit"]["rounds"][-1]
    for r in results["devft"]["rounds"]:
        r["vs_full"] = {
            "layers": r["layers_trained"] / args.layers,
            "step_time": r["client_time_max_s"] / full["client_time_max_s"],
            "peak_mem": r["client_peak_mem_bytes"] / full["client_peak_mem_bytes"],
            "bytes_up": r["bytes_up"] / full["bytes_up"],
            "flops_per_token": (r["client_flops"] / r["client_tokens"])
            / (full["client_flops"] / full["client_tokens"]),
        }
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "model": {"layers": args.layers, "hidden": args.hidden,
                        "intermediate": args.intermediate, "vocab": 32000,
                        "random_weights": True},
              "clients": args.clients, "local_steps": args.steps, "batch": args.batch,
              "build_s": build_s, "results": results}
    (report_dir / "paper_scale_gpu.json").write_text(json.dumps(report, indent=2, default=str))
    _plot(results["devft"]["rounds"], report_dir / "paper_scale_gpu.png", report["device"])
    print(json.dumps([r["vs_full"] | {"layers_trained": r["layers_trained"]}
                      for r in results["devft"]["rounds"]], indent=1))


def _plot(rounds: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("layers", "step_time", "peak_mem", "bytes_up", "flops_per_token")
    labels = [f"{r['layers_trained']}L" for r in rounds]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.16
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(rounds))], [r["vs_full"][key] for r in rounds],
               width, label=key.replace("_", " "))
    ax.set_xticks([x + 2 * width for x in range(len(rounds))], labels)
    ax.set_ylabel("ratio to the full model (FedIT round)")
    ax.set_title(f"DevFT stage cost, LLaMA-2-7B-shaped model, {device}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
