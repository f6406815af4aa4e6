"""devft's config as Flower's run config: the keys the app declares, and their one-line errors.

`flwr run --run-config` may override only keys that `[tool.flwr.app.config]` in the app's
pyproject.toml declares; the SuperLink refuses any other with `[code: 15] Invalid run
configuration` (the key is named only in the SuperLink's log). So the app declares every
key of `RunConfig`, each as "" (not set: keep the `config-file`'s value), plus
`config-file` and `config-json`. `tests/test_deployment.py` fails when pyproject.toml misses
a key; print the section to paste with

    python -m devft.config.flower
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SOURCE_KEYS = ("config-file", "config-json")
"""Where the base config comes from (a YAML path, or the whole config as a JSON string)."""
REGENERATE = "python -m devft.config.flower"


def _leaves(cls: type, prefix: str = "") -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def config_keys() -> list[str]:
    """Every settable key of `RunConfig`, dotted (`train.lr`), in declaration order."""
    from devft.config import RunConfig

    return list(_leaves(RunConfig))


def pyproject_section(defaults: dict[str, Any] | None = None) -> str:
    """The `[tool.flwr.app.config]` table declaring every key ("" = not set)."""
    values = {"config-file": "configs/default.yaml", "config-json": "", **(defaults or {})}
    lines = ["[tool.flwr.app.config]"]
    for key in [*SOURCE_KEYS, *config_keys()]:
        value = values.get(key, "")
        text = repr(value).lower() if isinstance(value, bool) else (
            repr(value) if isinstance(value, (int, float)) else f'"{value}"')
        lines.append(f'"{key}" = {text}')
    return "\n".join(lines) + "\n"


def declared_keys(pyproject: str | Path) -> set[str]:
    """The keys an app's pyproject.toml declares in `[tool.flwr.app.config]` (flattened)."""
    import tomllib

    from flwr.common.config import flatten_dict

    data = tomllib.loads(Path(pyproject).read_text())
    return set(flatten_dict(data["tool"]["flwr"]["app"].get("config", {})))


def undeclared_keys(pyproject: str | Path) -> list[str]:
    """Keys of `RunConfig` that `flwr run --run-config` could not set with this pyproject."""
    declared = declared_keys(pyproject)
    return [k for k in [*SOURCE_KEYS, *config_keys()] if k not in declared]


if __name__ == "__main__":
    print(pyproject_section(), end="")
