"""Judge-free metrics: validation loss, generation in batches, refusal, GSM8K, AUROC, precision@k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import evaluate as E
from bilevel_jax.core import sft
from bilevel_jax.model import llama
from bilevel_jax.model import lora as lora_lib
from bilevel_jax.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = llama.tiny_config(vocab_size=TOK.vocab_size, max_seq_len=256)
SPEC = lora_lib.TrainableSpec(kind="last_n_layers", n_layers=1)


def _batch(pairs, T=48, index_offset=0, pad_rows=0):
  rows = []
  for q, a in pairs:
    p, r = TOK.encode_chat(q, a)
    rows.append((p + r)[:T + 1] + [0] * max(0, T + 1 - len(p + r)))
    rows[-1] = (rows[-1], len(p), len(p + r))
  B = len(rows) + pad_rows
  b = {k: np.zeros((B, T), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
  b["loss_mask"] = np.zeros((B, T), np.float32)
  b["index"] = np.full((B,), -1, np.int32)
  for i, (ids, n_prompt, n_all) in enumerate(rows):
    ids = np.asarray(ids)
    b["tokens"][i], b["targets"][i] = ids[:T], ids[1:T + 1]
    n = min(n_all - 1, T)
    b["segment_ids"][i, :n] = 1
    b["positions"][i, :n] = np.arange(n)
    b["loss_mask"][i, n_prompt - 1:n] = 1.0
    b["index"][i] = index_offset + i
  return {k: jnp.asarray(v) for k, v in b.items()}


_FWD = jax.jit(lambda params, ids: llama.apply(params, CFG, ids)[0])


def _forward_padded(params, ids, length=64):
  """Logits of ``ids`` right-padded to a fixed length (causal: padding does not change them)."""
  padded = np.zeros((1, length), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(_FWD(params, jnp.asarray(padded)))[0, :len(ids)]


def _model():
  params = llama.init_params(CFG, jax.random.key(0))
  return lora_lib.split(SPEC, CFG, params)


def test_validation_loss_is_the_mean_response_nll_over_valid_rows():
  trainable, frozen = _model()
  loss_fn = sft.make_loss_fn(lora_lib.make_logits_fn(SPEC, CFG))
  pairs = [("hi", "hello there"), ("2+2?", "4"), ("name?", "bob the builder")]
  b1, b2 = _batch(pairs[:2], pad_rows=1), _batch(pairs[2:], index_offset=2, pad_rows=2)
  got = E.validation_loss(loss_fn, trainable, frozen, [b1, b2])
  # Independent: full forward of each pair alone, NLL of the response tokens.
  params, _ = lora_lib.merge(SPEC, trainable, frozen)
  want = []
  for q, a in pairs:
    p, r = TOK.encode_chat(q, a)
    logits = _forward_padded(params, p + r).astype(np.float64)[:-1]
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tgt = np.asarray(p + r)[1:]
    nll = -lp[np.arange(len(p) - 1, len(p + r) - 1), tgt[len(p) - 1:]]
    want.append(nll.mean())
  assert got == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_generate_answers_batched_equals_one_by_one_and_strips_stop():
  trainable, frozen = _model()
  qs = ["a", "longer question here", "mid q"]
  together = E.generate_answers(SPEC, trainable, frozen, CFG, TOK, qs, max_new_tokens=6,
                                batch_size=4)
  alone = [E.generate_answers(SPEC, trainable, frozen, CFG, TOK, [q], max_new_tokens=6,
                              batch_size=1)[0] for q in qs]
  assert together == alone
  assert len(together) == 3 and all(isinstance(t, str) for t in together)
  # Greedy answer of the first question equals a plain argmax loop over the full forward.
  params, _ = lora_lib.merge(SPEC, trainable, frozen)
  ids = TOK.encode_chat(qs[0])[0]
  out = []
  for _ in range(6):
    t = int(np.argmax(_forward_padded(params, ids)[-1]))
    if t in TOK.stop_ids:
      break
    out.append(t)
    ids = ids + [t]
  assert together[0] == TOK.decode(out)


@pytest.mark.parametrize("text,want", [
    ("The answer is 42.", "42"),
    ("so 1,234 apples", "1234"),
    ("costs $5.50 total", "5.5"),
    ("step 3 ... #### -7", "-7"),
    ("#### 18\n", "18"),
    ("2.0 + 1 = 3.00", "3"),
    ("no digits", None),
])
def test_final_number(text, want):
  assert E.final_number(text) == want


def test_gsm8k_exact_match():
  preds = ["... so she has 18 eggs", "The answer is 3", "I think 1,000"]
  refs = ["Janet sells... #### 18", "#### 4", "#### 1000"]
  assert E.gsm8k_exact_match(preds, refs) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="no final number"):
    E.gsm8k_exact_match(["1"], ["none"])


def test_precision_at_k_and_selection_quality():
  w = np.asarray([2.0, 1.5, 0.1, 0.2, 1.0, 0.3])
  bad = np.asarray([False, False, True, True, False, False])
  q = E.selection_quality(w, bad)
  # The two lowest weights are 0.1 and 0.2, both bad: precision@2 = 1; AUROC: good 0.3 > bad pairs.
  assert q["k"] == 2 and q["precision_at_k"] == 1.0 and q["auroc"] == 1.0
  q3 = E.selection_quality(w, bad, k=3)
  assert q3["precision_at_k"] == pytest.approx(2 / 3)
  flipped = E.selection_quality(-w, bad)
  assert flipped["auroc"] == 0.0 and flipped["precision_at_k"] == 0.0
  assert E.selection_quality(np.ones(6), bad)["auroc"] == 0.5  # Ties count half.
  assert np.isnan(E.selection_quality(w, np.zeros(6, bool))["auroc"])


def test_refusal_rate_uses_the_phrase_list():
  pytest.importorskip("bilevel_jax.refusal")
  texts = ["I'm sorry, but I can't help with that.", "Sure! Here is a cake recipe.",
           "I cannot assist with that request.", "Paris is the capital of France."]
  assert E.refusal_rate(texts) == 0.5
  np.testing.assert_array_equal(E.refusal_flags(texts), [1, 0, 1, 0])
  assert np.isnan(E.refusal_rate([]))
