"""Importance weights of regenerated responses (bilevel_jax.core.bmo)."""

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax import sampling
from bilevel_jax.core import bmo, sft
from bilevel_jax.model import llama


def test_clip_and_floor_hold():
  cur = jnp.asarray([[0.0, -1.0, -29.0, -0.5, -2.0]])
  gen = jnp.asarray([[-5.0, -1.0, -100.0, -0.5, -1.0]])
  w = np.asarray(bmo.token_importance_weights(cur, gen))
  # exp(5) > 10 -> clipped; equal -> 1; gen floored at -30 -> exp(1), not exp(71); exp(-1).
  np.testing.assert_allclose(w, [[10.0, 1.0, np.e, 1.0, np.exp(-1.0)]], rtol=1e-6)
  w = np.asarray(bmo.token_importance_weights(cur, gen, clip=2.0, mask=jnp.asarray([[1, 1, 1, 0, 1]])))
  np.testing.assert_allclose(w, [[2.0, 1.0, 2.0, 0.0, np.exp(-1.0)]], rtol=1e-6)
  huge = bmo.token_importance_weights(jnp.asarray([[0.0]]), jnp.asarray([[-1e30]]))
  assert np.isfinite(huge).all() and float(huge[0, 0]) == 10.0


def test_no_gradient_flows_through_the_weight():
  """On a categorical policy the gradient is exactly -w (e_y - pi), with w treated as a constant."""
  gen_logits = jnp.asarray([0.3, -0.2, 1.0, 0.0])
  theta = jnp.asarray([0.5, 0.1, 0.2, -0.4])
  y = 2

  def loss(th):
    logits = th[None, None, :]
    return bmo.importance_weighted_nll(
        logits, jnp.asarray([[y]]), jnp.ones((1, 1)),
        jax.nn.log_softmax(gen_logits)[None, y:y + 1], jnp.ones((1,)))[0]

  pi = jax.nn.softmax(theta)
  w = pi[y] / jax.nn.softmax(gen_logits)[y]
  expected = -w * (jax.nn.one_hot(y, 4) - pi)
  np.testing.assert_allclose(jax.grad(loss)(theta), expected, rtol=1e-5, atol=1e-7)
  # A weight that carried its gradient would give -w(e_y - pi) - w log(pi_y)(e_y - pi) instead.
  assert not np.allclose(expected * (1 + jnp.log(pi[y])), expected, atol=1e-3)


def test_weighted_expectation_equals_on_policy_expectation():
  """E_{y~pi_gen}[w(y) f(y)] == E_{y~pi_theta}[f(y)] when floor and clip are inactive."""
  gen = jax.nn.log_softmax(jnp.asarray([0.2, 1.0, -0.3, 0.0, 0.5]))
  cur = jax.nn.log_softmax(jnp.asarray([0.9, 0.1, 0.4, -0.6, 0.2]))
  f = jnp.asarray([3.0, -1.0, 0.5, 2.0, 7.0])
  w = bmo.token_importance_weights(cur[None], gen[None])[0]
  np.testing.assert_allclose(jnp.sum(jnp.exp(gen) * w * f), jnp.sum(jnp.exp(cur) * f), rtol=1e-5)


def test_weight_is_one_under_the_generator_and_loss_is_plain_nll():
  """Responses sampled by the tiny model, rescored by the same params: every weight is 1."""
  cfg = llama.tiny_config(tie_embeddings=False)
  params = llama.init_params(cfg, jax.random.key(0))
  prompts = [[3, 4, 5, 6], [7, 8]]
  scfg = sampling.SamplerConfig(max_new_tokens=5, temperature=1.0, prompt_buckets=(8,),
                                batch_buckets=(2,))
  out = sampling.generate(params, cfg, scfg, prompts, jax.random.key(1))
  # Right-padded training batch: prompt + response, targets shifted by one.
  T = 12
  tokens = np.zeros((2, T), np.int32)
  targets = np.zeros((2, T), np.int32)
  mask = np.zeros((2, T), np.float32)
  gen_lp = np.zeros((2, T), np.float32)
  for r, p in enumerate(prompts):
    resp = sampling.response_tokens(out, r)
    seq = p + resp
    tokens[r, :len(seq) - 1] = seq[:-1]
    targets[r, :len(seq) - 1] = seq[1:]
    mask[r, len(p) - 1:len(seq) - 1] = 1.0
    gen_lp[r, len(p) - 1:len(seq) - 1] = out.log_probs[r, :len(resp)]
  # Right padding after the sequence cannot change earlier (causal) logits.
  logits, _ = llama.apply(params, cfg, jnp.asarray(tokens))
  cur = sft.token_log_probs(logits, jnp.asarray(targets))
  w = bmo.token_importance_weights(cur, jnp.asarray(gen_lp), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(w)[mask > 0], 1.0, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(w)[mask == 0], 0.0)
  iw = bmo.importance_weighted_nll(logits, jnp.asarray(targets), jnp.asarray(mask),
                                   jnp.asarray(gen_lp), jnp.ones((2,)))
  plain = sft.per_example_nll(logits, jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(iw, plain, rtol=1e-4)
  # Offline rows ignore generator log-probs entirely.
  off = bmo.importance_weighted_nll(logits, jnp.asarray(targets), jnp.asarray(mask),
                                    jnp.full((2, T), -5.0), jnp.zeros((2,)))
  np.testing.assert_allclose(off, plain, rtol=1e-6)


def test_self_normalized_weights_average_one_per_question():
  log_ratio = jnp.asarray([0.0, np.log(3.0), 5.0, 1000.0, 1001.0, -2.0])
  group = jnp.asarray([0, 0, 1, 2, 2, 1])
  valid = jnp.asarray([1, 1, 1, 1, 1, 0])
  w = np.asarray(bmo.self_normalized_response_weights(log_ratio, group, 3, valid))
  np.testing.assert_allclose(w[:2], [0.5, 1.5], rtol=1e-6)  # 2 * (1, 3) / 4
  np.testing.assert_allclose(w[2], 1.0, rtol=1e-6)  # a lone response keeps weight 1
  np.testing.assert_allclose(w[3:5], 2 * np.array([1, np.e]) / (1 + np.e), rtol=1e-5)  # no overflow
  assert w[5] == 0.0
  g = jax.grad(lambda r: jnp.sum(bmo.self_normalized_response_weights(r, group, 3) * r))(log_ratio)
  np.testing.assert_allclose(g, bmo.self_normalized_response_weights(log_ratio, group, 3), rtol=1e-6)


def test_response_log_ratio_sum_and_mean():
  ref = jnp.asarray([[-1.0, -2.0, -3.0]])
  gen = jnp.asarray([[-2.0, -2.0, -9.0]])
  mask = jnp.asarray([[1.0, 1.0, 0.0]])
  assert float(bmo.response_log_ratio(ref, gen, mask, length_normalize=False)[0]) == 1.0
  assert float(bmo.response_log_ratio(ref, gen, mask)[0]) == 0.5
