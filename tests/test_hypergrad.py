"""Hypergradient estimators against finite differences, closed forms and their defining identities.

Exact estimators (``unroll``, ``implicit``) are checked in float64 against central finite differences
and the closed-form ridge hypergradient; approximate ones (``penalty``, ``penalty_vf``, ``one_step``,
``likelihood_ratio``) against the identities that define them, computed here independently.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax.core import hypergrad as hg
from bilevel_jax.core import select as sel
from bilevel_jax.core import sft, weights as wts
from bilevel_jax.model import llama, lora

F64 = jnp.float64
MU = 0.5  # ridge strength


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@functools.partial(jax.jit, static_argnums=(0, 1))
def run(est, problem, state, logits, frozen, batches):
  """One estimator call, jitted (one compile instead of many op-by-op ones)."""
  return est(problem, state, logits, frozen, batches, None)


def stack(batches):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


# ----------------------------------------------------------------------------- ridge problem


def ridge_loss(theta, frozen, batch):
  del frozen
  return 0.5 * (batch["x"] @ theta - batch["y"]) ** 2 + 0.5 * MU * jnp.sum(theta ** 2)


def ridge_data(seed=0, n=8, d=3, m=5, dtype=F64):
  rng = np.random.default_rng(seed)
  x, xv = rng.normal(size=(n, d)), rng.normal(size=(m, d))
  y, yv = rng.normal(size=n), rng.normal(size=m)
  train = {"x": jnp.asarray(x, dtype), "y": jnp.asarray(y, dtype), "index": jnp.arange(n)}
  val = {"x": jnp.asarray(xv, dtype), "y": jnp.asarray(yv, dtype)}
  logits = jnp.asarray(0.5 * rng.normal(size=n), dtype)
  return train, val, logits


def softmax_n_jacobian(logits):
  """d p / d omega for p = N softmax(omega): N (diag(q) - q q^T)."""
  q = np.asarray(jax.nn.softmax(logits))
  return len(q) * (np.diag(q) - np.outer(q, q))


def ridge_closed_form(train, val, logits):
  """theta*(omega) and d f(theta*) / d omega of the ridge problem, by the explicit formulas."""
  x, y = np.asarray(train["x"]), np.asarray(train["y"])
  xv, yv = np.asarray(val["x"]), np.asarray(val["y"])
  n, d = x.shape
  p = np.asarray(wts.softmax_n(logits))
  h = (x.T * p) @ x / n + MU * p.mean() * np.eye(d)
  theta = np.linalg.solve(h, (x.T * p) @ y / n)
  grad_f = xv.T @ (xv @ theta - yv) / len(yv) + MU * theta
  v = np.linalg.solve(h, grad_f)
  grad_l = x * (x @ theta - y)[:, None] + MU * theta[None, :]  # [n, d], grad of each l_i
  dF_dp = -(grad_l @ v) / n
  return theta, softmax_n_jacobian(logits).T @ dF_dp


def central_fd(fn, x, eps=1e-6):
  x = np.asarray(x)
  out = np.zeros_like(x)
  for i in range(x.size):
    e = np.zeros_like(x)
    e[i] = eps
    out[i] = (float(fn(jnp.asarray(x + e))) - float(fn(jnp.asarray(x - e)))) / (2 * eps)
  return out


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def unrolled_objective(problem, params, frozen, train_list, val):
  """f(theta_K(omega)) with a plain Python loop of inner steps: no scan, no remat."""
  def fn(logits):
    th, s = params, problem.inner_optimizer.init(params)
    p = problem.weights(logits)
    for b in train_list:
      th, s, _ = sft.inner_step(problem.loss_fn, problem.inner_optimizer, th, frozen, s, b,
                                wts.gather_weights(p, b["index"]))
    return hg.mean_loss(problem.loss_fn, th, frozen, val)
  return jax.jit(fn)


UNROLL_VARIANTS = [("autodiff", "none")] + [("adjoint", keep) for keep in hg.UNROLL_KEEP]


@pytest.mark.parametrize("backward,keep", UNROLL_VARIANTS)
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_unroll_matches_finite_differences_ridge(x64, inner, backward, keep):
  train, val, logits = ridge_data()
  opt = optax.sgd(0.3) if inner == "sgd" else sft.sgd_or_adam("adam", 0.1)
  problem = hg.Problem(ridge_loss, opt)
  # Three steps on different row subsets (one padding row, one row seen twice).
  idx = [jnp.array([0, 1, 2, 3]), jnp.array([4, 5, 6, -1]), jnp.array([7, 1, 2, 0])]
  train_list = [{"x": train["x"][jnp.maximum(i, 0)], "y": train["y"][jnp.maximum(i, 0)], "index": i}
                for i in idx]
  theta0 = jnp.asarray([0.3, -0.2, 0.1], F64)
  est = hg.Unroll(k=3, backward=backward, keep_linearization=keep)
  grad, state, m = run(est, problem, est.init(problem, theta0), logits, {}, {"train": stack(train_list),
                                                                       "val": val})
  fd = central_fd(unrolled_objective(problem, theta0, {}, train_list, val), logits)
  assert rel_err(grad, fd) <= 1e-4
  assert np.linalg.norm(fd) > 1e-3  # the check is not vacuous
  assert float(m["val_loss"]) == pytest.approx(float(unrolled_objective(
      problem, theta0, {}, train_list, val)(logits)), rel=1e-12)


def numpy_init(shapes, rng, offset=0.0):
  """Random f64 params of the given shapes, drawn with numpy: JAX's op-by-op random init would
  compile every op separately (seconds of a test's budget). Norm weights stay near 1."""
  def one(path, s):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return jnp.asarray(1.0 + 0.1 * rng.normal(size=s.shape), F64)
    fan_in = s.shape[-2] if len(s.shape) >= 2 else 1
    return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(fan_in) + offset, F64)
  return jax.tree_util.tree_map_with_path(one, shapes)


def decoder_setup(kind, seed=0, b=3, t=8, per_layer=False):
  cfg = llama.tiny_config(dtype="float64", n_layers=2)
  rng = np.random.default_rng(seed)
  params = numpy_init(jax.eval_shape(lambda k: llama.init_params(cfg, k), jax.random.key(0)), rng)
  spec = lora.TrainableSpec(kind=kind, lora_rank=2, lora_targets=("wq", "wv", "w_down"),
                            n_layers=1, per_layer=per_layer)
  lora_params = None
  if kind == "lora":
    # Both factors random (B is zero in a fresh adapter) so the adapter matters from the first step.
    lora_params = numpy_init(jax.eval_shape(lambda k: lora.init_lora(cfg, spec, k), jax.random.key(0)),
                             rng, offset=0.05)
  trainable, frozen = lora.split(spec, cfg, params, lora_params)
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(spec, cfg))

  def batch(index):
    tokens = rng.integers(3, cfg.vocab_size, size=(b, t))
    mask = np.zeros((b, t))
    mask[:, 3:] = 1.0  # the first tokens are the prompt
    return {"tokens": jnp.asarray(tokens, jnp.int32),
            "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32),
            "loss_mask": jnp.asarray(mask, F64), "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
            "segment_ids": jnp.ones((b, t), jnp.int32), "index": jnp.asarray(index, jnp.int32)}

  train_list = [batch([0, 1, 2]), batch([3, -1, 1])]
  val = {k: v for k, v in batch([0, 0, 0]).items() if k != "index"}
  return trainable, frozen, loss_fn, train_list, val


def test_unroll_matches_finite_differences_decoder(x64):
  """LoRA on the tiny decoder, Adam inner (the fragile case), K = 2, f64."""
  trainable, frozen, loss_fn, train_list, val = decoder_setup("lora")
  problem = hg.Problem(loss_fn, sft.sgd_or_adam("adam", 0.05))
  logits = jnp.asarray([0.4, -0.3, 0.2, 0.1, -0.5], F64)
  est = hg.Unroll(k=2)
  state = est.init(problem, trainable)
  batches = {"train": stack(train_list), "val": val}
  # One compiled function serves the gradient and, through its val_loss output, the finite
  # differences (the ridge test checks that forward against a plain loop). XLA's backend
  # optimization level 0 halves the compile time of this tiny program and changes no maths.
  step = jax.jit(lambda lg: est(problem, state, lg, frozen, batches, None)).lower(logits).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  grad = step(logits)[0]
  fd = central_fd(lambda lg: step(lg)[2]["val_loss"], logits)
  assert rel_err(grad, fd) <= 1e-4
  assert np.linalg.norm(fd) > 1e-3


def test_implicit_matches_closed_form_ridge(x64):
  train, val, logits = ridge_data(seed=1)
  theta_star, expected = ridge_closed_form(train, val, logits)
  problem = hg.Problem(ridge_loss, optax.sgd(0.1))
  batches = {"train": stack([train]), "val": val}
  for est, tol in [(hg.Implicit(method="cg", iters=3), 1e-8),
                   (hg.Implicit(method="neumann", iters=400, neumann_alpha=0.5), 1e-6)]:
    state = est.init(problem, jnp.asarray(theta_star, F64))
    grad, new_state, m = run(est, problem, state, logits, {}, batches)
    # theta* is a fixed point of the inner step, so the warm start stays at the solution.
    np.testing.assert_allclose(new_state.params, theta_star, atol=1e-12)
    assert rel_err(grad, expected) <= tol, est
    assert float(m["solver_residual"]) < 1e-5


def test_implicit_damping_is_the_damped_solve(x64):
  train, val, logits = ridge_data(seed=2)
  theta_star, _ = ridge_closed_form(train, val, logits)
  problem = hg.Problem(ridge_loss, optax.sgd(0.1))
  est = hg.Implicit(method="cg", iters=3, damping=0.7, inner_steps=0)
  grad, _, _ = run(est, problem, est.init(problem, jnp.asarray(theta_star, F64)), logits, {},
                   {"train": stack([train]), "val": val})
  x, y = np.asarray(train["x"]), np.asarray(train["y"])
  xv, yv = np.asarray(val["x"]), np.asarray(val["y"])
  p = np.asarray(wts.softmax_n(logits))
  n = len(p)
  h = (x.T * p) @ x / n + MU * p.mean() * np.eye(3) + 0.7 * np.eye(3)
  v = np.linalg.solve(h, xv.T @ (xv @ theta_star - yv) / len(yv) + MU * theta_star)
  grad_l = x * (x @ theta_star - y)[:, None] + MU * theta_star[None, :]
  expected = softmax_n_jacobian(logits).T @ (-(grad_l @ v) / n)
  assert rel_err(grad, expected) <= 1e-8


def test_implicit_warm_start_refines_one_solve_across_outer_steps(x64):
  """One CG iteration per outer step: from zero it stays off; warm-started it converges."""
  train, val, logits = ridge_data(seed=3)
  theta_star, expected = ridge_closed_form(train, val, logits)
  problem = hg.Problem(ridge_loss, optax.sgd(0.1))
  batches = {"train": stack([train]), "val": val}
  errors = {}
  for warm in (False, True):
    est = hg.Implicit(method="cg", iters=1, inner_steps=0, warm_start=warm)
    state = est.init(problem, jnp.asarray(theta_star, F64))
    assert ("v" in state.extra) == warm
    step = jax.jit(lambda st: run(est, problem, st, logits, {}, batches))
    for _ in range(40):
      grad, state, m = step(state)
    errors[warm] = rel_err(grad, expected)
  assert errors[True] <= 1e-8
  assert errors[False] > 1e-3  # one iteration from zero is one steepest-descent step


@pytest.mark.parametrize("method,alpha", [("cg", 0.0), ("truncated_cg", 0.0), ("neumann", 0.3)])
def test_solve_linear_from_a_start(x64, method, alpha):
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  a = q @ np.diag([0.5, 1.0, 1.5, 2.0]) @ q.T
  b = jnp.asarray(rng.normal(size=4))
  exact = np.linalg.solve(a, np.asarray(b))
  matvec = lambda v: jnp.asarray(a) @ v
  at_solution, _ = hg.solve_linear(matvec, b, method, 1, alpha, 1e-12, x0=jnp.asarray(exact))
  np.testing.assert_allclose(at_solution, exact, rtol=1e-12)  # a start at the solution stays there
  near = jnp.asarray(exact + 1e-3 * rng.normal(size=4))
  cold, _ = hg.solve_linear(matvec, b, method, 2, alpha, 1e-12)
  warm, _ = hg.solve_linear(matvec, b, method, 2, alpha, 1e-12, x0=near)
  assert np.linalg.norm(warm - exact) < 1e-2 * np.linalg.norm(cold - exact)


def test_unroll_converged_inner_agrees_with_implicit(x64):
  """Many unrolled steps from theta* give (nearly) the implicit hypergradient."""
  train, val, logits = ridge_data(seed=3)
  theta_star, expected = ridge_closed_form(train, val, logits)
  problem = hg.Problem(ridge_loss, optax.sgd(0.4))
  est = hg.Unroll(k=200, remat_policy=None)
  grad, _, _ = run(est, problem, est.init(problem, jnp.asarray(theta_star, F64)), logits, {},
                   {"train": stack([train] * 200), "val": val})
  assert rel_err(grad, expected) <= 1e-6


def test_one_step_equals_unroll_k1_with_sgd(x64):
  train, val, logits = ridge_data(seed=4)
  problem = hg.Problem(ridge_loss, optax.sgd(0.25))
  theta0 = jnp.asarray([0.2, 0.1, -0.4], F64)
  batches = {"train": stack([train]), "val": val}
  g1, s1, _ = run(hg.OneStep(lr=0.25), problem, hg.OneStep().init(problem, theta0), logits, {},
                                           batches)
  g2, s2, _ = run(hg.Unroll(k=1), problem, hg.Unroll(k=1).init(problem, theta0), logits, {}, batches)
  np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(s1.params, s2.params, rtol=1e-12)


def test_alignment_scores_are_gradient_dot_products(x64):
  train, val, _ = ridge_data(seed=5)
  theta = jnp.asarray([0.2, 0.1, -0.4], F64)
  x, y = np.asarray(train["x"]), np.asarray(train["y"])
  xv, yv = np.asarray(val["x"]), np.asarray(val["y"])
  th = np.asarray(theta)
  grad_l = x * (x @ th - y)[:, None] + MU * th[None, :]
  grad_f = xv.T @ (xv @ th - yv) / len(yv) + MU * th
  np.testing.assert_allclose(hg.alignment_scores(ridge_loss, theta, {}, train, val), grad_l @ grad_f,
                             rtol=1e-10)
  cos = grad_l @ grad_f / (np.linalg.norm(grad_l, axis=1) * np.linalg.norm(grad_f))
  np.testing.assert_allclose(hg.alignment_scores(ridge_loss, theta, {}, train, val, cosine=True), cos,
                             rtol=1e-10)


def padded_ridge_batch(train, rows):
  rows = jnp.asarray(rows)
  return {"x": train["x"][jnp.maximum(rows, 0)], "y": train["y"][jnp.maximum(rows, 0)], "index": rows}


def test_penalty_model_step_and_weight_gradient(x64):
  train, val, logits = ridge_data(seed=6)
  lr = 0.2
  problem = hg.Problem(ridge_loss, optax.sgd(lr))
  est = hg.Penalty(lam_init=0.7, lam_decay=0.1, decay_every=2)
  theta = jnp.asarray([0.3, -0.1, 0.2], F64)
  batch = padded_ridge_batch(train, [0, 2, 5, -1, 7])
  state = est.init(problem, theta)._replace(step=jnp.asarray(3, jnp.int32))  # lam = 0.7 - 0.1
  grad, new_state, m = run(est, problem, state, logits, {}, {"train": stack([batch]), "val": val})
  lam = 0.6
  assert float(m["lam"]) == pytest.approx(lam)
  x, y = np.asarray(train["x"]), np.asarray(train["y"])
  xv, yv = np.asarray(val["x"]), np.asarray(val["y"])
  th = np.asarray(theta)
  rows = np.array([0, 2, 5, 7])
  p = np.asarray(wts.softmax_n(logits))
  grad_f = xv.T @ (xv @ th - yv) / len(yv) + MU * th
  grad_l = x * (x @ th - y)[:, None] + MU * th[None, :]
  grad_g = (p[rows, None] * grad_l[rows]).sum(0) / len(rows)  # padding row ignored
  np.testing.assert_allclose(new_state.params, th - lr * (lam * grad_f + (1 - lam) * grad_g),
                             rtol=1e-12)
  # Weight step: grad_omega mean_i p_i(omega) l_i with the losses before the model step.
  losses = 0.5 * (x @ th - y) ** 2 + 0.5 * MU * th @ th
  dl_dp = np.zeros(len(p))
  dl_dp[rows] = losses[rows] / len(rows)
  np.testing.assert_allclose(grad, softmax_n_jacobian(logits).T @ dl_dp, rtol=1e-10, atol=1e-15)


def test_penalty_loss_change_weight_score(x64):
  """``weight_score="loss_change"``: same model step, weight step on ``l_i(theta_t) - l_i(theta_0)``
  with ``theta_0`` the params the estimator started from (ridge closed form, two outer calls)."""
  train, val, logits = ridge_data(seed=7)
  lr = 0.2
  problem = hg.Problem(ridge_loss, optax.sgd(lr))
  theta0 = jnp.asarray([0.3, -0.1, 0.2], F64)
  batch = padded_ridge_batch(train, [1, 3, 4, -1])
  batches = {"train": stack([batch]), "val": val}
  plain, change = hg.Penalty(lam_init=0.8), hg.Penalty(lam_init=0.8, weight_score="loss_change")
  s_plain, s_change = plain.init(problem, theta0), change.init(problem, theta0)
  for _ in range(2):
    g_plain, s_plain, _ = run(plain, problem, s_plain, logits, {}, batches)
    g_change, s_change, _ = run(change, problem, s_change, logits, {}, batches)
  np.testing.assert_allclose(s_change.params, s_plain.params, rtol=1e-12)  # model step unchanged
  x, y = np.asarray(train["x"]), np.asarray(train["y"])

  def losses(t):
    return 0.5 * (x @ t - y) ** 2 + 0.5 * MU * t @ t

  # The second call's weight step uses the losses before its model step: theta after one step.
  theta1 = np.asarray(plain(problem, plain.init(problem, theta0), logits, {}, batches, None)[1].params)
  rows = np.array([1, 3, 4])
  dl_dp = np.zeros(len(logits))
  dl_dp[rows] = (losses(theta1) - losses(np.asarray(theta0)))[rows] / len(rows)
  np.testing.assert_allclose(g_change, softmax_n_jacobian(logits).T @ dl_dp, rtol=1e-10, atol=1e-15)
  assert np.max(np.abs(g_change - g_plain)) > 1e-3  # the starting losses are not a constant shift
  np.testing.assert_allclose(s_change.extra["start_params"], theta0)
  with pytest.raises(ValueError, match="weight_score"):
    hg.Penalty(weight_score="bogus")


def test_penalty_lambda_schedule():
  est = hg.Penalty(lam_init=1.0, lam_decay=0.3, decay_every=4, lam_min=0.05)
  lams = [float(est.lam(jnp.asarray(s))) for s in (0, 3, 4, 8, 12, 100)]
  np.testing.assert_allclose(lams, [1.0, 1.0, 0.7, 0.4, 0.1, 0.05], rtol=1e-6)


def test_penalty_vf_identities(x64):
  train, val, logits = ridge_data(seed=7)
  lr = 0.2
  problem = hg.Problem(ridge_loss, optax.sgd(lr))
  est = hg.PenaltyVF(inner_steps=2, gamma_init=0.5, gamma_max=2.0, gamma_ramp_steps=10)
  theta = jnp.asarray([0.3, -0.1, 0.2], F64)
  b1, b2 = padded_ridge_batch(train, [0, 1, 2, 3]), padded_ridge_batch(train, [4, 5, -1, 6])
  state = est.init(problem, theta)
  grad, new_state, m = run(est, problem, state, logits, {}, {"train": stack([b1, b2]), "val": val})
  gamma = 0.5
  x, y = np.asarray(train["x"]), np.asarray(train["y"])
  xv, yv = np.asarray(val["x"]), np.asarray(val["y"])
  p = np.asarray(wts.softmax_n(logits))

  def grad_g(th, rows):
    gl = x[rows] * (x[rows] @ th - y[rows])[:, None] + MU * th[None, :]
    return (p[rows, None] * gl).sum(0) / len(rows)

  aux = np.asarray(theta)
  for rows in ([0, 1, 2, 3], [4, 5, 6]):
    aux = aux - lr * grad_g(aux, np.array(rows))
  np.testing.assert_allclose(new_state.extra["aux_params"], aux, rtol=1e-12)
  th, rows = np.asarray(theta), np.array([4, 5, 6])
  grad_f = xv.T @ (xv @ th - yv) / len(yv) + MU * th
  np.testing.assert_allclose(new_state.params,
                             th - lr * (grad_f + gamma * grad_g(th, rows)) / (1 + gamma), rtol=1e-12)

  def losses(t):
    return 0.5 * (x @ t - y) ** 2 + 0.5 * MU * t @ t

  dl_dp = np.zeros(len(p))
  dl_dp[rows] = (losses(th) - losses(aux))[rows] / len(rows)
  expected = gamma / (1 + gamma) * softmax_n_jacobian(logits).T @ dl_dp
  np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-15)
  assert float(m["vf_gap"]) > 0  # theta_in fits g better than theta, which also serves f
  assert float(est.gamma(jnp.asarray(5))) == pytest.approx(1.25)


def test_likelihood_ratio_fits_then_assigns_scores(x64):
  train, val, logits = ridge_data(seed=8)
  problem = hg.Problem(ridge_loss, optax.sgd(0.1))
  est = hg.LikelihoodRatio(fit_steps=3, temperature=0.5, fit_optimizer="sgd", fit_lr=0.2,
                           score="ratio")
  theta0 = jnp.asarray([0.3, -0.1, 0.2], F64)
  batch = padded_ridge_batch(train, [1, 3, -1, 6])
  batches = {"train": stack([batch]), "val": val}
  state = est.init(problem, theta0)
  for _ in range(3):
    grad, state, m = run(est, problem, state, logits, {}, batches)
    assert float(m["fitting"]) == 1.0 and not np.any(np.asarray(grad))
  xv, yv = np.asarray(val["x"]), np.asarray(val["y"])
  fit = np.asarray(theta0)
  for _ in range(3):
    fit = fit - 0.2 * (xv.T @ (xv @ fit - yv) / len(yv) + MU * fit)
  np.testing.assert_allclose(state.extra["fit_params"], fit, rtol=1e-12)
  np.testing.assert_allclose(state.params, theta0)  # the start model is never trained
  grad, state, m = run(est, problem, state, logits, {}, batches)
  assert float(m["fitting"]) == 0.0
  x, y = np.asarray(train["x"]), np.asarray(train["y"])

  def losses(t):
    return 0.5 * (x @ t - y) ** 2 + 0.5 * MU * t @ t

  scores = losses(np.asarray(theta0)) - losses(fit)
  new_logits = np.asarray(logits - grad)  # one SGD step of size 1
  rows = np.array([1, 3, 6])
  np.testing.assert_allclose(new_logits[rows], scores[rows] / 0.5, rtol=1e-10)
  others = np.setdiff1d(np.arange(len(logits)), rows)
  np.testing.assert_array_equal(new_logits[others], np.asarray(logits)[others])


@pytest.mark.parametrize("fit_lr", [0.2, 1e-4])
def test_likelihood_ratio_linear_score_is_the_first_order_ratio(x64, fit_lr):
  """``score="linear"`` assigns ``grad l_i(theta0) . (theta0 - theta_fit)`` (ridge closed form);
  for a tiny fitting step it agrees with the exact ratio to first order, for a large one it does not."""
  train, val, logits = ridge_data(seed=11)
  problem = hg.Problem(ridge_loss, optax.sgd(0.1))
  theta0 = jnp.asarray([0.3, -0.1, 0.2], F64)
  batch = padded_ridge_batch(train, [0, 2, 5, -1])
  batches = {"train": stack([batch]), "val": val}
  out = {}
  for score in ("ratio", "linear"):
    est = hg.LikelihoodRatio(fit_steps=2, fit_optimizer="sgd", fit_lr=fit_lr, score=score)
    state = est.init(problem, theta0)
    for _ in range(3):  # two fitting calls, then the scoring call
      grad, state, _ = run(est, problem, state, logits, {}, batches)
    out[score] = np.asarray(logits - grad)
  xv, yv = np.asarray(val["x"]), np.asarray(val["y"])
  fit = np.asarray(theta0)
  for _ in range(2):
    fit = fit - fit_lr * (xv.T @ (xv @ fit - yv) / len(yv) + MU * fit)
  x, y, t0 = np.asarray(train["x"]), np.asarray(train["y"]), np.asarray(theta0)
  per_row_grad = (x @ t0 - y)[:, None] * x + MU * t0  # d l_i / d theta at theta0, [n, d]
  rows = np.array([0, 2, 5])
  linear = per_row_grad[rows] @ (t0 - fit)
  np.testing.assert_allclose(out["linear"][rows], linear, rtol=1e-10)
  exact = out["ratio"][rows]
  if fit_lr < 1e-3:  # second-order remainder ~ |theta0 - fit|^2, relative ~ fit_lr
    np.testing.assert_allclose(linear, exact, rtol=1e-3)
  else:
    assert np.max(np.abs(linear - exact)) > 1e-3 * np.max(np.abs(exact))
  with pytest.raises(ValueError, match="score"):
    hg.LikelihoodRatio(score="bogus")


def test_remat_policies_do_not_change_the_gradient():
  train, val, logits = ridge_data(seed=9, dtype=jnp.float32)
  problem = hg.Problem(ridge_loss, sft.sgd_or_adam("adam", 0.05))
  theta = jnp.asarray([0.3, -0.1, 0.2], jnp.float32)
  batches = {"train": stack([train] * 3), "val": val}
  grads = []
  for policy in (None, "nothing_saveable", "dots_saveable"):
    est = hg.Unroll(k=3, remat_policy=policy, backward="autodiff")
    grads.append(run(est, problem, est.init(problem, theta), logits, {}, batches)[0])
  assert np.all(np.isfinite(grads[0])) and np.linalg.norm(grads[0]) > 0
  for g in grads[1:]:
    np.testing.assert_allclose(g, grads[0], rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="remat policy"):
    hg.Unroll(k=1, remat_policy="bogus")(problem, hg.Unroll().init(problem, theta),
                                         logits, {}, batches, None)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_unroll_layouts_give_the_same_gradient(x64, k):
  """Peeling the first step out of the scan and unrolling the scan change no maths (f64); the
  layouts of autodiff through the scan."""
  train, val, logits = ridge_data(seed=13)
  problem = hg.Problem(ridge_loss, optax.sgd(0.3))  # Adam's first step barely depends on omega
  theta = jnp.asarray([0.3, -0.1, 0.2], F64)
  batches = {"train": stack([train] * k), "val": val}
  results = []
  for settings in ({"peel_first": False}, {"peel_first": True}, {},
                   {"peel_first": True, "scan_unroll": True},
                   {"peel_first": True, "remat_policy": "dots_with_no_batch_dims_saveable"}):
    est = hg.Unroll(k=k, backward="autodiff", **settings)
    results.append(run(est, problem, est.init(problem, theta), logits, {}, batches))
  grad0, state0, m0 = results[0]
  assert np.linalg.norm(grad0) > 1e-3
  for grad, state, m in results[1:]:
    np.testing.assert_allclose(grad, grad0, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(state.params, state0.params, rtol=1e-12)
    for key in ("val_loss", "train_loss", "train_nll"):
      np.testing.assert_allclose(m[key], m0[key], rtol=1e-12)


@pytest.mark.parametrize("keep", hg.UNROLL_KEEP)
@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_unroll_adjoint_backward_equals_autodiff(x64, inner, k, keep):
  """The hand-written reverse pass gives autodiff's gradient, state and metrics (f64), also from an
  Adam state with non-zero moments (its cotangents flow back through the optimizer update)."""
  train, val, logits = ridge_data(seed=14)
  opt = optax.sgd(0.3) if inner == "sgd" else sft.sgd_or_adam("adam", 0.1)
  problem = hg.Problem(ridge_loss, opt)
  idx = [jnp.array([0, 1, 2, 3]), jnp.array([4, 5, 6, -1]), jnp.array([7, 1, 2, 0])][:k]
  train_list = [{"x": train["x"][jnp.maximum(i, 0)], "y": train["y"][jnp.maximum(i, 0)], "index": i}
                for i in idx]
  batches = {"train": stack(train_list), "val": val}
  auto = hg.Unroll(k=k, backward="autodiff")
  adjoint = hg.Unroll(k=k, backward="adjoint", keep_linearization=keep)
  state = auto.init(problem, jnp.asarray([0.3, -0.1, 0.2], F64))
  state = run(auto, problem, state, logits, {}, batches)[1]  # moments and step count non-zero
  (g0, s0, m0), (g1, s1, m1) = (run(e, problem, state, logits, {}, batches) for e in (auto, adjoint))
  assert np.linalg.norm(g0) > 1e-3
  np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
    np.testing.assert_allclose(a, b, rtol=1e-12)
  for key in ("val_loss", "train_loss", "train_nll"):
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-12)
  with pytest.raises(ValueError, match="unroll backward"):
    hg.Unroll(backward="bogus")
  with pytest.raises(ValueError, match="keep_linearization"):
    hg.Unroll(keep_linearization="bogus")
  with pytest.raises(ValueError, match="applies to backward=.adjoint. only"):
    hg.Unroll(backward="autodiff", keep_linearization="all")


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_unroll_adjoint_backward_equals_autodiff_decoder(x64, kind):
  """The same on the tiny decoder (Adam inner, K = 2): a sum over rows and tokens, two layers."""
  trainable, frozen, loss_fn, train_list, val = decoder_setup(kind, seed=1)
  problem = hg.Problem(loss_fn, sft.sgd_or_adam("adam", 0.05))
  logits = jnp.asarray([0.4, -0.3, 0.2, 0.1, -0.5], F64)
  batches = {"train": stack(train_list), "val": val}
  grads = []
  for backward in ("autodiff", "adjoint"):
    est = hg.Unroll(k=2, backward=backward)
    step = jax.jit(lambda lg, e=est: e(problem, e.init(problem, trainable), lg, frozen, batches,
                                       None)).lower(logits).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    grads.append(step(logits)[0])
  assert np.linalg.norm(grads[0]) > 1e-3
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_unroll_kept_linearization_equals_autodiff_decoder(x64, kind, inner):
  """Keeping the steps' linearizations changes no number (tiny decoder, K = 3, f64).

  Adam runs with ``eps=1e-2``: its update divides by ``sqrt(v) + eps``, so with the default
  ``eps=1e-6`` the second-order terms multiply the last-bit differences of near-zero gradient
  entries (the linear map's transpose sums in another order than ``jax.vjp``) by up to 1e6, and the
  variants then agree to 1e-11 instead of 1e-15 (measured); ``eps=1e-2`` keeps that gain at 100.
  """
  trainable, frozen, loss_fn, train_list, val = decoder_setup(kind, seed=1)
  opt = optax.sgd(0.05) if inner == "sgd" else sft.sgd_or_adam("adam", 0.05, eps=1e-2)
  problem = hg.Problem(loss_fn, opt)
  logits = jnp.asarray([0.4, -0.3, 0.2, 0.1, -0.5], F64)
  batches = {"train": stack(train_list + train_list[:1]), "val": val}
  out = []
  for backward, keep in UNROLL_VARIANTS:
    est = hg.Unroll(k=3, backward=backward, keep_linearization=keep)
    step = jax.jit(lambda lg, e=est: e(problem, e.init(problem, trainable), lg, frozen, batches,
                                       None)).lower(logits).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    out.append(step(logits))
  (g0, s0, m0) = out[0]
  assert np.linalg.norm(g0) > 1e-3
  for g, s, m in out[1:]:
    np.testing.assert_allclose(g, g0, rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(s0.params)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    for key in ("val_loss", "train_loss", "train_nll"):
      np.testing.assert_allclose(m[key], m0[key], rtol=1e-12)


@pytest.mark.parametrize("kind", ["full", "last_n_layers", "lora"])
def test_per_layer_trainable_gives_the_stacked_hypergradient(x64, kind):
  """``TrainableSpec(per_layer=True)`` runs the layers unrolled; the maths must not change."""
  problem_grads, inner_params = [], []
  for per_layer in (False, True):
    trainable, frozen, loss_fn, train_list, val = decoder_setup(kind, seed=2, per_layer=per_layer)
    assert isinstance(trainable["layers"], tuple) == per_layer
    problem = hg.Problem(loss_fn, sft.sgd_or_adam("adam", 0.05))
    logits = jnp.asarray([0.4, -0.3, 0.2, 0.1, -0.5], F64)
    est = hg.Unroll(k=2)
    batches = {"train": stack(train_list), "val": val}
    step = jax.jit(lambda lg, e=est, p=problem, tr=trainable, fr=frozen: e(
        p, e.init(p, tr), lg, fr, batches, None)).lower(logits).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    grad, state, _ = step(logits)
    problem_grads.append(grad)
    spec = lora.TrainableSpec(kind=kind, n_layers=1, per_layer=per_layer)
    inner_params.append(lora.merge(spec, state.params, frozen))
  assert np.linalg.norm(problem_grads[0]) > 1e-3
  np.testing.assert_allclose(problem_grads[1], problem_grads[0], rtol=1e-10, atol=1e-14)
  for x, y in zip(jax.tree.leaves(inner_params[1]), jax.tree.leaves(inner_params[0])):
    np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-14)


def test_unroll_truncation_warm_starts_the_inner_state(x64):
  """Two outer calls advance the inner model exactly as 2K plain steps would."""
  train, val, logits = ridge_data(seed=10)
  problem = hg.Problem(ridge_loss, sft.sgd_or_adam("adam", 0.05))
  theta0 = jnp.asarray([0.3, -0.1, 0.2], F64)
  est = hg.Unroll(k=2)
  state = est.init(problem, theta0)
  batches = {"train": stack([train, train]), "val": val}
  for _ in range(2):
    _, state, _ = run(est, problem, state, logits, {}, batches)
  th, s = theta0, problem.inner_optimizer.init(theta0)
  w = wts.gather_weights(wts.softmax_n(logits), train["index"])
  for _ in range(4):
    th, s, _ = sft.inner_step(ridge_loss, problem.inner_optimizer, th, {}, s, train, w)
  np.testing.assert_allclose(state.params, th, rtol=1e-12)
  assert int(state.step) == 2


def test_padding_rows_get_no_gradient_with_sigmoid2(x64):
  train, val, logits = ridge_data(seed=11)
  problem = hg.Problem(ridge_loss, optax.sgd(0.3), parametrization="sigmoid2")
  batch = padded_ridge_batch(train, [0, 4, -1, -1])
  theta = jnp.asarray([0.3, -0.1, 0.2], F64)
  for est in (hg.Unroll(k=1), hg.OneStep(lr=0.3), hg.Penalty(), hg.Implicit(iters=3)):
    grad, _, _ = run(est, problem, est.init(problem, theta), logits, {},
                     {"train": stack([batch]), "val": val})
    grad = np.asarray(grad)
    assert np.all(grad[[1, 2, 3, 5, 6, 7]] == 0.0), est
    assert np.all(grad[[0, 4]] != 0.0), est


def test_registry_builds_hashable_configs():
  for name in hg.ESTIMATORS:
    est = hg.make_estimator(name)
    assert est.name == name
    assert hash(est) == hash(hg.make_estimator(name))
  assert hg.make_estimator("implicit", method="neumann", iters=5) == hg.Implicit(method="neumann",
                                                                                 iters=5)
  with pytest.raises(ValueError, match="unknown hypergradient estimator"):
    hg.make_estimator("magic")
  with pytest.raises(ValueError, match="no setting"):
    hg.make_estimator("unroll", K=2)


def test_select_driver_runs_resumes_and_keeps_caller_params():
  train, val, _ = ridge_data(seed=12, dtype=jnp.float32)
  arrays = {k: np.asarray(v) for k, v in train.items() if k != "index"}
  problem = hg.Problem(ridge_loss, optax.sgd(0.2))
  est = hg.Unroll(k=2)
  theta = jnp.asarray([0.3, -0.1, 0.2], jnp.float32)
  logit_opt = sel.make_logit_optimizer(est)
  step = sel.make_outer_step(problem, est, logit_opt)
  full = sel.select(problem, est, theta, {}, 8, sel.epoch_batches(arrays, 3, seed=0),
                    sel.cycle([val]), num_steps=6, outer_step=step, history_every=2)
  np.asarray(theta)  # still alive: the driver copies before donating
  assert full.history.shape == (4, 8) and list(full.history_steps) == [0, 2, 4, 6]
  assert len(full.metrics) == 6
  assert {"val_loss", "hypergrad_norm", "ess", "entropy"} <= set(full.metrics[0])
  assert not np.allclose(full.logits, 0.0)
  np.testing.assert_allclose(full.weights.sum(), 8.0, rtol=1e-5)
  it = sel.epoch_batches(arrays, 3, seed=0)
  half = sel.select(problem, est, theta, {}, 8, it, sel.cycle([val]), num_steps=3, outer_step=step)
  rest = sel.select(problem, est, theta, {}, 8, it, sel.cycle([val]), num_steps=3, outer_step=step,
                    state=half.state)
  np.testing.assert_array_equal(rest.logits, full.logits)
  assert rest.metrics[-1]["step"] == 6


def test_logit_optimizer_by_name():
  logits, grad = jnp.zeros(3), jnp.asarray([0.5, -2.0, 0.0])
  sgd = sel.make_logit_optimizer(hg.Penalty(), "sgd", 0.1)
  step, _ = sgd.update(grad, sgd.init(logits), logits)
  np.testing.assert_allclose(step, -0.1 * grad)  # keeps each pair's score magnitude
  adam = sel.make_logit_optimizer(hg.Penalty(), "adam", 0.1)
  step, _ = adam.update(grad, adam.init(logits), logits)
  np.testing.assert_allclose(step, [-0.1, 0.1, 0.0], atol=1e-6)  # first Adam step: the sign only
  closed = sel.make_logit_optimizer(hg.LikelihoodRatio(), "adam", 0.1)
  step, _ = closed.update(grad, closed.init(logits), logits)
  np.testing.assert_allclose(step, -grad)  # closed form: one step assigns the value
  with pytest.raises(ValueError, match="'rmsprop'"):
    sel.make_logit_optimizer(hg.Penalty(), "rmsprop")


def test_epoch_batches_cover_the_pool_and_pad():
  arrays = {"x": np.arange(7, dtype=np.float32)}
  it = sel.epoch_batches(arrays, 3, seed=1)
  epoch = [next(it) for _ in range(3)]
  idx = np.concatenate([b["index"] for b in epoch])
  assert sorted(idx[idx >= 0].tolist()) == list(range(7))
  assert (idx < 0).sum() == 2
  for b in epoch:
    real = b["index"] >= 0
    np.testing.assert_array_equal(b["x"][real], b["index"][real].astype(np.float32))


def _numpy_truncated_cg(a, b, iters):
  """Reference: textbook CG on a dense matrix, stopped at the first d . A d <= 0."""
  v, r, d, rr = np.zeros_like(b), b.copy(), b.copy(), b @ b
  for k in range(iters):
    ad = a @ d
    if not d @ ad > 0:
      return (b if k == 0 else v), k, True
    alpha = rr / (d @ ad)
    v, r = v + alpha * d, r - alpha * ad
    rr, rr_old = r @ r, rr
    d = r + (rr / rr_old) * d
  return v, iters, False


def test_truncated_cg_solves_spd_and_stops_at_negative_curvature(x64):
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  b = rng.normal(size=6)
  split = lambda x: {"a": jnp.asarray(x[:2]), "b": jnp.asarray(x[2:])}  # a pytree right-hand side
  join = lambda t: jnp.concatenate([t["a"], t["b"]])

  def solve(a, iters, tol=1e-12):
    matvec = lambda t: split(jnp.asarray(a) @ join(t))
    v, k, neg = jax.jit(lambda rhs: hg.truncated_cg(matvec, rhs, iters, tol))(split(b))
    return np.asarray(join(v)), int(k), bool(neg)

  spd = q @ np.diag([0.5, 1.0, 2.0, 3.0, 5.0, 8.0]) @ q.T
  v, k, neg = solve(spd, 20)
  np.testing.assert_allclose(v, np.linalg.solve(spd, b), rtol=1e-9)
  assert not neg and k <= 7  # exact in at most n = 6 steps (one more for round-off)
  indefinite = q @ np.diag([-2.0, 0.3, 1.0, 2.0, 4.0, 7.0]) @ q.T
  want_v, want_k, want_neg = _numpy_truncated_cg(indefinite, b, 20)
  v, k, neg = solve(indefinite, 20)
  assert want_neg and neg and k == want_k and k >= 1
  np.testing.assert_allclose(v, want_v, rtol=1e-10)
  v, k, neg = solve(-spd, 20)  # negative definite: stops at once and returns b
  assert neg and k == 0
  np.testing.assert_array_equal(v, b)
  assert solve(spd, 2)[1] == 2  # the iteration cap


def test_implicit_truncated_cg_matches_closed_form_ridge(x64):
  train, val, logits = ridge_data(seed=1)
  theta_star, expected = ridge_closed_form(train, val, logits)
  problem = hg.Problem(ridge_loss, optax.sgd(0.1))
  est = hg.Implicit(method="truncated_cg", iters=10)
  grad, _, m = run(est, problem, est.init(problem, jnp.asarray(theta_star, F64)), logits, {},
                   {"train": stack([train]), "val": val})
  assert rel_err(grad, expected) <= 1e-8
  assert float(m["negative_curvature"]) == 0.0 and 1 <= float(m["solver_iters"]) <= 4
  with pytest.raises(ValueError, match="implicit method 'lu'"):
    hg.Implicit(method="lu")
