"""One record schema for every pool, and strict readers for user files (JSONL, CSV, Parquet).

A :class:`Record` is one (question, response) pair with its ``source``, ``label`` and ``split``.
Every row a reader sees is validated; a bad row raises :class:`DataError` whose message names the
file, the row and the field, or, with ``on_bad_row="skip"``, is skipped, counted by reason in a
:class:`ReadReport` and written to a rejects file. Nothing is dropped silently.

Row numbers are 1-based: for JSONL the line number, for CSV and Parquet the data row (the CSV
header is row 0).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

LABELS = ("good", "low_quality", "harmful", "refusal", "unknown")
"""Allowed labels. ``harmful`` and ``low_quality`` are the pairs selection should down-weight."""
BAD_LABELS = frozenset({"harmful", "low_quality"})
SPLITS = ("pool", "validation", "test")
FIELDS = ("example_id", "question", "response", "source", "label", "split", "meta")
REQUIRED_FIELDS = ("question", "response")
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
  """A bad input row. ``str(err)`` is ``"<path>: row <row>: field '<field>': <detail>"``.

  Attributes:
    path: the file; row: 1-based row (None for file-level errors); field: the field or None;
    reason: a short code used to count rejects (``invalid_json``, ``not_utf8``, ...).
  """

  def __init__(self, path: str, row: int | None, field: str | None, reason: str, detail: str):
    self.path, self.row, self.field, self.reason, self.detail = path, row, field, reason, detail
    where = [str(path)]
    if row is not None:
      where.append(f"row {row}")
    if field is not None:
      where.append(f"field '{field}'")
    super().__init__(": ".join(where) + f": {detail}")


@dataclasses.dataclass(frozen=True)
class Record:
  """One SFT pair. ``meta`` holds JSON-serializable extras (subset, corruption kind, answer...)."""

  example_id: str
  question: str
  response: str
  source: str
  label: str = "unknown"
  split: str = "pool"
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def is_bad(self) -> bool:
    """True for labels selection should down-weight (``harmful``, ``low_quality``)."""
    return self.label in BAD_LABELS

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "meta": dict(self.meta)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Record":
    return cls(**{k: d[k] for k in FIELDS if k in d})


def stable_id(source: str, *parts: str) -> str:
  """``example_id`` from the source and the row's content: ``<source>-<16 hex digits>``.

  Content (not row position) is hashed, so reordering a file keeps every id, and an exact
  duplicate row collides (and is reported as a duplicate).
  """
  h = hashlib.sha256("\x00".join((source, *parts)).encode("utf-8")).hexdigest()[:16]
  return f"{source.replace('/', '_')}-{h}"


def normalize_text(text: str) -> str:
  """Case-folded, punctuation-free, whitespace-collapsed text, for near-duplicate detection."""
  kept = "".join(c if c.isalnum() else " " for c in text.casefold())
  return " ".join(kept.split())


# ------------------------------------------------------------------------------------ validation


def _check_text(path, row, field, value, *, allow_empty=False):
  if not isinstance(value, str):
    raise DataError(path, row, field, "wrong_type",
                    f"must be a string, got {type(value).__name__}")
  if "\x00" in value:
    raise DataError(path, row, field, "nul_byte", f"contains a NUL character at index "
                    f"{value.index(chr(0))}")
  if "\ufeff" in value:
    raise DataError(path, row, field, "bom", "contains a byte-order mark (U+FEFF)")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800" in JSON
    raise DataError(path, row, field, "not_utf8",
                    f"not valid UTF-8: unpaired surrogate at index {e.start}") from None
  if not allow_empty:
    if value == "":
      raise DataError(path, row, field, "empty_text", "is empty")
    if not value.strip():
      raise DataError(path, row, field, "empty_text", "is whitespace-only")


def validate_record(rec: Record, path: str = "<records>", row: int | None = None) -> Record:
  """Checks one record; returns it unchanged or raises :class:`DataError`.

  A test-split record may have an empty response (a prompt-only evaluation item).
  """
  for field in ("example_id", "source"):
    _check_text(path, row, field, getattr(rec, field))
  _check_text(path, row, "question", rec.question)
  _check_text(path, row, "response", rec.response, allow_empty=rec.split == "test")
  if not isinstance(rec.label, str):
    raise DataError(path, row, "label", "wrong_type",
                    f"must be a string, got {type(rec.label).__name__}")
  if rec.label not in LABELS:
    raise DataError(path, row, "label", "unknown_label",
                    f"unknown label {rec.label!r} (allowed: {', '.join(LABELS)})")
  if rec.split not in SPLITS:
    raise DataError(path, row, "split", "unknown_split",
                    f"unknown split {rec.split!r} (allowed: {', '.join(SPLITS)})")
  if not isinstance(rec.meta, Mapping):
    raise DataError(path, row, "meta", "wrong_type",
                    f"must be an object, got {type(rec.meta).__name__}")
  return rec


def check_length(rec: Record, tokenizer, max_tokens: int, path: str = "<records>",
                 row: int | None = None) -> int:
  """Raises :class:`DataError` if the chat-templated pair is longer than ``max_tokens``.

  Args:
    rec: the record.
    tokenizer: anything with ``encode_chat(question, response) -> (prompt_ids, response_ids)``.
    max_tokens: the model's context length.
    path, row: where the record came from, for the message.
  Returns:
    The templated length in tokens.
  """
  prompt, response = tokenizer.encode_chat(rec.question, rec.response)
  n = len(prompt) + len(response)
  if n > max_tokens:
    raise DataError(path, row, "response", "too_long",
                    f"too long: {n} tokens after the chat template > max {max_tokens}")
  return n


# --------------------------------------------------------------------------------- read report


@dataclasses.dataclass
class ReadReport:
  """What a reader did: rows read, records kept, rejects by reason, notes (e.g. a stripped BOM)."""

  path: str
  rows: int = 0
  kept: int = 0
  rejects: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  rejected_rows: list = dataclasses.field(default_factory=list)

  def reject(self, err: DataError, raw: str | None, max_chars: int = 300):
    self.rejects[err.reason] += 1
    self.rejected_rows.append({"row": err.row, "field": err.field, "reason": err.reason,
                               "error": str(err), "raw": (raw or "")[:max_chars]})

  def write_rejects(self, out_path: str) -> str:
    """Writes one JSON line per rejected row (raw text truncated); returns ``out_path``."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
      for r in self.rejected_rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out_path


# ------------------------------------------------------------------------------------- readers


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """Which column of a user file holds each record field (``None``: not in the file).

  ``source`` and ``label`` fall back to ``default_source`` (the file's stem when empty) and
  ``default_label``; ``example_id`` falls back to :func:`stable_id` of source, question, response.
  """

  question: str = "question"
  response: str = "response"
  example_id: str | None = "example_id"
  source: str | None = "source"
  label: str | None = "label"
  split: str | None = "split"
  meta: str | None = "meta"
  default_source: str = ""
  default_label: str = "unknown"
  default_split: str = "pool"


def _decode_line(path: str, row: int, raw: bytes) -> str:
  if b"\x00" in raw:
    raise DataError(path, row, None, "nul_byte",
                    f"contains a NUL byte (0x00) at column {raw.index(0) + 1}")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(path, row, None, "not_utf8",
                    f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}") from None
  if "\ufeff" in text:
    raise DataError(path, row, None, "bom", "byte-order mark (U+FEFF) inside the file")
  return text


def _file_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  if not data.strip():
    raise DataError(path, None, None, "empty_file", "empty file (no rows)")
  if data.startswith(UTF16_BOMS):
    raise DataError(path, None, None, "bom",
                    "file starts with a UTF-16 byte-order mark; convert it to UTF-8")
  return data


def _row_to_record(path: str, row: int, obj: Any, fm: FieldMap) -> Record:
  if not isinstance(obj, dict):
    raise DataError(path, row, None, "wrong_type",
                    f"must be a JSON object, got {type(obj).__name__}")

  def get(name, column, default=None, required=False):
    if column is None or column not in obj or obj[column] is None:
      if required:
        mapped = "" if column == name else f" (mapped from '{column}')"
        raise DataError(path, row, name, "missing_field", f"missing field{mapped}")
      return default
    return obj[column]

  question = get("question", fm.question, required=True)
  response = get("response", fm.response, required=True)
  source = get("source", fm.source, fm.default_source or os.path.splitext(
      os.path.basename(path))[0])
  label = get("label", fm.label, fm.default_label)
  split = get("split", fm.split, fm.default_split)
  meta = get("meta", fm.meta, {})
  if isinstance(meta, str):  # CSV cells hold meta as JSON text
    try:
      meta = json.loads(meta) if meta.strip() else {}
    except json.JSONDecodeError as e:
      raise DataError(path, row, "meta", "invalid_json", f"invalid JSON: {e.msg}") from None
  for name, value in (("question", question), ("response", response), ("source", source)):
    _check_text(path, row, name, value, allow_empty=(name == "response" and split == "test"))
  ex_id = get("example_id", fm.example_id)
  if ex_id is None:
    ex_id = stable_id(source, question, response)
  elif not isinstance(ex_id, str):
    if isinstance(ex_id, bool) or not isinstance(ex_id, int):
      raise DataError(path, row, "example_id", "wrong_type",
                      f"must be a string, got {type(ex_id).__name__}")
    ex_id = str(ex_id)
  rec = Record(example_id=ex_id, question=question, response=response, source=source,
               label=label, split=split, meta=meta)
  return validate_record(rec, path, row)


def _iter_jsonl(path: str) -> Iterator[tuple[int, str | None, Any, DataError | None]]:
  data = _file_bytes(path)
  if data.startswith(UTF8_BOM):
    data = data[len(UTF8_BOM):]
    yield 0, None, "bom_stripped", None
  lines = data.split(b"\n")
  ends_with_newline = lines[-1] == b""
  if ends_with_newline:
    lines = lines[:-1]
  for i, raw in enumerate(lines, start=1):
    raw = raw.rstrip(b"\r")
    if not raw.strip():
      continue
    try:
      text = _decode_line(path, i, raw)
    except DataError as e:
      yield i, raw.decode("utf-8", "replace"), None, e
      continue
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      if i == len(lines) and not ends_with_newline:
        err = DataError(path, i, None, "truncated_line",
                        f"truncated last line (no newline at end of file and invalid JSON: "
                        f"{e.msg} (column {e.colno}))")
      else:
        err = DataError(path, i, None, "invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
      yield i, text, None, err
      continue
    yield i, text, obj, None


def _iter_csv(path: str) -> Iterator[tuple[int, str | None, Any, DataError | None]]:
  data = _file_bytes(path)
  if data.startswith(UTF8_BOM):
    data = data[len(UTF8_BOM):]
    yield 0, None, "bom_stripped", None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    row = data[:e.start].count(b"\n")  # header is line 1 = row 0
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(path, row, None, "not_utf8",
                    f"not valid UTF-8: byte 0x{data[e.start]:02x} at column {col}") from None
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = next(reader)
  except StopIteration:
    raise DataError(path, None, None, "empty_file", "empty file (no rows)") from None
  row = 0
  while True:
    try:
      cells = next(reader)
    except StopIteration:
      break
    except csv.Error as e:  # e.g. "line contains NUL"
      row += 1
      reason = "nul_byte" if "NUL" in str(e) else "invalid_csv"
      yield row, None, None, DataError(path, row, None, reason, f"CSV error: {e}")
      continue
    row += 1
    if not any(c.strip() for c in cells):
      continue
    raw = ",".join(cells)
    bad = [c for c in cells if "\x00" in c or "\ufeff" in c]
    if bad:
      kind = "nul_byte" if "\x00" in bad[0] else "bom"
      msg = "contains a NUL byte (0x00)" if kind == "nul_byte" else \
          "byte-order mark (U+FEFF) inside the file"
      yield row, raw, None, DataError(path, row, None, kind, msg)
      continue
    if len(cells) > len(header):
      yield row, raw, None, DataError(path, row, None, "invalid_csv",
                                      f"{len(cells)} cells but the header has {len(header)}")
      continue
    yield row, raw, dict(zip(header, cells)), None


def _iter_parquet(path: str) -> Iterator[tuple[int, str | None, Any, DataError | None]]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  _file_bytes(path)
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several types for a corrupt file
    raise DataError(path, None, None, "invalid_parquet", f"not a readable Parquet file: {e}") \
        from None
  for i, obj in enumerate(table.to_pylist(), start=1):
    yield i, json.dumps(obj, ensure_ascii=False, default=str), obj, None


READERS = {".jsonl": _iter_jsonl, ".json": _iter_jsonl, ".csv": _iter_csv,
           ".parquet": _iter_parquet, ".pq": _iter_parquet}


def read_records(path: str, fields: FieldMap | None = None, *, on_bad_row: str = "raise",
                 tokenizer=None, max_tokens: int | None = None,
                 rejects_path: str | None = None) -> tuple[list[Record], ReadReport]:
  """Reads and validates a user file of SFT pairs.

  Args:
    path: a ``.jsonl``, ``.csv`` or ``.parquet`` file.
    fields: column names (see :class:`FieldMap`); default: the record field names.
    on_bad_row: ``"raise"`` (default) raises :class:`DataError` at the first bad row; ``"skip"``
      skips it, counts it by reason and writes it to ``rejects_path``.
    tokenizer, max_tokens: if given, rows longer than ``max_tokens`` after the chat template are
      bad rows (reason ``too_long``).
    rejects_path: where skipped rows go (default ``<path>.rejects.jsonl``).
  Returns:
    ``(records, report)``. File-level problems (empty file, UTF-16) always raise.
  """
  if on_bad_row not in ("raise", "skip"):
    raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
  fm = fields or FieldMap()
  ext = os.path.splitext(path)[1].lower()
  if ext not in READERS:
    raise DataError(path, None, None, "unknown_format",
                    f"unknown file type {ext!r} (use {', '.join(sorted(READERS))})")
  report = ReadReport(path=path)
  records: list[Record] = []
  first_row: dict[str, int] = {}
  for row, raw, obj, err in READERS[ext](path):
    if row == 0:
      report.notes[obj] += 1
      continue
    report.rows += 1
    if err is None:
      try:
        rec = _row_to_record(path, row, obj, fm)
        if rec.example_id in first_row:
          raise DataError(path, row, "example_id", "duplicate_id",
                          f"duplicate example_id {rec.example_id!r} (first seen at row "
                          f"{first_row[rec.example_id]})")
        if tokenizer is not None and max_tokens is not None:
          check_length(rec, tokenizer, max_tokens, path, row)
      except DataError as e:
        err = e
    if err is not None:
      if on_bad_row == "raise":
        raise err
      report.reject(err, raw)
      continue
    first_row[rec.example_id] = row
    records.append(rec)
  report.kept = len(records)
  if report.rejected_rows:
    report.write_rejects(rejects_path or f"{path}.rejects.jsonl")
  return records, report


def write_jsonl(records: Iterable[Record], path: str) -> str:
  """Writes records as JSONL (UTF-8, one object per line); returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
  return path


def assign_indices(records: Sequence[Record]) -> dict[str, int]:
  """The stable weight-vector index: records sorted by ``example_id``, numbered from 0."""
  ids = sorted(r.example_id for r in records)
  if len(set(ids)) != len(ids):
    dup = next(a for a, b in zip(ids, ids[1:]) if a == b)
    raise DataError("<records>", None, "example_id", "duplicate_id",
                    f"duplicate example_id {dup!r}")
  return {ex_id: i for i, ex_id in enumerate(ids)}
