"""Strict input checks: one test per bad-row kind, asserting the exact message."""

import json

import pytest

from bilevel_jax.data.records import (DataError, FieldMap, Record, assign_indices, read_records,
                                      stable_id)
from bilevel_jax.model.tokenizer import ByteTokenizer

GOOD = {"question": "What is 2+2?", "response": "4.", "label": "good"}


def write(tmp_path, name, data):
  p = tmp_path / name
  p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
  return str(p)


def jsonl(*rows):
  return "".join(json.dumps(r) + "\n" for r in rows)


def expect(path, message, **kw):
  with pytest.raises(DataError) as e:
    read_records(path, **kw)
  assert str(e.value) == message
  return e.value


def test_good_file_reads_all_fields(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD, {**GOOD, "question": "Q2", "source": "s",
                                              "meta": {"k": 1}}))
  recs, rep = read_records(p)
  assert [r.question for r in recs] == ["What is 2+2?", "Q2"]
  assert recs[0].source == "a" and recs[1].source == "s" and recs[1].meta == {"k": 1}
  assert recs[0].example_id == stable_id("a", "What is 2+2?", "4.")
  assert rep.rows == 2 and rep.kept == 2 and not rep.rejects


def test_invalid_json(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD) + '{"question": "x",,}\n')
  expect(p, f"{p}: row 2: invalid JSON: Expecting property name enclosed in double quotes "
            "(column 18)")


def test_non_utf8_bytes(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD).encode() + b'{"question": "caf\xe9"}\n')
  expect(p, f"{p}: row 2: not valid UTF-8: byte 0xe9 at column 18")


def test_lone_surrogate_escape_is_not_utf8(tmp_path):
  p = write(tmp_path, "a.jsonl", '{"question": "a\\ud800", "response": "b"}\n')
  expect(p, f"{p}: row 1: field 'question': not valid UTF-8: unpaired surrogate at index 1")


def test_leading_bom_is_stripped_and_noted(tmp_path):
  p = write(tmp_path, "a.jsonl", b"\xef\xbb\xbf" + jsonl(GOOD).encode())
  recs, rep = read_records(p)
  assert len(recs) == 1 and rep.notes["bom_stripped"] == 1


def test_bom_inside_file(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD).encode() + b"\xef\xbb\xbf" + jsonl(GOOD).encode())
  expect(p, f"{p}: row 2: byte-order mark (U+FEFF) inside the file")


def test_utf16_file(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD).encode("utf-16"))
  expect(p, f"{p}: file starts with a UTF-16 byte-order mark; convert it to UTF-8")


def test_nul_byte(tmp_path):
  p = write(tmp_path, "a.jsonl", b'{"question": "a\x00b", "response": "c"}\n')
  expect(p, f"{p}: row 1: contains a NUL byte (0x00) at column 16")


def test_escaped_nul_in_field(tmp_path):
  p = write(tmp_path, "a.jsonl", '{"question": "a", "response": "b\\u0000c"}\n')
  expect(p, f"{p}: row 1: field 'response': contains a NUL character at index 1")


def test_missing_field(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({"question": "q"}))
  expect(p, f"{p}: row 1: field 'response': missing field")


def test_missing_mapped_field_names_the_column(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({"prompt": "q"}))
  expect(p, f"{p}: row 1: field 'response': missing field (mapped from 'answer')",
         fields=FieldMap(question="prompt", response="answer"))


def test_wrong_type(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({"question": 3, "response": "r"}))
  expect(p, f"{p}: row 1: field 'question': must be a string, got int")


def test_row_not_an_object(tmp_path):
  p = write(tmp_path, "a.jsonl", "[1, 2]\n")
  expect(p, f"{p}: row 1: must be a JSON object, got list")


def test_empty_question(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({"question": "", "response": "r"}))
  expect(p, f"{p}: row 1: field 'question': is empty")


def test_whitespace_only_response(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({"question": "q", "response": " \n\t"}))
  expect(p, f"{p}: row 1: field 'response': is whitespace-only")


def test_duplicate_example_id(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({**GOOD, "example_id": "x"}, {**GOOD, "question": "b",
                                                                     "example_id": "x"}))
  expect(p, f"{p}: row 2: field 'example_id': duplicate example_id 'x' (first seen at row 1)")


def test_exact_duplicate_rows_collide_on_the_content_hash(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD, GOOD))
  ex_id = stable_id("a", GOOD["question"], GOOD["response"])
  expect(p, f"{p}: row 2: field 'example_id': duplicate example_id '{ex_id}' (first seen at "
            "row 1)")


def test_over_long_text(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({"question": "q", "response": "x" * 100}))
  # ByteTokenizer: prompt "<s>user\nq</s>\n<s>assistant\n" = 20 tokens, response 100 + 1.
  expect(p, f"{p}: row 1: field 'response': too long: 121 tokens after the chat template > "
            "max 64", tokenizer=ByteTokenizer(), max_tokens=64)


def test_unknown_label(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl({**GOOD, "label": "meh"}))
  expect(p, f"{p}: row 1: field 'label': unknown label 'meh' (allowed: good, low_quality, "
            "harmful, refusal, unknown)")


def test_truncated_last_line(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD) + '{"question": "q", "resp')
  expect(p, f"{p}: row 2: truncated last line (no newline at end of file and invalid JSON: "
            "Unterminated string starting at (column 19))")


def test_last_line_without_newline_is_fine_when_complete(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD) + json.dumps({**GOOD, "question": "b"}))
  recs, _ = read_records(p)
  assert len(recs) == 2


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
  p = write(tmp_path, "a.jsonl", content)
  expect(p, f"{p}: empty file (no rows)")
  expect(p, f"{p}: empty file (no rows)", on_bad_row="skip")


def test_skip_counts_by_reason_and_writes_rejects(tmp_path):
  p = write(tmp_path, "a.jsonl", jsonl(GOOD, {"question": "q"}, {**GOOD, "label": "meh"})
            + "not json\n" + jsonl({**GOOD, "question": "z"}))
  recs, rep = read_records(p, on_bad_row="skip", rejects_path=str(tmp_path / "rej.jsonl"))
  assert [r.question for r in recs] == [GOOD["question"], "z"]
  assert rep.rows == 5 and rep.kept == 2
  assert dict(rep.rejects) == {"missing_field": 1, "unknown_label": 1, "invalid_json": 1}
  rejected = [json.loads(l) for l in (tmp_path / "rej.jsonl").read_text().splitlines()]
  assert [r["row"] for r in rejected] == [2, 3, 4]
  assert rejected[2]["raw"] == "not json"


def test_csv_reader_and_its_errors(tmp_path):
  p = write(tmp_path, "a.csv", "q,a,label\nHello?,Hi there,good\n\"multi\nline\",ok,good\n")
  recs, _ = read_records(p, FieldMap(question="q", response="a"))
  assert [r.question for r in recs] == ["Hello?", "multi\nline"]
  bad = write(tmp_path, "b.csv", "q,a\nHello?,\n")
  expect(bad, f"{bad}: row 1: field 'response': is empty", fields=FieldMap(question="q",
                                                                             response="a"))
  nul = write(tmp_path, "c.csv", b"question,response\nx\x00,y\n")
  expect(nul, f"{nul}: row 1: contains a NUL byte (0x00)")
  latin = write(tmp_path, "d.csv", b"question,response\ncaf\xe9,y\n")
  expect(latin, f"{latin}: row 1: not valid UTF-8: byte 0xe9 at column 4")
  extra = write(tmp_path, "e.csv", "question,response\na,b,c\n")
  expect(extra, f"{extra}: row 1: 3 cells but the header has 2")


def test_parquet_reader(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  p = str(tmp_path / "a.parquet")
  pq.write_table(pa.table({"question": ["q1", "q2"], "response": ["r1", None]}), p)
  expect(p, f"{p}: row 2: field 'response': missing field")
  pq.write_table(pa.table({"question": ["q1"], "response": [5]}), p)
  expect(p, f"{p}: row 1: field 'response': must be a string, got int")


def test_assign_indices_sorts_by_example_id():
  recs = [Record(i, "q", "r", "s") for i in ("b", "c", "a")]
  assert assign_indices(recs) == {"a": 0, "b": 1, "c": 2}
  with pytest.raises(DataError, match="duplicate example_id 'a'"):
    assign_indices(recs + [Record("a", "q2", "r", "s")])
