"""The files of a run directory: written atomically, read with one clear message naming the file.

Every JSON, checkpoint and adapter file a run writes goes through `atomic_path` (or its
`atomic_write_*` / `atomic_dir` forms): the content is written to a temporary file in the
same directory, fsynced, then renamed over the target, so a kill at any moment leaves either
the old file or the new one, never a truncated one. `metrics.jsonl` is the exception: it is
append-only, one fsynced line per round (`append_line`); `read_jsonl` tolerates a truncated
*last* line (what a kill in the middle of that one write leaves) and names any other bad line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devft.errors import RunFileError

log = logging.getLogger(__name__)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is fsynced and renamed to
    `path`. On an exception the temporary file is removed and `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; on success every file in it is fsynced and
    it replaces `path` (the old directory, if any, is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def file_digests(directory: str | Path) -> dict[str, str]:
    """The SHA-256 (hex) of every file under `directory`, keyed by its relative POSIX path:
    what summary.json records of `adapter/` so that a copy of it can be checked."""
    root = Path(directory)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digests[path.relative_to(root).as_posix()] = sha.hexdigest()
    return digests


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync it before returning (a crash loses no earlier line)."""
    with Path(path).open("a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_text(path: Path) -> str:
    """The text of a run file; a missing or unreadable one is a RunFileError naming it."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is unreadable ({err})") from None


def read_json(path: str | Path) -> Any:
    """The JSON content of `path`; a missing, unreadable or truncated file is a RunFileError."""
    path = Path(path)
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path} is unreadable: truncated or not valid JSON ({err})") from None


def read_json_object(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`read_json` for a JSON object that must have the `required` keys."""
    data = read_json(path)
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if not isinstance(data, dict) or missing:
        what = f"lacks {', '.join(missing)}" if isinstance(data, dict) else "is not a JSON object"
        raise RunFileError(f"{path} is unreadable: it {what}, so devft did not write it")
    return data


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file written by `append_line`.

    A truncated last line (a kill in the middle of its write) is dropped with a warning; any
    other line that is not a JSON object is a RunFileError naming the file and line.
    """
    path = Path(path)
    text = _read_text(path)
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines) and not text.endswith("\n"):
            log.warning("%s: dropped its truncated last line %d (the run was killed while "
                        "writing it)", path, number)
        else:
            raise RunFileError(f"{path} is unreadable: line {number} is not a JSON record")
    return records
