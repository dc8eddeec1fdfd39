"""grain pipeline: records -> chat-templated tokens with a response-only loss mask -> batches.

Batch format (what ``bilevel_jax/core/sft.py`` expects), numpy, right-padded to ``max_len``:

* ``tokens``, ``targets``: int32 [B, T]; ``targets[:, t]`` is the token after ``tokens[:, t]``.
* ``loss_mask``: float32 [B, T], 1 where ``targets`` is a response token (the end-of-turn token
  included); prompt and padding 0.
* ``positions``, ``segment_ids``: int32 [B, T]; segment 0 is padding.
* ``index``: int32 [B], the example's row in the weight vector (-1 for a padding row).
* ``example_id``: object [B] (``""`` for padding rows); ``truncated``: int32 [B], 1 where the
  response was cut to fit. Neither goes to jit: use :func:`device_batch`.

A conversation of ``len(prompt) + len(response)`` tokens gives ``len - 1`` input positions, so a
row of width ``T = max_len`` holds conversations of up to ``max_len + 1`` tokens. Longer ones keep
the whole prompt and lose the end of the response (counted in ``truncated``); a prompt that leaves
no room for one response token loses its beginning instead.

Order: the data source is shuffled with ``seed`` (reshuffled every epoch), repeated, split across
processes (``process_index::process_count``, so hosts see disjoint examples), tokenized and
batched. The iterator's ``get_state()`` is a small dict a checkpoint can hold; ``set_state`` on a
fresh iterator resumes exactly.

With ``pack=True`` several examples share a row (segments 1, 2, ...; positions restart per
segment); ``index`` and ``example_id`` are then [B, K] (K = ``examples_per_row``, -1/"" unused)
and ``segment_index`` [B, T] gives each token's weight-vector row. A per-example loss on packed
rows must sum per segment (``per_example_nll`` treats a row as one example).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from bilevel_jax.data.records import Record, assign_indices

NUMERIC_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "index")


def records_source(records: Sequence[Record]) -> list[dict]:
  """An in-memory data source: one dict per record with its stable ``index`` (sorted ids)."""
  index = assign_indices(records)
  return [{"index": index[r.example_id], "example_id": r.example_id, "question": r.question,
           "response": r.response} for r in records]


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def tokenize_example(example: Mapping[str, Any], tokenizer, max_len: int) -> dict:
  """Chat-templates one example and cuts it to at most ``max_len + 1`` tokens.

  Args:
    example: a dict with ``question``, ``response``, ``index``, ``example_id`` (str or bytes).
    tokenizer: follows ``bilevel_jax.model.tokenizer.Tokenizer`` (``encode_chat``).
    max_len: row width T.
  Returns:
    ``{"ids": int32 [n], "n_prompt": int, "index", "example_id", "truncated"}``.
  """
  prompt, response = tokenizer.encode_chat(_text(example["question"]), _text(example["response"]))
  if not response:
    raise ValueError(f"example {_text(example['example_id'])!r}: empty response after the "
                     "template (prompt-only records are for evaluation, not training)")
  budget = max_len + 1
  truncated = 0
  if len(prompt) + len(response) > budget:
    truncated = 1
    if len(prompt) >= budget:  # keep the end of the prompt (the assistant header) and 1 token
      prompt = prompt[len(prompt) - (budget - 1):]
    response = response[:budget - len(prompt)]
  ids = np.asarray(prompt + response, np.int32)
  return {"ids": ids, "n_prompt": len(prompt), "index": int(example["index"]),
          "example_id": _text(example["example_id"]), "truncated": truncated}


def _row(ex: dict, row: dict, start: int, segment: int):
  ids, n = ex["ids"], len(ex["ids"]) - 1
  sl = slice(start, start + n)
  row["tokens"][sl] = ids[:-1]
  row["targets"][sl] = ids[1:]
  # targets[t] = ids[t + 1] is a response token when t + 1 >= n_prompt.
  row["loss_mask"][sl] = (np.arange(n) + 1 >= ex["n_prompt"]).astype(np.float32)
  row["positions"][sl] = np.arange(n, dtype=np.int32)
  row["segment_ids"][sl] = segment
  return n


def _empty(rows: int, max_len: int, pad_id: int) -> dict:
  return {"tokens": np.full((rows, max_len), pad_id, np.int32),
          "targets": np.full((rows, max_len), pad_id, np.int32),
          "loss_mask": np.zeros((rows, max_len), np.float32),
          "positions": np.zeros((rows, max_len), np.int32),
          "segment_ids": np.zeros((rows, max_len), np.int32)}


def collate(examples: Sequence[dict], batch_size: int, max_len: int, pad_id: int) -> dict:
  """Right-padded batch of ``batch_size`` rows (missing rows are padding, ``index = -1``)."""
  b = _empty(batch_size, max_len, pad_id)
  b["index"] = np.full((batch_size,), -1, np.int32)
  b["example_id"] = np.array([""] * batch_size, dtype=object)
  b["truncated"] = np.zeros((batch_size,), np.int32)
  for i, ex in enumerate(examples):
    _row(ex, {k: b[k][i] for k in ("tokens", "targets", "loss_mask", "positions",
                                   "segment_ids")}, 0, 1)
    b["index"][i], b["example_id"][i], b["truncated"][i] = ex["index"], ex["example_id"], \
        ex["truncated"]
  return b


def pack(examples: Sequence[dict], batch_size: int, max_len: int, pad_id: int,
         examples_per_row: int) -> dict:
  """First-fit packing of ``examples`` into ``batch_size`` rows of ``max_len`` tokens.

  Raises ``ValueError`` (naming the example) if one does not fit: nothing is dropped silently.
  """
  b = _empty(batch_size, max_len, pad_id)
  k = examples_per_row
  b["index"] = np.full((batch_size, k), -1, np.int32)
  b["example_id"] = np.full((batch_size, k), "", dtype=object)
  b["segment_index"] = np.full((batch_size, max_len), -1, np.int32)
  b["truncated"] = np.zeros((batch_size, k), np.int32)
  used, count = [0] * batch_size, [0] * batch_size
  for ex in examples:
    n = len(ex["ids"]) - 1
    r = next((r for r in range(batch_size) if used[r] + n <= max_len and count[r] < k), None)
    if r is None:
      raise ValueError(f"packing: example {ex['example_id']!r} ({n} positions) fits in no row; "
                       f"lower examples_per_row or raise batch_size/max_len")
    row = {key: b[key][r] for key in ("tokens", "targets", "loss_mask", "positions",
                                      "segment_ids")}
    _row(ex, row, used[r], count[r] + 1)
    b["segment_index"][r, used[r]:used[r] + n] = ex["index"]
    b["index"][r, count[r]], b["example_id"][r, count[r]] = ex["index"], ex["example_id"]
    b["truncated"][r, count[r]] = ex["truncated"]
    used[r] += n
    count[r] += 1
  return b


def make_dataset(source, tokenizer, *, max_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = 1, process_index: int = 0,
                 process_count: int = 1, drop_remainder: bool = False, pack_rows: bool = False,
                 examples_per_row: int = 4) -> grain.MapDataset:
  """The batched grain ``MapDataset`` over a random-access ``source``.

  Args:
    source: a ``tfds.data_source`` split, or :func:`records_source` of a list of records.
    tokenizer: follows the ``Tokenizer`` protocol (``encode_chat``, ``pad_id``).
    max_len: row width T.
    batch_size: rows per batch *per process*.
    seed: shuffle seed (same seed, same batches).
    shuffle: False keeps the source order.
    num_epochs: passes over the data (None: endless).
    process_index, process_count: this process's share (``jax.process_index()``,
      ``jax.process_count()``); processes get disjoint, interleaved examples.
    drop_remainder: drop the last partial batch instead of padding it with ``index = -1`` rows.
    pack_rows: pack ``batch_size * examples_per_row`` examples into ``batch_size`` rows.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = ds.map(lambda ex: tokenize_example(ex, tokenizer, max_len))
  pad = tokenizer.pad_id
  if pack_rows:
    return ds.batch(batch_size * examples_per_row, drop_remainder=drop_remainder,
                    batch_fn=lambda exs: pack(exs, batch_size, max_len, pad, examples_per_row))
  return ds.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=lambda exs: collate(exs, batch_size, max_len, pad))


def make_iterator(source, tokenizer, *, state: Mapping | None = None, **kwargs):
  """An iterator over :func:`make_dataset` batches, resumed from ``state`` if given.

  ``it.get_state()`` returns a small JSON-able dict; store it with the checkpoint.
  """
  it = iter(make_dataset(source, tokenizer, **kwargs).to_iter_dataset())
  if state is not None:
    it.set_state(dict(state))
  return it


def device_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Only the numeric arrays a jitted step takes (drops ``example_id`` and counters)."""
  keys = NUMERIC_KEYS + (("segment_index",) if "segment_index" in batch else ())
  return {k: batch[k] for k in keys}
