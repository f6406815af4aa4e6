"""Instruction records and the loader for bundled data sets and user JSON/JSONL files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BUNDLED_DATASETS = ("tasks", "sharegpt")
"""Names `load_records` accepts besides a file path."""

USER_FILE_SUFFIXES = (".json", ".jsonl")
DEFAULT_CATEGORY = "default"


@dataclass(frozen=True)
class Record:
    """One instruction -> response pair; `category` is its task (used for splits/partitions)."""

    instruction: str
    input: str
    output: str
    category: str


def load_records(name: str) -> list[Record]:
    """Records of a bundled data set (`tasks`, `sharegpt`) or of a .json/.jsonl user file.

    Raises `DataError` for a file that is missing or malformed, `ConfigError` for a name that
    is neither a bundled data set nor looks like a path.
    """
    if name == "tasks":
        from devft.data.tasks import task_records

        return task_records()
    if name == "sharegpt":
        from devft.data.sharegpt import sharegpt_records

        return sharegpt_records()
    path = Path(name).expanduser()
    if not path.exists():
        looks_like_path = bool(path.suffix) or any(c in name for c in "/\\~")
        if not looks_like_path:
            raise ConfigError(
                "data.name",
                name,
                "a bundled data set (tasks, sharegpt) or a path to a .json/.jsonl file",
            )
        raise DataError(
            f"data file {str(path)!r} not found (data.name must be a bundled data "
            f"set ({', '.join(BUNDLED_DATASETS)}) or an existing .json/.jsonl file)"
        )
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a directory, not a .json/.jsonl file")
    return load_user_file(path)


def load_user_file(path: str | Path) -> list[Record]:
    """Parse and validate a user file: a .json list of objects or .jsonl, one object a line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in USER_FILE_SUFFIXES:
        raise DataError(
            f"data file {str(path)!r}: unsupported extension {path.suffix!r} "
            f"(expected .json or .jsonl)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DataError(f"data file {str(path)!r} cannot be read: {exc}") from exc
    if suffix == ".json":
        items = _parse_json(path, text)
        where = "record"
    else:
        items = _parse_jsonl(path, text)
        where = "line"
    records = [_to_record(obj, path, f"{where} {num}") for num, obj in items]
    if not records:
        raise DataError(f"data file {str(path)!r} contains no records")
    log.info(
        "loaded %d records (%d categories) from %s",
        len(records),
        len({r.category for r in records}),
        path,
    )
    return records


def _parse_json(path: Path, text: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"data file {str(path)!r}: invalid JSON at line {exc.lineno} column "
            f"{exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, list):
        raise DataError(
            f"data file {str(path)!r}: expected a JSON list of objects, got {_type_name(data)}"
        )
    return list(enumerate(data, start=1))


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, Any]]:
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file {str(path)!r}, line {lineno}: invalid JSON at column "
                f"{exc.colno}: {exc.msg}"
            ) from exc
    return items


def _to_record(obj: Any, path: Path, where: str) -> Record:
    def fail(problem: str) -> DataError:
        return DataError(f"data file {str(path)!r}, {where}: {problem}")

    if not isinstance(obj, dict):
        raise fail(
            f"expected an object with instruction/input/output fields, got {_type_name(obj)}"
        )
    if "instruction" not in obj:
        raise fail("missing field 'instruction'")
    if "output" not in obj:
        raise fail("missing field 'output'")
    fields: dict[str, str] = {}
    for key, default in (
        ("instruction", None),
        ("input", ""),
        ("output", None),
        ("category", DEFAULT_CATEGORY),
    ):
        value = obj.get(key, default)
        if value is None and default is not None:
            value = default
        if not isinstance(value, str):
            raise fail(f"field {key!r} must be a string, got {_type_name(value)}")
        fields[key] = value
    if not fields["instruction"].strip():
        raise fail("field 'instruction' is empty")
    if not fields["category"].strip():
        fields["category"] = DEFAULT_CATEGORY
    return Record(**fields)


def _type_name(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
