"""The online self-refinement loop (bilevel_jax.refine) on a tiny model and byte tokenizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax import refine, sampling
from bilevel_jax.model import llama
from bilevel_jax.model import lora as lora_lib
from bilevel_jax.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = llama.tiny_config(vocab_size=TOK.vocab_size, tie_embeddings=False, max_seq_len=64)
SPEC = lora_lib.TrainableSpec("full")
SCFG = sampling.SamplerConfig(max_new_tokens=2, temperature=1.0, stop_ids=TOK.stop_ids,
                              prompt_buckets=(32,), batch_buckets=(64,))
# G = 16: each round re-fits the regenerated half to a finite sample of the policy itself, a random
# drift that only the kept pairs pull back; with G = 4 (40 samples a round) the final distribution
# wandered up to TV 0.18 from the target across seeds, with G = 16 at most 0.08 (seeds 0-5).
BASE = refine.RefineConfig(selection="lowest_weight", share=0.5, num_generations=16, regen_every=20,
                           warmup_steps=40, num_steps=160, batch_size=16, max_len=24, sampler=SCFG,
                           offline_weighted=False)

# A categorical policy: every record asks the same question, so the model's answer is one
# distribution over single-letter responses. The validation-aligned (good) answers follow
# a:b:c = 5:3:2; the harmful half of the pool always answers "d".
GOOD = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
RECORDS = ([dict(question="q", response=r, label="good", index=i) for i, r in enumerate(GOOD)]
           + [dict(question="q", response="d", label="harmful", index=10 + i) for i in range(10)])
BDS_WEIGHTS = np.asarray([1.5] * 10 + [0.5] * 10, np.float32)  # BDS down-weighted the harmful half
LETTERS = [ord(c) for c in "abcd"]


def answer_distribution(trainable):
  prompt = TOK.encode_chat("q")[0]
  logits, _ = llama.apply(trainable, CFG, jnp.asarray([prompt]))
  return np.asarray(jax.nn.softmax(logits[0, -1]))


def target(probs):
  out = np.zeros(TOK.vocab_size)
  out[LETTERS] = probs
  return out


# One optimizer object for every run: refine caches its compiled step per optimizer.
OPT = optax.adam(optax.cosine_decay_schedule(1e-2, BASE.num_steps, 0.05))


def run(rcfg, seed=0, **kw):
  params = llama.init_params(CFG, jax.random.key(seed))
  trainable, frozen = lora_lib.split(SPEC, CFG, params)
  return refine.refine(RECORDS, TOK, CFG, SPEC, trainable, frozen, OPT, rcfg,
                       jax.random.key(100 + seed), weights=BDS_WEIGHTS, **kw)


def test_refine_converges_to_the_validation_aligned_distribution():
  res = run(BASE)
  dist = answer_distribution(res.trainable)
  tv_good = 0.5 * np.abs(dist - target([0.5, 0.3, 0.2, 0.0])).sum()
  tv_pool = 0.5 * np.abs(dist - target([0.25, 0.15, 0.1, 0.5])).sum()
  # Plain SFT on this pool converges to the pool mixture (TV 0.5 from the good distribution).
  assert tv_good < 0.15, dist[LETTERS]
  assert tv_pool > 0.35
  assert dist[ord("d")] < 0.05
  # Every harmful question stayed in training, with regenerated answers; none was dropped.
  assert len(res.rounds) == 6  # at steps 40, 60, ..., 140
  last = res.rounds[-1]
  assert last["questions_regenerated"] == 10 and last["harmful_regenerated"] == 10
  assert last["questions_kept"] == 10 and last["questions_dropped"] == 0
  assert last["harmful_questions_in_training"] == 1.0
  assert last["regenerated_index"] == list(range(10, 20))
  assert last["regenerated_responses"] == 160
  assert set(res.generations) == set(range(10, 20))
  answers = [t for texts in res.generations.values() for t in texts]
  assert sum(a == "d" for a in answers) <= 8  # the harmful answer is (almost) gone
  assert len(res.steps) == BASE.num_steps and np.isfinite([s["loss"] for s in res.steps]).all()


def test_random_dynamic_choice_changes_each_round_and_is_seeded():
  rcfg = dataclasses.replace(BASE, selection="random", share=0.3, dynamic=True, warmup_steps=0,
                             regen_every=2, num_steps=6)
  a, b = run(rcfg), run(rcfg)
  chosen = [r["regenerated_index"] for r in a.rounds]
  assert [r["regenerated_index"] for r in b.rounds] == chosen
  assert all(len(c) == 6 for c in chosen) and len({tuple(c) for c in chosen}) > 1
  fixed = run(dataclasses.replace(rcfg, dynamic=False))
  assert len({tuple(r["regenerated_index"]) for r in fixed.rounds}) == 1


def test_self_normalized_weights_are_one_when_reference_is_generator():
  rcfg = dataclasses.replace(BASE, weighting="self_normalized", warmup_steps=0, num_steps=1)
  params = llama.init_params(CFG, jax.random.key(0))
  res = run(rcfg, reference=params)  # the generator at round 0 is the same initial model
  r = res.rounds[0]
  assert abs(r["response_weight_min"] - 1) < 1e-3 and abs(r["response_weight_max"] - 1) < 1e-3
  other = llama.init_params(CFG, jax.random.key(5))
  r = run(rcfg, reference=other).rounds[0]
  assert r["response_weight_max"] > 1.05 and r["response_weight_ess"] < 1.0
  with pytest.raises(ValueError, match="needs reference"):
    run(rcfg)


def test_keep_mask_counts_dropped_questions():
  rcfg = dataclasses.replace(BASE, share=0.25, warmup_steps=0, num_steps=1)
  keep = np.ones(20, bool)
  keep[[0, 1, 15]] = False  # BDS rejected two good pairs and a harmful one
  res = run(rcfg, keep=keep)
  r = res.rounds[0]
  # share 0.25 regenerates the 5 lowest-weighted pairs: indices 10..14.
  assert r["regenerated_index"] == [10, 11, 12, 13, 14]
  assert r["questions_regenerated"] == 5
  assert r["questions_kept"] == 20 - 5 - 3
  assert r["questions_dropped"] == 3
  assert r["harmful_kept_offline"] == 4  # 16..19
  assert r["harmful_questions_in_training"] == 0.9
  # Records in another order with other indices: reports and generations use record indices.
  shuffled = [dict(r, index=r["index"] + 100) for r in RECORDS[::-1]]
  params = llama.init_params(CFG, jax.random.key(0))
  trainable, frozen = lora_lib.split(SPEC, CFG, params)
  weights = np.concatenate([np.zeros(100, np.float32), BDS_WEIGHTS])
  res2 = refine.refine(shuffled, TOK, CFG, SPEC, trainable, frozen, OPT, rcfg, jax.random.key(1),
                       weights=weights)
  assert sorted(res2.generations) == sorted(res2.rounds[0]["regenerated_index"])
  assert all(110 <= i < 120 for i in res2.generations)


def test_prompts_that_fill_the_row_are_skipped_and_counted():
  rcfg = dataclasses.replace(BASE, share=0.25, warmup_steps=0, num_steps=2)
  long_q = "x" * 40  # ByteTokenizer: one token per byte, so the prompt alone exceeds max_len=24
  records = [dict(r, question=long_q) if r["index"] in (3, 12) else r for r in RECORDS]
  params = llama.init_params(CFG, jax.random.key(0))
  trainable, frozen = lora_lib.split(SPEC, CFG, params)
  res = refine.refine(records, TOK, CFG, SPEC, trainable, frozen, OPT, rcfg, jax.random.key(1),
                      weights=BDS_WEIGHTS)
  r = res.rounds[0]
  assert r["questions_skipped_prompt_too_long"] == 2
  # A quarter of the 18 pairs that fit (round(4.5) = 4), the lowest-weighted: 10, 11, 13, 14.
  assert r["regenerated_index"] == [10, 11, 13, 14]
  assert r["questions_kept"] == 20 - 2 - 4 and r["questions_dropped"] == 2
  assert 3 not in res.generations and 12 not in res.generations


def test_choose_questions():
  rng = np.random.default_rng(0)
  scores = np.asarray([0.3, 0.1, 0.1, 2.0, 0.05])
  np.testing.assert_array_equal(refine.choose_questions(scores, 0.6, "lowest_weight", rng), [1, 2, 4])
  a = refine.choose_questions(scores, 0.4, "random", np.random.default_rng(1))
  b = refine.choose_questions(scores, 0.4, "random", np.random.default_rng(1))
  np.testing.assert_array_equal(a, b)
  assert len(a) == 2 and len(set(a)) == 2
  assert len(refine.choose_questions(scores, 0.0, "random", rng)) == 0
  with pytest.raises(ValueError, match="unknown selection"):
    refine.choose_questions(scores, 0.5, "best", rng)


def test_build_batch_masks_and_aligns_generator_log_probs():
  ex_off = refine.Example([1, 2, 3], [4, 5], None, 0.7, 3)
  ex_gen = refine.Example([1, 2], [6, 7, 8, 9], [-0.1, -0.2, -0.3, -0.4], 1.0, 8)
  batch, w = refine.build_batch([ex_off, ex_gen], max_len=4)
  np.testing.assert_array_equal(batch["tokens"], [[1, 2, 3, 4], [1, 2, 6, 7]])
  np.testing.assert_array_equal(batch["targets"], [[2, 3, 4, 5], [2, 6, 7, 8]])  # truncated
  np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1], [0, 1, 1, 1]])
  np.testing.assert_allclose(batch["gen_log_probs"], [[0, 0, 0, 0], [0, -0.1, -0.2, -0.3]])
  np.testing.assert_array_equal(batch["is_generated"], [0, 1])
  np.testing.assert_array_equal(batch["index"], [3, 8])
  np.testing.assert_allclose(w, [0.7, 1.0])


def test_bad_records_name_row_and_field():
  with pytest.raises(ValueError, match="record 1: missing field 'response'"):
    refine.as_pair({"question": "q", "label": "x", "index": 1}, 1)
  with pytest.raises(ValueError, match="record 2: field 'index' must be int"):
    refine.as_pair({"question": "q", "response": "r", "label": "x", "index": "7"}, 2)
  with pytest.raises(ValueError, match="record 0: field 'question' is empty"):
    refine.as_pair({"question": "  ", "response": "r", "index": 0}, 0)
  with pytest.raises(ValueError, match="RefineConfig.weighting"):
    refine.RefineConfig(weighting="magic")
