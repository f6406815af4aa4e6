"""`devft eval`: multiple-choice accuracy (and held-out loss) of a saved adapter or a base model.

Wire into the main parser with `add_eval_parser(subparsers)` and dispatch to `eval_main(args)`.
Defaults for the seed, the held-out fraction and the data set come from the run's config.json
beside the adapter directory, so trained tasks are scored on exactly the rows that run held
out; flags override them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from devft.config import DataConfig
from devft.config.sections import QUANTIZATIONS
from devft.data.tasks import TRAIN_TASKS
from devft.errors import ConfigError
from devft.files import atomic_write_json

log = logging.getLogger(__name__)


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval` sub-command to an argparse sub-parsers object."""
    from devft.evaluation.multiple_choice import DEFAULT_LIMIT, DEFAULT_TASKS
    from devft.evaluation.requests import DEFAULT_MAX_LEN, PROMPT_STYLES

    p = subparsers.add_parser("eval", help="score an adapter or base model on benchmarks")
    p.add_argument("--adapter", help="adapter directory (RUN_DIR/adapter); absent = base model")
    p.add_argument("--model", help="base model (default: the adapter's base, else the default)")
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated multiple-choice tasks (default: {','.join(DEFAULT_TASKS)})",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"items per task, a seeded subsample (default {DEFAULT_LIMIT}; 0 = all)",
    )
    p.add_argument("--out", help="write the results to this JSON file")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="plain")
    p.add_argument("--seed", type=int, help="split/subsample seed (default: the run's, else 0)")
    p.add_argument("--heldout-fraction", type=float, help="default: the run's, else 0.1")
    p.add_argument(
        "--loss-examples",
        type=int,
        help="held-out rows for loss/perplexity (default: the run's data.eval_examples; 0 = off)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="items per forward (default 16)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="store the base's decoder linear weights as nf4 or int8 (bitsandbytes), "
                        "e.g. as the adapter was trained (default none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _positive(value: int | None, flag: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        allowed = "an integer >= 0" if allow_zero else "a positive integer"
        raise ConfigError(flag, value, allowed)


def _settings(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """Validated options, with the run config's data settings as defaults."""
    from devft.evaluation.items import check_tasks

    data = run.get("data", {})
    defaults = DataConfig()
    tasks = check_tasks(str(args.tasks).split(","), "--tasks")
    _positive(args.limit, "--limit", allow_zero=True)
    _positive(args.loss_examples, "--loss-examples", allow_zero=True)
    _positive(args.batch_size, "--batch-size")
    _positive(args.threads, "--threads", allow_zero=True)
    if args.max_len < 16:
        raise ConfigError("--max-len", args.max_len, "an integer >= 16")
    fraction = args.heldout_fraction
    if fraction is None:
        fraction = float(data.get("heldout_fraction", defaults.heldout_fraction))
    if not 0.0 < fraction < 1.0:
        raise ConfigError("--heldout-fraction", fraction, "a number in (0, 1)")
    loss_examples = args.loss_examples
    if loss_examples is None:
        loss_examples = int(data.get("eval_examples", defaults.eval_examples))
    name = str(data.get("name", defaults.name))
    return {
        "tasks": tasks,
        "limit": args.limit or None,
        "seed": int(args.seed if args.seed is not None else run.get("seed", 0)),
        "heldout_fraction": fraction,
        "data": name,
        # a run on other data never trained on these tasks: every item is unseen
        "trained_tasks": TRAIN_TASKS if name == "tasks" else (),
        "loss_examples": loss_examples,
        "loss_max_len": int(data.get("max_seq_len", defaults.max_seq_len)),
    }


def _clean(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    who = report["adapter"] or f"{report['model']} (base model)"
    table = Table(title=f"devft eval: {who}, {report['settings']['prompt_style']} prompts")
    for col in ("task", "group", "n / pool", "acc", "acc_norm", "s"):
        table.add_column(col, justify="left" if col in ("task", "group") else "right")
    for task, r in report["tasks"].items():
        table.add_row(
            task,
            r["group"],
            f"{r['n']} / {r['pool']}",
            f"{r['acc']:.3f} ± {r['stderr']:.3f}",
            f"{r['acc_norm']:.3f} ± {r['stderr_norm']:.3f}",
            f"{r['seconds']:.0f}",
        )
    for group, g in report["groups"].items():
        if g["tasks"]:
            table.add_row(
                f"[bold]mean[/] ({len(g['tasks'])})", group, str(g["n"]),
                f"{g['acc']:.3f}", f"{g['acc_norm']:.3f}", "", style="bold",
            )  # fmt: skip
    return table


def eval_main(args: argparse.Namespace) -> int:
    """Run `devft eval` for parsed `args`; prints a table and writes --out. Returns 0."""
    import torch

    from devft.evaluation.adapters import check_adapter_dir, load_eval_model, read_run_config
    from devft.evaluation.multiple_choice import evaluate_tasks
    from devft.evaluation.perplexity import heldout_perplexity, heldout_records

    start = time.perf_counter()
    run = read_run_config(check_adapter_dir(args.adapter)) if args.adapter else {}
    opts = _settings(args, run)  # all input checked before the model loads
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", args.device, "cpu or auto (no CUDA device is available)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_eval_model(args.adapter, args.model, args.device, "fp32",
                                 args.quantization)
    except ConfigError as err:
        if err.field != "model.path":
            raise
        raise ConfigError("--model", err.value, err.allowed) from None
    report: dict[str, Any] = {"adapter": loaded.adapter, "model": loaded.model_path,
                              "quantization": args.quantization}
    report.update(
        evaluate_tasks(
            loaded.model,
            loaded.tokenizer,
            opts["tasks"],
            opts["limit"],
            opts["seed"],
            heldout_fraction=opts["heldout_fraction"],
            prompt_style=args.prompt_style,
            batch_size=args.batch_size,
            precision=args.precision,
            max_len=args.max_len,
            progress=sys.stderr.isatty(),
            trained_tasks=opts["trained_tasks"],
        )
    )
    if opts["loss_examples"]:
        records = heldout_records(
            opts["data"], opts["loss_examples"], opts["heldout_fraction"], opts["seed"]
        )
        report["heldout_loss"] = {
            "data": opts["data"],
            **heldout_perplexity(
                loaded.model, loaded.tokenizer, records, opts["loss_max_len"], 16, args.precision
            ),
        }
    report["wall_time_s"] = time.perf_counter() - start
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(_table(report))
    if "heldout_loss" in report:
        h = report["heldout_loss"]
        console.print(
            f"held-out loss ({h['data']}, {h['examples']} rows, {h['tokens']} tokens): "
            f"{h['loss']:.4f}, perplexity {h['perplexity']:.2f}"
        )
    if args.out:
        out = Path(args.out)
        atomic_write_json(out, _clean(report))
        console.print(f"results in {out}")
    return 0
