"""grain pipeline: loss-mask alignment with the chat template, truncation, determinism, resume,
per-process split, packing, and the TFDS round trip (array_record, no TensorFlow)."""

import sys

import numpy as np
import pytest

from bilevel_jax.data import pipeline as pl
from bilevel_jax.data import tfds_builders as tb
from bilevel_jax.data.records import Record
from bilevel_jax.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def recs(n=10):
  return [Record(f"id{i:02d}", f"question {i}?", f"answer number {i}." + "!" * i, "src",
                 "good") for i in range(n)]


def ids_of(batch):
  return [e for e in batch["example_id"].ravel().tolist() if e]


def test_loss_mask_covers_exactly_the_response_and_end_of_turn():
  r = Record("a", "Hi?", "Yo.", "s")
  ex = pl.tokenize_example(pl.records_source([r])[0], TOK, max_len=64)
  b = pl.collate([ex], 2, 64, TOK.pad_id)
  prompt, response = TOK.encode_chat("Hi?", "Yo.")
  n = len(prompt) + len(response) - 1
  masked_targets = b["targets"][0][b["loss_mask"][0] == 1].tolist()
  assert masked_targets == response  # "Yo." then the end-of-turn id
  assert response[-1] == TOK.eos_id
  assert b["tokens"][0, :n].tolist() == (prompt + response)[:-1]
  assert b["targets"][0, :n].tolist() == (prompt + response)[1:]
  assert b["positions"][0, :n].tolist() == list(range(n))
  assert b["segment_ids"][0].tolist() == [1] * n + [0] * (64 - n)
  assert b["loss_mask"][0, n:].sum() == 0 and b["tokens"][0, n:].tolist() == [TOK.pad_id] * (64 - n)
  # The second row is padding: index -1, no loss, segment 0.
  assert b["index"].tolist() == [0, -1] and b["example_id"].tolist() == ["a", ""]
  assert b["loss_mask"][1].sum() == 0 and b["segment_ids"][1].sum() == 0
  for k in ("tokens", "targets", "positions", "segment_ids", "index"):
    assert b[k].dtype == np.int32
  assert b["loss_mask"].dtype == np.float32


def test_truncation_keeps_the_prompt_and_cuts_the_response():
  r = Record("a", "Q?", "x" * 100, "s")
  prompt, _ = TOK.encode_chat("Q?", "x")
  ex = pl.tokenize_example(pl.records_source([r])[0], TOK, max_len=32)
  assert ex["truncated"] == 1 and len(ex["ids"]) == 33 and ex["n_prompt"] == len(prompt)
  assert ex["ids"][:len(prompt)].tolist() == prompt
  b = pl.collate([ex], 1, 32, TOK.pad_id)
  assert b["loss_mask"][0].sum() == 33 - len(prompt) and b["truncated"].tolist() == [1]


def test_overlong_prompt_keeps_its_end_and_one_response_token():
  r = Record("a", "q" * 100, "yes", "s")
  ex = pl.tokenize_example(pl.records_source([r])[0], TOK, max_len=16)
  prompt, response = TOK.encode_chat("q" * 100, "yes")
  assert ex["ids"].tolist() == prompt[-16:] + response[:1] and ex["truncated"] == 1


class _PromptOnly(ByteTokenizer):
  """Templates without a response, as a prompt-only evaluation record would be."""

  def encode_chat(self, question, response=None, system=None):
    return super().encode_chat(question, None, system)


def test_prompt_only_record_is_refused_for_training():
  ex = {"question": "q", "response": "", "index": 0, "example_id": "t"}
  with pytest.raises(ValueError, match="example 't': empty response after the template"):
    pl.tokenize_example(ex, _PromptOnly(), 16)


def test_index_is_the_sorted_example_id_order():
  src = pl.records_source([Record("b", "q", "r", "s"), Record("a", "q2", "r", "s")])
  assert [(e["example_id"], e["index"]) for e in src] == [("b", 1), ("a", 0)]


def kw(**over):
  return {"max_len": 48, "batch_size": 3, "seed": 7, **over}


def test_same_seed_same_batches_other_seed_other_order():
  src = pl.records_source(recs())
  a = [ids_of(b) for b in pl.make_iterator(src, TOK, **kw())]
  b = [ids_of(b) for b in pl.make_iterator(src, TOK, **kw())]
  c = [ids_of(b) for b in pl.make_iterator(src, TOK, **kw(seed=8))]
  assert a == b and a != c
  assert sorted(sum(a, [])) == sorted(r.example_id for r in recs())  # one epoch, all once
  assert len(a) == 4  # 10 examples / 3 per batch, last batch padded


def test_epochs_are_reshuffled():
  src = pl.records_source(recs())
  batches = [ids_of(b) for b in pl.make_iterator(src, TOK, **kw(batch_size=10, num_epochs=2))]
  assert sorted(batches[0]) == sorted(batches[1]) and batches[0] != batches[1]


def test_resume_from_saved_state_gives_identical_batches():
  src = pl.records_source(recs())
  it = pl.make_iterator(src, TOK, **kw(num_epochs=3))
  for _ in range(4):
    next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(5)]
  it2 = pl.make_iterator(src, TOK, state=state, **kw(num_epochs=3))
  for want in rest:
    got = next(it2)
    for k in want:
      assert np.array_equal(want[k], got[k]), k


def test_processes_get_disjoint_shares_that_cover_the_data():
  src = pl.records_source(recs(12))
  shares = [sum((ids_of(b) for b in pl.make_iterator(
      src, TOK, **kw(batch_size=2, process_index=p, process_count=3))), []) for p in range(3)]
  assert all(len(s) == 4 for s in shares)
  assert sorted(sum(shares, [])) == sorted(r.example_id for r in recs(12))
  with pytest.raises(ValueError, match="process_index 3"):
    pl.make_dataset(src, TOK, max_len=8, batch_size=1, process_index=3, process_count=3)


def test_drop_remainder_and_device_batch():
  src = pl.records_source(recs())
  batches = list(pl.make_iterator(src, TOK, **kw(drop_remainder=True)))
  assert len(batches) == 3 and all((b["index"] >= 0).all() for b in batches)
  dev = pl.device_batch(batches[0])
  assert sorted(dev) == sorted(pl.NUMERIC_KEYS)
  assert all(v.dtype != object for v in dev.values())


def test_packing_puts_segments_in_rows_with_restarting_positions():
  src = pl.records_source(recs(4))
  b = next(pl.make_iterator(src, TOK, max_len=128, batch_size=2, seed=0, pack_rows=True,
                            examples_per_row=2))
  assert b["index"].shape == (2, 2) and sorted(ids_of(b)) == [f"id0{i}" for i in range(4)]
  for r in range(2):
    seg, pos = b["segment_ids"][r], b["positions"][r]
    for s in (1, 2):
      m = seg == s
      assert m.any() and pos[m].tolist() == list(range(m.sum()))
      assert set(b["segment_index"][r][m].tolist()) == {b["index"][r, s - 1]}
  # Each segment's masked targets are exactly that example's response tokens.
  by_id = {r.example_id: r for r in recs(4)}
  for r in range(2):
    for s in (1, 2):
      m = (b["segment_ids"][r] == s) & (b["loss_mask"][r] == 1)
      rec = by_id[b["example_id"][r, s - 1]]
      assert b["targets"][r][m].tolist() == TOK.encode_chat(rec.question, rec.response)[1]
  with pytest.raises(ValueError, match="fits in no row"):
    next(pl.make_iterator(src, TOK, max_len=40, batch_size=1, seed=0, pack_rows=True,
                          examples_per_row=4))


def test_tfds_round_trip_without_tensorflow(tmp_path):
  splits = {"pool": recs(6), "validation": [Record("v1", "vq", "vr", "s", "good", "validation")],
            "test": [Record("t1", "tq", "", "s", "harmful", "test", {"prompt_only": True})]}
  src = tb.data_source(None, "pool", records=splits, data_dir=str(tmp_path))
  assert len(src) == 6
  got = sorted(tb.decode(src[i]) for i in range(len(src)))
  assert got == sorted((i, r) for i, r in enumerate(recs(6)))
  test = tb.data_source(None, "test", records=splits, data_dir=str(tmp_path))
  assert tb.decode(test[0]) == (0, splits["test"][0])
  builder = tb.prepare(records=splits, data_dir=str(tmp_path))
  tsv = (builder.data_path / "weight_index.pool.tsv").read_text().splitlines()
  assert tsv == ["index\texample_id"] + [f"{i}\tid0{i}" for i in range(6)]
  batches = list(pl.make_iterator(src, TOK, **kw()))
  assert sorted(sum((ids_of(b) for b in batches), [])) == [f"id0{i}" for i in range(6)]
  assert "tensorflow" not in sys.modules
