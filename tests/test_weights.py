"""Weight parametrizations, their gradients, selection rules and weight statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax.core import weights as wts


def test_parametrizations_start_uniform_and_keep_their_ranges():
  z = wts.init_logits(7)
  np.testing.assert_allclose(wts.softmax_n(z), np.ones(7), rtol=1e-6)
  np.testing.assert_allclose(wts.sigmoid2(z), np.ones(7), rtol=1e-6)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=50) * 3, jnp.float32)
  np.testing.assert_allclose(jnp.sum(wts.softmax_n(logits)), 50.0, rtol=1e-5)
  p = wts.sigmoid2(logits)
  assert float(jnp.min(p)) > 0 and float(jnp.max(p)) < 2
  with pytest.raises(ValueError, match="unknown weight parametrization"):
    wts.weight_fn("softmax")


def test_softmax_n_gradient_matches_closed_form():
  """For L = sum_i c_i p_i with p = N softmax(omega): dL/d omega_j = N q_j (c_j - sum_i q_i c_i)."""
  rng = np.random.default_rng(1)
  omega = jnp.asarray(rng.normal(size=9), jnp.float32)
  c = jnp.asarray(rng.normal(size=9), jnp.float32)
  grad = jax.grad(lambda w: jnp.sum(c * wts.softmax_n(w)))(omega)
  q = np.asarray(jax.nn.softmax(omega))
  expected = 9 * q * (np.asarray(c) - q @ np.asarray(c))
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # The gradient is orthogonal to a common shift of the logits (softmax is shift-invariant).
  assert abs(float(jnp.sum(grad))) < 1e-5


def test_sigmoid2_gradient_matches_closed_form():
  omega = jnp.asarray([-1.0, 0.0, 2.0], jnp.float32)
  c = jnp.asarray([0.5, -1.0, 3.0], jnp.float32)
  grad = jax.grad(lambda w: jnp.sum(c * wts.sigmoid2(w)))(omega)
  s = 1 / (1 + np.exp(-np.asarray(omega)))
  np.testing.assert_allclose(grad, 2 * s * (1 - s) * np.asarray(c), rtol=1e-6)


def test_gather_weights_padding_and_scatter_add():
  logits = jnp.asarray([0.1, -0.2, 0.3, 0.0], jnp.float32)
  index = jnp.asarray([2, -1, 2, 0])
  p = wts.sigmoid2(logits)
  w = wts.gather_weights(p, index)
  np.testing.assert_allclose(w, [p[2], 0.0, p[2], p[0]], rtol=1e-6)
  grad = jax.grad(lambda lg: jnp.sum(wts.gather_weights(wts.sigmoid2(lg), index)))(logits)
  s = 1 / (1 + np.exp(-np.asarray(logits)))
  ds = 2 * s * (1 - s)
  np.testing.assert_allclose(grad, [ds[0], 0.0, 2 * ds[2], 0.0], rtol=1e-6)  # row 2 seen twice


def test_logits_for_weights_inverts_both_parametrizations():
  p = jnp.asarray([0.5, 1.5, 1.0, 1.0], jnp.float32)
  np.testing.assert_allclose(wts.softmax_n(wts.logits_for_weights(p, "softmax_n")), p, rtol=1e-5)
  np.testing.assert_allclose(wts.sigmoid2(wts.logits_for_weights(p, "sigmoid2")), p, rtol=1e-5)


@pytest.mark.parametrize("n,fraction,count", [(10, 0.8, 8), (7, 0.5, 4), (5, 0.1, 1), (3, 0.0, 0),
                                              (4, 1.0, 4), (240, 0.8, 192)])
def test_top_p_keeps_exact_count(n, fraction, count):
  assert wts.top_p_count(n, fraction) == count
  rng = np.random.default_rng(n)
  for p in (rng.random(n), np.ones(n), np.repeat([0.5, 2.0], [n // 2, n - n // 2])):
    keep = wts.top_p(p, fraction)
    assert keep.sum() == count
    if 0 < count < n:  # everything kept weighs at least as much as everything dropped
      assert p[keep].min() >= p[~keep].max()


def test_top_p_breaks_ties_by_pool_order():
  keep = wts.top_p(np.array([1.0, 2.0, 1.0, 1.0, 0.5]), 0.6)
  np.testing.assert_array_equal(keep, [True, True, True, False, False])
  with pytest.raises(ValueError, match="fraction"):
    wts.top_p(np.ones(3), 1.5)


def test_threshold_and_soft_rules():
  p = np.array([0.2, 1.0, 1.7, 0.999, 3.0])
  sel = wts.select_examples(p, "threshold")
  np.testing.assert_array_equal(sel.keep, [False, True, True, False, True])
  np.testing.assert_array_equal(sel.train_weights, [0, 1, 1, 0, 1])
  assert wts.select_examples(p, "threshold", tau=0.5).keep.sum() == 4
  soft = wts.select_examples(p, "soft")
  assert soft.keep.all()
  np.testing.assert_allclose(soft.train_weights, p, rtol=1e-6)
  top = wts.select_examples(p, "top_p", fraction=0.4)
  np.testing.assert_array_equal(top.keep, [False, False, True, False, True])
  with pytest.raises(ValueError, match="unknown selection rule"):
    wts.select_examples(p, "best")


def test_entropy_and_effective_sample_size():
  n = 16
  uniform = jnp.ones(n)
  assert float(wts.entropy(uniform)) == pytest.approx(math.log(n), rel=1e-6)
  assert float(wts.effective_sample_size(uniform)) == pytest.approx(n, rel=1e-6)
  one_hot = jnp.zeros(n).at[3].set(n)
  assert float(wts.entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)
  assert float(wts.effective_sample_size(one_hot)) == pytest.approx(1.0, rel=1e-6)
  half = jnp.concatenate([jnp.zeros(n // 2), 2 * jnp.ones(n // 2)])  # half the pool, equal weights
  assert float(wts.effective_sample_size(half)) == pytest.approx(n / 2, rel=1e-6)
  assert float(wts.entropy(half)) == pytest.approx(math.log(n / 2), rel=1e-6)


def test_mass_per_source_and_stats():
  p = jnp.asarray([2.0, 1.0, 0.5, 0.5, 0.0, 2.0], jnp.float32)
  src = jnp.asarray([0, 0, 1, 1, 2, 0])
  share, mean = wts.mass_per_source(p, src, 3)
  np.testing.assert_allclose(share, [5 / 6, 1 / 6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(mean, [5 / 3, 0.5, 0.0], rtol=1e-6)
  stats = wts.weight_stats(p, src, ["good", "bad", "other"])
  assert stats["mass/good"] == pytest.approx(5 / 6, rel=1e-6)
  assert stats["mean_p/bad"] == pytest.approx(0.5, rel=1e-6)
  assert stats["above_uniform"] == pytest.approx(0.5)
  assert stats["ess"] == pytest.approx(36 / 9.5, rel=1e-6)
  assert stats["p_max"] == 2.0 and stats["p_min"] == 0.0
