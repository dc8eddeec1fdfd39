"""Tests of the jit sampler against the uncached forward pass of a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import sampling
from bilevel_jax.model import llama
from bilevel_jax.model import lora as lora_lib

# Untied embeddings: the tied tiny random model just repeats its input token with probability ~1,
# which would make greedy and sampled outputs equal and the tests weak.
CFG = llama.tiny_config(tie_embeddings=False)
PARAMS = llama.init_params(CFG, jax.random.key(0))
PROMPTS = [[5, 17, 3, 44, 9], [12, 8], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
REF_LEN = 32  # the reference forward always runs on this length: one compilation


@jax.jit
def _ref_forward(params, tokens):
  return llama.apply(params, CFG, tokens)[0]


def full_logits(params, prompt_and_answer):
  """Uncached forward of one unpadded sequence (right-padded: causal, so harmless); [T, V]."""
  n = len(prompt_and_answer)
  toks = np.zeros((1, REF_LEN), np.int32)
  toks[0, :n] = prompt_and_answer
  return np.asarray(_ref_forward(params, jnp.asarray(toks))[0, :n])


def greedy_cfg(**kw):
  # Fixed buckets: every call with up to 4 prompts of up to 16 tokens reuses one compiled shape.
  return sampling.SamplerConfig(**{"max_new_tokens": 6, "greedy": True, "pad_id": 0,
                                   "prompt_buckets": (16,), "batch_buckets": (4,), **kw})


# ----------------------------------------------------------------------------- helpers


def test_bucket_size_powers_of_two_and_list():
  assert sampling.bucket_size(5, (), 8) == 8
  assert sampling.bucket_size(9, (), 8) == 16
  assert sampling.bucket_size(16, (), 8) == 16
  assert sampling.bucket_size(3) == 4
  assert sampling.bucket_size(1) == 1
  assert sampling.bucket_size(20, (16, 48, 128)) == 48
  with pytest.raises(ValueError, match="largest configured bucket 128"):
    sampling.bucket_size(129, (16, 48, 128))


def test_left_pad_and_prompt_layout():
  toks, lens = sampling.left_pad([[1, 2, 3], [7]], length=4, batch=3, pad_id=0)
  np.testing.assert_array_equal(toks, [[0, 1, 2, 3], [0, 0, 0, 7], [0, 0, 0, 0]])
  np.testing.assert_array_equal(lens, [3, 1, 0])
  seg, pos = sampling.prompt_layout(jnp.asarray(lens), 4)
  np.testing.assert_array_equal(seg, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(pos, [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
  with pytest.raises(ValueError, match="prompt 0 has 3 tokens"):
    sampling.left_pad([[1, 2, 3]], length=2, batch=1, pad_id=0)


def test_top_k_filter_keeps_k_largest():
  logits = jnp.asarray([[0.1, 2.0, -1.0, 3.0, 0.5]])
  out = np.asarray(sampling.top_k_filter(logits, 2))
  np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, True, False]])
  np.testing.assert_array_equal(out[np.isfinite(out)], [2.0, 3.0])
  assert sampling.top_k_filter(logits, 0) is logits  # off


def test_top_p_filter_keeps_smallest_nucleus():
  probs = np.array([[0.05, 0.5, 0.1, 0.3, 0.05]])
  logits = jnp.log(jnp.asarray(probs))
  # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7: keep {1, 3}.
  keep = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(keep, [[False, True, False, True, False]])
  # A tiny p still keeps the most likely token.
  keep = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.01)))
  np.testing.assert_array_equal(keep, [[False, True, False, False, False]])
  # Mass before 0.1 is 0.8 < 0.85, before the 0.05s it is 0.9: keep three.
  keep = np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.85)))
  np.testing.assert_array_equal(keep, [[False, True, True, True, False]])


def test_stop_hit_tokens_and_sequences():
  scfg = sampling.SamplerConfig(stop_ids=(9,), stop_sequences=((4, 5), (1, 2, 3)))
  margin = sampling.stop_margin(scfg)
  assert margin == 2
  hist = jnp.asarray([[-1, -1, 4, 5, 0], [-1, -1, 1, 2, 3], [-1, -1, 7, 9, 0], [-1, -1, 5, 4, 0]])
  last_tokens = hist[:, 3]
  hit = sampling.stop_hit(hist, jnp.asarray(3), last_tokens, scfg)
  np.testing.assert_array_equal(hit, [True, False, True, False])
  hit = sampling.stop_hit(hist, jnp.asarray(4), hist[:, 4], scfg)
  np.testing.assert_array_equal(hit, [False, True, False, False])


def test_sampler_config_rejects_bad_values():
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplerConfig(temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplerConfig(top_p=0.0)
  with pytest.raises(ValueError, match="stop_sequences"):
    sampling.SamplerConfig(stop_sequences=((),))
  hash(sampling.SamplerConfig(stop_sequences=((1, 2),)))  # static jit argument


# ----------------------------------------------------------------------------- against the model


def test_greedy_equals_argmax_of_full_forward_step_by_step():
  out = sampling.generate(PARAMS, CFG, greedy_cfg(), PROMPTS, jax.random.key(1))
  for row, prompt in enumerate(PROMPTS):
    answer = sampling.response_tokens(out, row)
    assert len(answer) == 6 and not out.stopped[row]
    for t, tok in enumerate(answer):
      logits = full_logits(PARAMS, prompt + answer[:t])[-1]
      assert tok == int(np.argmax(logits)), (row, t)
      logp = jax.nn.log_softmax(logits)[tok]
      np.testing.assert_allclose(out.log_probs[row, t], logp, atol=2e-5)
    np.testing.assert_array_equal(out.sample_log_probs[row], 0.0)  # greedy is deterministic


@pytest.mark.parametrize("per_layer", [False, True])
def test_cached_logits_equal_uncached_left_padded(per_layer):
  """Prefill + decode through the cache give the logits of one full forward per row.

  ``per_layer`` is the sampler's layout (unstacked params, per-layer cache); False the stacked one.
  """
  tokens, lengths = sampling.left_pad(PROMPTS, 16, 4, 0)
  seg, pos = sampling.prompt_layout(jnp.asarray(lengths), 16)
  cache = llama.init_cache(CFG, 4, 20, per_layer=per_layer)
  params = ({**PARAMS, "layers": llama.unstack_layers(PARAMS["layers"])} if per_layer
            else PARAMS)
  forward = jax.jit(sampling.forward_last, static_argnums=(2, 3))
  logits, cache = forward(params, None, CFG, 1.0, jnp.asarray(tokens), pos, seg, cache)
  next_tokens = np.array([[11, 23, 35], [2, 4, 6], [90, 1, 50], [0, 0, 0]], np.int32)
  step_logits = [np.asarray(logits)]
  for t in range(3):
    logits, cache = forward(
        params, None, CFG, 1.0, jnp.asarray(next_tokens[:, t:t + 1]),
        jnp.asarray(lengths + t)[:, None], jnp.ones((4, 1), jnp.int32), cache)
    step_logits.append(np.asarray(logits))
  for row, prompt in enumerate(PROMPTS):
    ref = full_logits(PARAMS, prompt + list(next_tokens[row]))
    for t in range(4):
      np.testing.assert_allclose(step_logits[t][row], ref[len(prompt) - 1 + t], atol=2e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone():
  scfg = greedy_cfg()
  batched = sampling.generate(PARAMS, CFG, scfg, PROMPTS, jax.random.key(2))
  for row, prompt in enumerate(PROMPTS):
    alone = sampling.generate(PARAMS, CFG, scfg, [prompt], jax.random.key(2))
    np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])
    np.testing.assert_allclose(batched.log_probs[row], alone.log_probs[0], atol=2e-5)


def test_stop_token_ends_row_and_nothing_after_counts():
  free = sampling.generate(PARAMS, CFG, greedy_cfg(), PROMPTS, jax.random.key(3))
  stop = int(free.tokens[0, 2])
  first = [list(free.tokens[r]).index(stop) if stop in free.tokens[r] else None for r in range(3)]
  out = sampling.generate(PARAMS, CFG, greedy_cfg(stop_ids=(stop,)), PROMPTS, jax.random.key(3))
  for row in range(3):
    n = 6 if first[row] is None else first[row] + 1
    assert out.lengths[row] == n
    assert bool(out.stopped[row]) == (first[row] is not None)
    np.testing.assert_array_equal(out.tokens[row, :n], free.tokens[row, :n])
    np.testing.assert_array_equal(out.tokens[row, n:], 0)  # pad_id
    np.testing.assert_array_equal(out.log_probs[row, n:], 0.0)
    np.testing.assert_allclose(out.log_probs[row, :n], free.log_probs[row, :n], atol=1e-6)
  assert out.lengths[0] == 3 and out.stopped[0]


def test_stop_sequence_ends_row():
  free = sampling.generate(PARAMS, CFG, greedy_cfg(), PROMPTS, jax.random.key(4))
  seq = (int(free.tokens[1, 2]), int(free.tokens[1, 3]))
  out = sampling.generate(PARAMS, CFG, greedy_cfg(stop_sequences=(seq,)), PROMPTS,
                          jax.random.key(4))
  row_tokens = list(free.tokens[1])
  end = min(i + 2 for i in range(5) if tuple(row_tokens[i:i + 2]) == seq)
  assert end <= 4 and out.lengths[1] == end and out.stopped[1]
  np.testing.assert_array_equal(out.tokens[1, :end], free.tokens[1, :end])
  np.testing.assert_array_equal(out.tokens[1, end:], 0)


def test_sampling_is_deterministic_for_a_key_and_varies_across_keys():
  scfg = greedy_cfg(max_new_tokens=8, greedy=False, temperature=1.5)
  a = sampling.generate(PARAMS, CFG, scfg, PROMPTS, jax.random.key(5))
  b = sampling.generate(PARAMS, CFG, scfg, PROMPTS, jax.random.key(5))
  c = sampling.generate(PARAMS, CFG, scfg, PROMPTS, jax.random.key(6))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.log_probs, b.log_probs)
  assert not np.array_equal(a.tokens, c.tokens)
  # Sampled tokens' untempered log-probs match the full forward; the sampling log-probs are those
  # of the tempered distribution.
  answer = sampling.response_tokens(a, 0)
  ref = jax.nn.log_softmax(full_logits(PARAMS, PROMPTS[0] + answer)[len(PROMPTS[0]) - 1:-1], -1)
  np.testing.assert_allclose(a.log_probs[0], ref[np.arange(8), answer], atol=2e-5)
  ref_t = jax.nn.log_softmax(
      full_logits(PARAMS, PROMPTS[0] + answer)[len(PROMPTS[0]) - 1:-1] / 1.5, -1)
  np.testing.assert_allclose(a.sample_log_probs[0], ref_t[np.arange(8), answer], atol=2e-5)


def test_top_k_one_equals_greedy():
  scfg = greedy_cfg(greedy=False, top_k=1)
  out = sampling.generate(PARAMS, CFG, scfg, PROMPTS, jax.random.key(7))
  ref = sampling.generate(PARAMS, CFG, greedy_cfg(), PROMPTS, jax.random.key(7))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.sample_log_probs, 0.0)  # one token kept: probability 1


def test_buckets_limit_compilations_and_chunking():
  scfg = sampling.SamplerConfig(max_new_tokens=3, greedy=True, min_prompt_bucket=8, max_batch=2)
  sampling.sample_padded.clear_cache()
  sampling.generate(PARAMS, CFG, scfg, [[1, 2, 3]], jax.random.key(0))  # P=8, B=1
  sampling.generate(PARAMS, CFG, scfg, [[4, 5, 6, 7, 8, 9]], jax.random.key(0))  # P=8, B=1
  assert sampling.sample_padded._cache_size() == 1
  prompts = PROMPTS[:2] + [[7, 7, 7]]
  out = sampling.generate(PARAMS, CFG, scfg, prompts, jax.random.key(0))  # chunks B=2, B=1
  assert sampling.sample_padded._cache_size() == 2
  assert out.tokens.shape == (3, 3)
  ref = sampling.generate(PARAMS, CFG, greedy_cfg(), prompts, jax.random.key(0))
  np.testing.assert_array_equal(out.tokens, ref.tokens[:, :3])


def test_lora_sampling_equals_merged_weights():
  spec = lora_lib.TrainableSpec(kind="lora", lora_rank=2, lora_alpha=4.0, lora_targets=("wq", "w_up"))
  adapters = lora_lib.init_lora(CFG, spec, jax.random.key(8))
  adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(9), x.shape), adapters)
  merged = jax.tree.map(lambda x: x, PARAMS)
  for name in ("wq", "w_up"):
    ab = adapters["layers"][name]
    merged["layers"][name] = PARAMS["layers"][name] + spec.lora_scale * ab["a"] @ ab["b"]
  trainable, frozen = lora_lib.split(spec, CFG, PARAMS, adapters)
  out = sampling.generate_trainable(spec, trainable, frozen, CFG, greedy_cfg(), PROMPTS,
                                    jax.random.key(0))
  ref = sampling.generate(merged, CFG, greedy_cfg(), PROMPTS, jax.random.key(0))
  base = sampling.generate(PARAMS, CFG, greedy_cfg(), PROMPTS, jax.random.key(0))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.log_probs, ref.log_probs, atol=1e-4)
  assert not np.array_equal(out.tokens, base.tokens)  # the adapter changes the answers


@pytest.mark.slow
def test_real_model_greedy_answer_and_padding_invariance():
  """SmolLM2-135M-Instruct through the sampler: the known answer, and batch == alone."""
  from bilevel_jax.model import load
  cfg, params, tok = load.load_smollm2()
  questions = ["What is the capital of France?", "Name a primary colour. Answer in one word."]
  prompts = [tok.encode_chat(q)[0] for q in questions]
  assert len(prompts[0]) != len(prompts[1])
  scfg = sampling.SamplerConfig(max_new_tokens=16, greedy=True, stop_ids=tok.stop_ids,
                                pad_id=tok.pad_id)
  out = sampling.generate(params, cfg, scfg, prompts, jax.random.key(0))
  answer = tok.decode([t for t in sampling.response_tokens(out, 0) if t not in tok.stop_ids])
  assert "Paris" in answer and out.stopped[0]
  for row, prompt in enumerate(prompts):
    alone = sampling.generate(params, cfg, scfg, [prompt], jax.random.key(0))
    np.testing.assert_array_equal(out.tokens[row], alone.tokens[0])
    np.testing.assert_allclose(out.log_probs[row], alone.log_probs[0], atol=1e-4)
