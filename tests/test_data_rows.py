"""Reading and validating rows: every kind of malformed row is reported with file, line and field."""

import json
import logging
from pathlib import Path

import pytest

from kangaroo_lit.data.rows import (
    Location,
    collect_rows,
    iter_file_records,
    load_file_rows,
    validate_record,
)

FIXTURES = Path(__file__).parent / "fixtures"


def test_valid_jsonl_rows():
    rows = load_file_rows(FIXTURES / "dolly-tiny.jsonl", "dolly")
    assert len(rows) == 10
    assert set(rows[0]) == {"instruction", "context", "response"}
    assert rows[1]["context"].startswith("The cat")


def test_json_lines_in_a_json_file():
    assert len(load_file_rows(FIXTURES / "dolly-lines.json", "dolly")) == 3


@pytest.mark.parametrize(
    "line, field, fragment",
    [
        (2, None, "not valid JSON"),
        (3, None, "expected a JSON object, got list"),
        (4, "response", "missing"),
        (5, "instruction", "expected a string, got int"),
        (8, "context", "expected a string, got null"),
        (9, "response", "empty string"),
    ],
)
def test_each_malformed_kind_names_file_line_and_field(line, field, fragment):
    path = FIXTURES / "dolly-malformed.jsonl"
    problems = {}
    for location, record in iter_file_records(path, "dolly"):
        _, found = validate_record(record, "dolly", location)
        for p in found:
            problems[location.line] = p
    problem = problems[line]
    message = str(problem)
    assert str(path) in message and f"line {line}" in message and fragment in message
    assert problem.field == field
    if field is not None:
        assert f"field {field!r}" in message
    assert set(problems) == {2, 3, 4, 5, 8, 9}  # the blank line 7 is not a row


def test_error_policy_lists_first_problems_and_count():
    with pytest.raises(ValueError) as err:
        load_file_rows(FIXTURES / "dolly-malformed.jsonl", "dolly", on_bad_row="error")
    text = str(err.value)
    assert text.startswith("6 malformed row(s)")
    assert "line 2" in text and "... and 1 more" in text  # 5 listed, then the count of the rest
    assert "on_bad_row='skip'" in text


def test_skip_policy_keeps_valid_rows_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="kangaroo_lit.data.rows"):
        rows = load_file_rows(FIXTURES / "dolly-malformed.jsonl", "dolly", on_bad_row="skip")
    assert [r["instruction"] for r in rows] == [
        "What is the capital of France?",
        "Summarize the text.",
        "Which is a fish? Tope or Rope",
    ]
    assert "skipped 6 malformed row(s)" in caplog.text and "line 4, field 'response'" in caplog.text


def test_json_list_names_element_index():
    path = FIXTURES / "dolly-list.json"
    with pytest.raises(ValueError) as err:
        load_file_rows(path, "dolly")
    assert f"{path}, element 1, field 'instruction': missing" in str(err.value)
    assert f"{path}, element 3: expected a JSON object, got str" in str(err.value)
    assert len(load_file_rows(path, "dolly", on_bad_row="skip")) == 2


def test_empty_after_filtering_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": 1}\nnot json\n')
    with pytest.raises(ValueError, match="no valid rows"):
        load_file_rows(path, "dolly", on_bad_row="skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no valid rows"):
        load_file_rows(empty, "dolly")


def test_invalid_utf8_and_broken_json_list(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1: not valid UTF-8"):
        load_file_rows(path, "dolly")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"instruction": "a", "response": "b"},\n{oops}\n]')
    with pytest.raises(ValueError, match=r"broken.json, line 3: not a valid JSON list"):
        load_file_rows(broken, "dolly")


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_file_rows(tmp_path / "nope.jsonl", "dolly")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_file_rows(FIXTURES / "stories.txt", "dolly")


def test_text_formats():
    docs = list(iter_file_records(FIXTURES / "stories.txt", "text"))
    assert [loc.line for loc, _ in docs] == [1, 3, 8, 10]
    assert (
        docs[1][1]["text"] == "Tom had a red ball.\nHe threw it high in the sky.\nThe ball came down and Tom laughed."
    )
    from_txt = load_file_rows(FIXTURES / "stories.txt", "text")
    from_jsonl = load_file_rows(FIXTURES / "stories.jsonl", "text")
    assert from_txt == from_jsonl and len(from_txt) == 4


def test_text_rows_need_a_text_string(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2, field 'text': missing"):
        load_file_rows(path, "text")


def test_collect_rows_rejects_unknown_policy():
    with pytest.raises(ValueError, match="on_bad_row"):
        collect_rows([(Location("x", line=1), {"text": "a"})], "text", on_bad_row="ignore")
