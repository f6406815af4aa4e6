"""User data files: loading and every bad-input message."""

import json

import pytest

from devft.data.records import BUNDLED_DATASETS, Record, load_records
from devft.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_tiny_jsonl_file_loads(tiny_data_file):
    records = load_records(str(tiny_data_file))
    assert len(records) == 60
    assert {r.category for r in records} == {"math", "geo", "color"}
    assert records[0] == Record("What is 0 plus 1?", "", "1", "math")
    assert records[1].input == "Country number 1"


def test_json_list_with_defaults(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "Hi", "output": "Hello"},
                {"instruction": "Q", "input": None, "output": "", "extra": 1},
            ]
        )
    )
    records = load_records(str(path))
    assert records == [Record("Hi", "", "Hello", "default"), Record("Q", "", "", "default")]


def test_blank_jsonl_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n   \n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"line 4: missing field 'output'"):
        load_records(str(path))


def test_missing_file_lists_bundled_names(tmp_path):
    with pytest.raises(DataError) as info:
        load_records(str(tmp_path / "nope.jsonl"))
    msg = str(info.value)
    assert "nope.jsonl" in msg and "not found" in msg
    assert all(name in msg for name in BUNDLED_DATASETS)


def test_unknown_bundled_name_is_config_error():
    with pytest.raises(ConfigError) as info:
        load_records("alpaca")
    assert info.value.field == "data.name" and info.value.value == "alpaca"
    assert "tasks, sharegpt" in str(info.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\n")
    with pytest.raises(DataError, match=r"d\.csv.*unsupported extension '\.csv'"):
        load_records(str(path))


def test_directory_is_rejected(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_records(str(tmp_path))


def test_invalid_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ]')
    with pytest.raises(DataError, match=r"d\.json.*invalid JSON at line 2"):
        load_records(str(path))


def test_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}))
    with pytest.raises(DataError, match="expected a JSON list of objects, got an object"):
        load_records(str(path))


def test_invalid_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, "{oops"])
    with pytest.raises(DataError, match=r"d\.jsonl.*line 2: invalid JSON"):
        load_records(str(path))


@pytest.mark.parametrize(
    "row, problem",
    [
        ([1, 2], r"record 2: expected an object .* got a list"),
        ({"output": "x"}, r"record 2: missing field 'instruction'"),
        ({"instruction": "  ", "output": "x"}, r"record 2: field 'instruction' is empty"),
        ({"instruction": "q"}, r"record 2: missing field 'output'"),
        (
            {"instruction": "q", "output": 3},
            r"record 2: field 'output' must be a string, got a number",
        ),
        ({"instruction": ["q"], "output": "a"}, r"record 2: field 'instruction' must be a string"),
        ({"instruction": "q", "input": 1.5, "output": "a"}, r"record 2: field 'input' must be"),
        ({"instruction": "q", "output": "a", "category": {}}, r"record 2: field 'category' must"),
    ],
)
def test_bad_json_records(tmp_path, row, problem):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "ok", "output": "ok"}, row]))
    with pytest.raises(DataError, match=problem) as info:
        load_records(str(path))
    assert "bad.json" in str(info.value)


def test_bad_jsonl_record_names_the_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}, '"text"'],
    )
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 3: expected an object .*a string"):
        load_records(str(path))


@pytest.mark.parametrize("name, text", [("e.json", "[]"), ("e.jsonl", "\n\n")])
def test_no_records(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=rf"{name}.*contains no records"):
        load_records(str(path))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "\xff\xfe", "output": "b"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(str(path))
