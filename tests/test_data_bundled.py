"""Bundled data: the 12-task mixture, unseen tasks, multiple-choice items and ShareGPT."""

from collections import Counter

import pytest

from devft.data.records import load_records
from devft.data.tasks import MC_TASKS, TRAIN_TASKS, multiple_choice_items, unseen_task_records
from devft.errors import DataError

EXPECTED_SIZES = {
    "sciq": 1000,
    "boolq": 3270,
    "arc_easy": 570,
    "obqa": 500,
    "piqa": 1838,
    "siqa": 1954,
    "csqa": 1221,
    "nq": 3610,
    "triviaqa": 7993,
    "hellaswag": 10042,
    "winogrande": 1267,
    "sst2": 872,
}


def test_tasks_mixture():
    records = load_records("tasks")
    counts = Counter(r.category for r in records)
    assert set(counts) == set(TRAIN_TASKS) and len(counts) == 12
    assert dict(counts) == EXPECTED_SIZES
    assert "mmlu" not in counts and "arc_challenge" not in counts
    assert all(r.instruction.strip() and r.output.strip() and r.input == "" for r in records)
    letters = {r.output for r in records if r.category in ("arc_easy", "hellaswag", "csqa")}
    assert letters <= set("ABCDE")
    assert {r.output for r in records if r.category == "boolq"} == {"yes", "no"}
    assert load_records("tasks") == records and load_records("tasks") is not records


def test_unseen_tasks_are_kept_out_of_training():
    unseen = unseen_task_records()
    assert {k: len(v) for k, v in unseen.items()} == {"mmlu": 14042, "arc_challenge": 299}
    train_prompts = {r.instruction for r in load_records("tasks")}
    for name, records in unseen.items():
        assert {r.category for r in records} == {name}
        assert not train_prompts & {r.instruction for r in records}


@pytest.mark.parametrize("task", MC_TASKS)
def test_multiple_choice_items(task):
    items = multiple_choice_items(task)
    assert items and all(it.task == task for it in items)
    for it in items:
        assert it.prompt.strip() and "Answer with the letter" not in it.prompt
        assert len(it.choices) >= 2 and all(c for c in it.choices)
        assert 0 <= it.answer < len(it.choices)
    answers = Counter(it.answer for it in items)
    assert len(answers) >= 2  # not always the same position
    if task == "boolq":
        assert {it.choices for it in items} == {("no", "yes")}


def test_unknown_mc_task():
    with pytest.raises(DataError, match="supported"):
        multiple_choice_items("gsm8k")


def test_sharegpt_pairs():
    records = load_records("sharegpt")
    assert len(records) > 10000
    assert {r.category for r in records} == {"sharegpt"}
    assert all(r.instruction and r.output for r in records[:500])
