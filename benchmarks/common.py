"""What the benchmark scripts share: argument types and clean exits for user mistakes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from devft.errors import ConfigError, DevFTError


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers, e.g. `0,1,2`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated integers, e.g. 0,1,2") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one integer")
    return values


def run_script(main: Callable[[], None]) -> None:
    """Run a benchmark's main; a bad config or input exits 2 with devft's one-line message."""
    try:
        main()
    except DevFTError as err:
        print(f"devft: error: {err}", file=sys.stderr)
        sys.exit(2)


def flops_budget(model: str, given: float, budgets: Mapping[str, float]) -> float:
    """--budget when given (> 0), else the model's entry in a study's `budgets` (by name)."""
    if given > 0:
        return given
    name = Path(model).name
    if name not in budgets:
        raise ConfigError("--budget", given, f"client FLOPs > 0 (no default budget for "
                          f"{name}; defaults exist for {', '.join(budgets)})")
    return budgets[name]
