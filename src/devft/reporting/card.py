"""The README.md that makes a run's `adapter/` self-describing: base model, method, data, loss."""

from __future__ import annotations

import math
from typing import Any

from devft.config import RunConfig
from devft.methods import get_method

CARD_FILE = "README.md"


def _loss(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def adapter_card(cfg: RunConfig, records: list[dict[str, Any]]) -> str:
    """Markdown describing the adapter a run of `cfg` exported after its `records`."""
    method = get_method(cfg.method)
    first, last = records[0], records[-1]
    mode = last.get("eval_mode", "global")
    fed, data, lora = cfg.federation, cfg.data, cfg.lora
    targets = ", ".join(lora.target_modules) or "all attention and MLP projections"
    partition = data.partition if data.partition == "iid" else (
        f"dirichlet (alpha {data.dirichlet_alpha})")
    rows = [
        ("base model", f"`{cfg.model.path}` ({cfg.model.dtype})"),
        ("method", f"`{cfg.method}`: {method.description}"),
        ("data", f"`{data.name}`, {partition} over {fed.num_clients} clients, "
                 f"max_seq_len {data.max_seq_len}"),
        ("training", f"{last['round']} rounds, {cfg.train.local_steps} local steps of batch "
                     f"{cfg.train.batch_size}, lr {cfg.train.lr}, seed {cfg.seed}"),
        ("LoRA", f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}; {targets}"),
        ("final held-out loss", f"{_loss(last.get('eval_loss'))} (initial "
                                f"{_loss(first.get('eval_loss'))}; {mode} evaluation, "
                                f"{data.eval_examples} held-out rows)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        "---\nlibrary_name: peft\ntags: [devft, lora]\n---\n\n"
        f"# LoRA adapter from a devft run ({cfg.method})\n\n"
        "| | |\n|---|---|\n"
        f"{table}\n\n"
        "Load it with `PeftModel.from_pretrained(base, \"<this directory>\")` on the base model "
        "above, or try it with\n\n"
        "```bash\ndevft generate --adapter <this directory> --prompt \"...\"\n```\n\n"
        "The run's `config.json`, `metrics.jsonl` and `summary.json` are in the directory above "
        "this one.\n"
    )
