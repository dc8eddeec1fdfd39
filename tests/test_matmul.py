"""The projection matmul: the f32 rule and the bf16 primitive whose backward stays in bf16.

The bf16 checks use small integers, whose products and sums are exact in f32 and in bf16 (|values|
<= 3, k = 16: every sum is an integer of at most 144, which bf16's 8-bit significand holds), so
each derivative is compared for exact equality with its closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax.model import matmul as mm

BF16 = jnp.bfloat16


def _ints(seed, shape, lo=-3, hi=4):
  return np.random.default_rng(seed).integers(lo, hi, size=shape).astype(np.float32)


@pytest.fixture
def xw():
  return _ints(0, (2, 5, 16)), _ints(1, (16, 6))


def test_wide_matmul_has_the_derivatives_of_x_at_w():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(3, 4, 5)), rng.normal(size=(5, 7))
    dx, dw = rng.normal(size=x.shape), rng.normal(size=w.shape)
    ct = rng.normal(size=(3, 4, 7))
    for f in (mm.matmul_wide, mm.matmul):
      y, t = jax.jvp(f, (x, w), (dx, dw))
      np.testing.assert_allclose(y, x @ w, rtol=1e-12)
      np.testing.assert_allclose(t, dx @ w + x @ dw, rtol=1e-12)
      gx, gw = jax.vjp(f, x, w)[1](ct)
      np.testing.assert_allclose(gx, ct @ w.T, rtol=1e-12)
      np.testing.assert_allclose(gw, np.einsum("btk,btn->kn", x, ct), rtol=1e-12)


def test_lowp_dot_is_the_f32_product_of_the_bf16_operands(xw):
  x, w = xw
  y = mm.lowp_dot(jnp.asarray(x, BF16), jnp.asarray(w, BF16))
  assert y.dtype == jnp.float32 and y.shape == (2, 5, 6)
  np.testing.assert_array_equal(y, x @ w)
  y16 = mm.matmul(jnp.asarray(x, BF16), jnp.asarray(w))  # w cast to x's dtype
  assert y16.dtype == BF16
  np.testing.assert_array_equal(y16.astype(jnp.float32), x @ w)


def test_lowp_dot_rejects_mixed_or_wide_operands(xw):
  x, w = xw
  with pytest.raises(TypeError, match="lowp_dot takes two"):
    mm.lowp_dot(jnp.asarray(x, BF16), jnp.asarray(w))
  with pytest.raises(TypeError, match="lowp_dot takes two"):
    mm.lowp_dot(jnp.asarray(x), jnp.asarray(w))


def test_lowp_dot_reverse_mode_is_exact_and_rounds_the_cotangent_to_bf16(xw):
  x, w = xw
  c = _ints(3, (2, 5, 6))
  gx, gw = jax.grad(lambda x, w: jnp.sum(c * mm.lowp_dot(x, w)), (0, 1))(
      jnp.asarray(x, BF16), jnp.asarray(w, BF16))
  assert gx.dtype == gw.dtype == BF16
  np.testing.assert_array_equal(gx.astype(jnp.float32), c @ w.T)
  np.testing.assert_array_equal(gw.astype(jnp.float32), np.einsum("btk,btn->kn", x, c))
  # 1 + 2^-8 is not a bf16 number: the backward dots see it rounded to 1, as autocast does. Not
  # rounded, the ten rows of dw would sum to 10.039, which bf16 stores as 10.0625.
  ones = jnp.ones((2, 5, 16), BF16)
  gw1 = jax.grad(lambda w: jnp.sum((1 + 2.0**-8) * mm.lowp_dot(ones, w)))(jnp.asarray(w, BF16))
  np.testing.assert_array_equal(gw1.astype(jnp.float32), np.full(w.shape, 10.0))


def test_lowp_dot_forward_mode_and_hessian_vector_product(xw):
  x, w = xw
  xb, wb = jnp.asarray(x, BF16), jnp.asarray(w, BF16)
  dx, dw = _ints(4, x.shape, -1, 2), _ints(5, w.shape, -1, 2)
  _, t = jax.jvp(mm.lowp_dot, (xb, wb), (jnp.asarray(dx, BF16), jnp.asarray(dw, BF16)))
  np.testing.assert_array_equal(t, dx @ w + x @ dw)
  # forward over reverse, as the estimators' Hessian-vector products: L = sum(y^2) / 2 in w.
  x2 = x.reshape(-1, 16)
  loss = lambda w: 0.5 * jnp.sum(jnp.square(mm.lowp_dot(jnp.asarray(x2, BF16), w)))
  v = _ints(6, w.shape, -1, 2)
  _, hv = jax.jvp(jax.grad(loss), (wb,), (jnp.asarray(v, BF16),))
  np.testing.assert_array_equal(hv.astype(jnp.float32), x2.T @ (x2 @ v))


def test_lowp_dot_under_vmap(xw):
  x, w = xw
  xb, wb = jnp.asarray(x, BF16), jnp.asarray(w, BF16)
  np.testing.assert_array_equal(jax.vmap(mm.lowp_dot, (1, None))(xb, wb),
                                np.moveaxis(x @ w, 1, 0))
  ws = jnp.stack([wb, 2 * wb])
  np.testing.assert_array_equal(jax.vmap(mm.lowp_dot, (None, 0))(xb, ws),
                                np.stack([x @ w, x @ (2 * w)]))
  per_example = jax.vmap(jax.grad(lambda xi, w: jnp.sum(mm.lowp_dot(xi, w))), (0, None))(xb, wb)
  np.testing.assert_array_equal(per_example.astype(jnp.float32), np.ones((2, 5, 6)) @ w.T)


def _dot_computation_operands(hlo: str) -> list[str]:
  """The parameter list of every HLO computation that contains a dot."""
  found, head = [], ""
  for line in hlo.splitlines():
    if line.startswith("%") and line.rstrip().endswith("{"):
      head = line.split(" -> ")[0]
    elif " dot(" in line:
      found.append(head)
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot lowering")
def test_bf16_backward_runs_every_projection_dot_in_bf16_on_cpu():
  """At the SFT step's shapes all three dots (y, dx, dw) take bf16 operands: none is converted to
  f32 first, which XLA:CPU does to every bf16 dot it cannot run on its bf16 kernel."""
  x = jnp.ones((4, 128, 576), BF16)
  w = jnp.ones((576, 1536), jnp.float32)
  step = jax.jit(jax.grad(lambda w, x: jnp.sum(mm.matmul(x, w).astype(jnp.float32) ** 2), (0, 1)))
  hlo = step.lower(w, x).compile().as_text()
  dots = _dot_computation_operands(hlo)
  assert len(dots) == 3, dots
  for operands in dots:
    assert "f32[" not in operands and operands.count("bf16[") == 2, operands
  gw, gx = step(w, x)  # and it runs (an unsupported bf16 dot fails at run time)
  np.testing.assert_array_equal(gx.astype(jnp.float32), 2 * 576 * 1536 * np.ones(x.shape))
  np.testing.assert_array_equal(gw, 2 * 576 * 512 * np.ones(w.shape))
