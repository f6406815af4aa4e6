"""Command line: `devft run`, `compare`, `eval`, `generate`, `shard`, `fetch` and `methods`.

Owns all printing; user mistakes exit 2 with one clear message and no stack trace, and a run
that stops because its clients keep failing exits 3 (`RunStalledError`). The text users see
is `USAGE`, `EXAMPLES` and the parsers' help, not this docstring."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from devft.errors import ConfigError, DevFTError
from devft.extras import require_extra
from devft.library_logs import quiet_bitsandbytes

quiet_bitsandbytes()  # before any command imports peft, which imports bitsandbytes


class _TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


class _NoEvaluateWarning(logging.Filter):
    """Drop Flower's per-stage notice that client-side evaluation is off (it is, by design)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "fraction_evaluate is set to 0.0" not in record.getMessage()


def setup_logging(verbose: bool) -> None:
    """devft's log format on stderr (progress-bar safe); Flower's notices quieted."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("devft")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    from flwr.common import logger as _flwr_logger  # noqa: F401  (sets up the flwr logger)

    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.INFO if verbose else logging.WARNING)
    flwr.addFilter(_NoEvaluateWarning())
    for noisy in ("transformers", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


USAGE = """\
Fine-tune a language model with LoRA on data spread over many clients, with DevFT
(developmental stages of growing submodels) or a federated LoRA baseline, on Flower."""

EXAMPLES = """\
examples:
  devft run --method devft --out runs/first
  devft compare --config configs/default.yaml --methods devft,fedit --out runs/demo
  devft run --resume runs/first                 # continue a killed run
  devft eval --adapter runs/first/adapter --tasks arc_easy,piqa
  devft generate --adapter runs/first --prompt "Name three primary colors."
  devft fetch coord:/srv/devft/runs/lab-1 lab-1  # a deployment run's outputs, checked

Config: YAML (--config) plus --set key=value overrides; every key, its default and its
allowed values are in docs/configuration.md. Exit codes: 0 done, 2 a mistake in the input
(one line says which), 3 a run stopped because its clients kept failing (resume it)."""

_CONFIG_HELP = ("Methods: `devft methods` lists them. Config keys, defaults and allowed "
                "values:\ndocs/configuration.md. ")
_EPILOGS = {
    "run": _CONFIG_HELP + "Outputs in --out: metrics.jsonl (one line per round),\n"
    "summary.json, adapter/ (PEFT format), loss.png, config.json, checkpoints/ (docs/cli.md).",
    "compare": _CONFIG_HELP + "Outputs: --out/<method>/ as `devft run` writes it, and\n"
    "--out/comparison.json and comparison.png (docs/cli.md).",
    "shard": "Writes --out/client-<k>.json for each of federation.num_clients clients and "
    "prints\nthe --node-config of each SuperNode (docs/deployment.md).",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devft", description=USAGE, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_ in (("run", "train one method (metrics.jsonl, summary.json, adapter/)"),
                        ("compare", "train methods with the same seed, data and budget; compare "
                         "them with FedIT (comparison.json, comparison.png)"),
                        ("shard", "write each client's own data for its SuperNode")):
        p = sub.add_parser(name, help=help_, description=help_, epilog=_EPILOGS[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML config (default: built-in defaults)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set federation.num_clients=8",
        )
        p.add_argument("--out", help="output directory (required unless --resume)"
                       if name != "shard" else "directory for client-<k>.json")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub.choices["run"].add_argument("--method", help="shortcut for --set method=NAME "
                                    "(`devft methods` lists them)")
    sub.choices["run"].add_argument("--resume", metavar="DIR",
                                    help="continue a killed run from DIR's last checkpoint")
    sub.choices["compare"].add_argument(
        "--methods", default="devft,fedit",
        help="comma-separated methods (fedit is always added; `devft methods` lists them)")
    from devft.evaluation.cli import add_eval_parser

    add_eval_parser(sub)
    from devft.generation import add_generate_parser

    add_generate_parser(sub)
    from devft.fetch import add_fetch_parser

    add_fetch_parser(sub)
    methods = sub.add_parser("methods", help="list the methods, one line each",
                             description="List the federated methods `--method` accepts.")
    methods.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    return parser


METHOD_GROUPS: tuple[tuple[str, str], ...] = (
    ("baselines", "Federated LoRA baselines (the full model every round)"),
    ("growth", "Progressive and offsite baselines (a part of the model per stage)"),
    ("devft", "DevFT and its variants"),
    ("ablations", "Ablations of DevFT's parts"),
)


def method_group(name: str) -> str:
    """Which of METHOD_GROUPS a registered method belongs to."""
    from devft.methods import get_method

    spec = get_method(name)
    if not spec.staged:
        return "baselines"
    if spec.description.startswith("ablation"):
        return "ablations"
    if not name.startswith("devft"):  # staged, but not DevFT's: ProgFed, LayerDrop, Offsite
        return "growth"
    return "devft"


def methods_text() -> str:
    """`devft methods`: every registered method, one line each, grouped."""
    from devft.methods import METHODS

    width = max(map(len, METHODS)) + 2
    lines: list[str] = []
    for key, title in METHOD_GROUPS:
        lines += [f"{title}:"]
        lines += [f"  {name:<{width}}{spec.description}" for name, spec in METHODS.items()
                  if method_group(name) == key]
        lines.append("")
    lines.append("Use one with `devft run --method NAME` or `--set method=NAME`; its settings "
                 "are in docs/configuration.md.")
    return "\n".join(lines)


# commands that need an extra beyond the core set; generate, fetch and methods need none
NEEDS_EXTRA = {"run": "server", "compare": "server", "shard": "data", "eval": "data"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "methods":
        print(methods_text())
        return 0
    setup_logging(args.verbose)
    try:
        if args.command == "fetch":
            from devft.fetch import fetch_main

            return fetch_main(args)
        if args.command in NEEDS_EXTRA:  # more than the core set (a SuperNode's) installs
            require_extra(NEEDS_EXTRA[args.command], f"devft {args.command}")
        if args.command == "eval":
            from devft.evaluation.cli import eval_main

            return eval_main(args)
        if args.command == "generate":
            from devft.generation import generate_main

            return generate_main(args)
        return _dispatch(args)
    except DevFTError as err:
        print(f"devft: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)  # tables unwrapped in logs


def _dispatch(args: argparse.Namespace) -> int:
    from devft.config import load_config

    if args.command == "run" and args.resume:
        cfg = _resume_config(args)
        args.out = args.resume
    else:
        if not args.out:
            raise ConfigError("--out", None, "an output directory")
        overrides = list(args.set) + [f"output.dir={args.out}"]
        if args.command == "run" and args.method:
            overrides.append(f"method={args.method}")
        cfg = load_config(args.config, overrides)
    if args.command == "shard":
        return _shard(cfg, args.out)
    if args.command == "run":
        from devft.federation.runner import run_method

        summary = run_method(cfg)
        _console().print(
            f"[bold]{summary['method']}[/]: held-out loss {summary['initial_eval_loss']:.4f} -> "
            f"{summary['final_eval_loss']:.4f} in {summary['rounds']} rounds, "
            f"{summary['total_bytes'] / 1e6:.1f} MB, {summary['wall_time_s']:.0f} s; "
            f"outputs in {args.out}"
        )
        return 0
    from devft.comparison import compare_methods, comparison_table, parse_methods

    methods = parse_methods(args.methods)
    comparison = compare_methods(cfg, methods, Path(args.out))
    _console().print(comparison_table(comparison))
    _console().print(f"comparison.json and comparison.png in {args.out}")
    return 0


def _shard(cfg, out: str) -> int:
    """Cut each client's shard (rows and their token ids for the run's model) and say how a
    SuperNode uses it."""
    from devft.data import SHARD_NODE_KEY, write_client_shards
    from devft.models.client_stage import client_tokenizer, tokenizer_digest

    paths = write_client_shards(cfg.data, cfg.federation.num_clients, cfg.seed, out,
                                client_tokenizer(cfg.model), tokenizer_digest(cfg.model))
    for k, path in enumerate(paths):
        print(f"client {k}: {path} ({path.stat().st_size / 1e6:.1f} MB); its SuperNode's "
              f"--node-config \"partition-id={k} num-partitions={len(paths)} "
              f"{SHARD_NODE_KEY}='{path.resolve()}'\"")
    return 0


def _resume_config(args: argparse.Namespace):
    """The killed run's own config (DIR/config.json), marked to resume."""
    import json

    from devft.config import from_dict

    if args.config or args.set or args.method or args.out:
        raise ConfigError("--resume", args.resume,
                          "no --config/--set/--method/--out with it: a run resumes with its "
                          "own config.json")
    path = Path(args.resume) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError("--resume", args.resume,
                          f"a run directory of `devft run` (reading {path}: {err})") from None
    data.setdefault("output", {}).update(dir=str(args.resume), resume=True)
    return from_dict(data)


if __name__ == "__main__":
    sys.exit(main())
