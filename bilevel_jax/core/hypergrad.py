"""Hypergradient estimators for bilevel data selection, one interface, chosen by name.

The problem (DESIGN.md section 2): per-example weights ``p(omega)``, lower level
``g(theta, omega) = mean_i p_i(omega) l_i(theta)``, upper level ``f(theta) = mean_j l'_j(theta)``
on validation data, ``min_omega f(theta*(omega))``. ``make_estimator(name, **settings)`` builds one
of :data:`ESTIMATORS`: ``unroll`` (``unroll.py``), ``penalty``, ``penalty_vf``, ``implicit``,
``one_step`` and ``likelihood_ratio`` (this module).

The interface every estimator implements (``init`` and a pure ``__call__`` returning the logits'
gradient, the new state and metrics), ``Problem`` and ``EstimatorState`` are described and defined in
``estimator.py``, with the helpers the estimators share; every name is importable from here.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from bilevel_jax.core import sft, weights as wts
from bilevel_jax.core.estimator import (  # noqa: F401 (the interface, re-exported)
    Estimator, EstimatorState, Params, Problem, _check_remat_policy, _finish, _linear_schedule,
    _plain_steps, _remat, _weighted_step, directional_losses, logits_vjp, mean_loss, row_weights,
    take, valid_mask)
from bilevel_jax.core.unroll import UNROLL_BACKWARDS, UNROLL_KEEP, Unroll  # noqa: F401


# ----------------------------------------------------------------------------- one step


@dataclasses.dataclass(frozen=True)
class OneStep(Estimator):
  """The ``K = 1`` look-ahead: per-example gradient alignment with the validation gradient.

  With an SGD look-ahead ``theta' = theta - lr * grad g(theta, omega)``, the hypergradient w.r.t. the
  row weight ``p_i`` is ``-(lr / B) grad f(theta') . grad l_i(theta)``: the alignment of each
  example's gradient with the validation gradient (L2RW, Ren et al. 2018; GREATS; LESS-style scores).
  All ``B`` alignments come from one ``jax.jvp`` of the per-example losses along ``grad f``, with no
  per-example gradients. ``lookahead=True`` evaluates ``grad f`` at ``theta'`` (then this equals
  ``Unroll(k=1)`` exactly when the inner optimizer is SGD with the same ``lr``); ``False`` at
  ``theta`` (the plain alignment score). The state advances by the real inner optimizer step.

  Extra metrics: ``alignment_mean``.
  """

  name: ClassVar[str] = "one_step"
  lr: float = 1e-2
  lookahead: bool = True

  def __call__(self, problem, state, logits, frozen, batches, key):
    del key
    batch = take(batches["train"], 0)
    w = row_weights(problem, jax.lax.stop_gradient(logits), batch)
    params, opt_state, m = _weighted_step(problem, state.params, state.opt_state, frozen, batch, w)
    at = params if self.lookahead else state.params
    f, grad_f = jax.value_and_grad(mean_loss, argnums=1)(problem.loss_fn, at, frozen, batches["val"])
    align = directional_losses(problem.loss_fn, state.params, frozen, batch, grad_f)
    valid = valid_mask(batch, align)
    row_grad = -self.lr * align * valid / jnp.maximum(jnp.sum(valid), 1.0)
    grad = logits_vjp(problem, logits, batch, row_grad)
    metrics = {"val_loss": f, "train_loss": m["loss"], "train_nll": m["nll"],
               "alignment_mean": jnp.sum(align * valid) / jnp.maximum(jnp.sum(valid), 1.0)}
    return _finish(grad, state, metrics, params=params, opt_state=opt_state)


def alignment_scores(loss_fn: sft.LossFn, params: Params, frozen: Params, train_batch: dict,
                     val_batch: dict, cosine: bool = False) -> Float[Array, "b"]:
  """``grad l_i(theta) . grad f(theta)`` per train row (the ``one_step`` score; higher = helps).

  With ``cosine=True`` each score is divided by both gradient norms; that needs the per-example
  gradients (``vmap`` of ``grad``, B copies of the trainable params in memory).
  """
  grad_f = jax.grad(mean_loss, argnums=1)(loss_fn, params, frozen, val_batch)
  dots = directional_losses(loss_fn, params, frozen, train_batch, grad_f)
  if not cosine:
    return dots

  def one(row):
    single = jax.tree.map(lambda x: x[None], row)
    return optax.tree.norm(jax.grad(lambda th: loss_fn(th, frozen, single)[0])(params))

  norms = jax.vmap(one)(train_batch)
  return dots / jnp.maximum(norms * optax.tree.norm(grad_f), 1e-12)


# ----------------------------------------------------------------------------- penalty


def penalty_model_loss(problem: Problem, params: Params, frozen: Params, logits: Float[Array, "n"],
                       train_batch: dict, val_batch: dict, lam: float | Array
                       ) -> tuple[Float[Array, ""], tuple]:
  """``lam * f(theta) + (1 - lam) * mean_i sg(p_i) l_i(theta)`` and ``(f, g, losses)``."""
  f = mean_loss(problem.loss_fn, params, frozen, val_batch)
  losses = problem.loss_fn(params, frozen, train_batch)
  w = jax.lax.stop_gradient(row_weights(problem, logits, train_batch))
  g = sft.weighted_mean(losses, w, valid_mask(train_batch, losses))
  return lam * f + (1.0 - lam) * g, (f, g, losses)


def weight_loss_grad(problem: Problem, logits: Float[Array, "n"], batch: dict,
                     losses: Float[Array, "b"]) -> Float[Array, "n"]:
  """``grad_omega mean_i p_i(omega) sg(l_i)`` over the real rows of ``batch``."""
  losses = jax.lax.stop_gradient(losses)
  valid = valid_mask(batch, losses)
  return jax.grad(lambda lg: sft.weighted_mean(losses, row_weights(problem, lg, batch), valid))(logits)


@dataclasses.dataclass(frozen=True)
class Penalty(Estimator):
  """First-order single-loop penalty method of SEAL (Shen et al., ICLR 2025) and BIPOST.

  Model step with the inner optimizer on ``lam * f + (1 - lam) * mean_i sg(p_i) l_i``; weight step on
  ``mean_i p_i(omega) sg(l_i)`` with the losses taken before the model step, as in SEAL's
  ``seal/trainer/sft_selector_trainer.py`` (hanshen95/SEAL). ``lam`` decays linearly by ``lam_decay``
  every ``decay_every`` outer steps down to ``lam_min`` (SEAL: ``lam`` starts at 1 and drops by 0.03
  per epoch, so set ``decay_every`` to the steps per epoch).

  ``weight_score="loss_change"`` replaces ``l_i`` in the weight step by ``l_i(theta_t) -
  l_i(theta_start)``, the loss change since the estimator's first params (kept in ``extra``; one more
  forward pass per step): the ``likelihood_ratio`` score accumulated along the penalty trajectory. On
  the real `safety_matched` pool the raw loss ranks the pairs at only 0.75-0.84 AUROC even under a
  validation-fitted model, the loss change at 0.92-0.97 (docs/selection_study.md). There, with SGD
  on the logits (Adam's first step on a logit is its sign, dropping the score's size), the loss
  change reached 0.90-0.93 over 3 seeds with ``lam`` held at 1 (``lam_decay=0``: the model step on
  validation only) and peaked at 0.86-0.90 with SEAL's decay: the pool term costs signal there.

  Extra metrics: ``lam``, ``train_nll``.
  """

  name: ClassVar[str] = "penalty"
  lam_init: float = 1.0
  lam_decay: float = 0.03
  decay_every: int = 100
  lam_min: float = 0.0
  weight_score: str = "loss"  # or "loss_change" (see the class docstring)

  def __post_init__(self):
    if self.weight_score not in ("loss", "loss_change"):
      raise ValueError(f"penalty weight_score {self.weight_score!r}: use 'loss' or 'loss_change'")

  def init_extra(self, problem, params):
    del problem
    if self.weight_score == "loss_change":
      return {"start_params": jax.tree.map(jnp.copy, params)}
    return {}

  def lam(self, step: Int[Array, ""]) -> Float[Array, ""]:
    decays = (step // max(self.decay_every, 1)).astype(jnp.result_type(float))
    lam = self.lam_init - self.lam_decay * decays
    return jnp.maximum(lam, self.lam_min)

  def __call__(self, problem, state, logits, frozen, batches, key):
    del key
    batch, val = take(batches["train"], 0), batches["val"]
    lam = self.lam(state.step)
    (_, (f, g, losses)), grads = jax.value_and_grad(penalty_model_loss, argnums=1, has_aux=True)(
        problem, state.params, frozen, logits, batch, val, lam)
    updates, opt_state = problem.inner_optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    score = losses
    if self.weight_score == "loss_change":
      score = losses - problem.loss_fn(state.extra["start_params"], frozen, batch)
    grad = weight_loss_grad(problem, logits, batch, score)
    metrics = {"val_loss": f, "train_loss": g, "train_nll": mean_loss_of(losses, batch), "lam": lam}
    return _finish(grad, state, metrics, params=params, opt_state=opt_state)


def mean_loss_of(losses: Float[Array, "b"], batch: dict) -> Float[Array, ""]:
  valid = valid_mask(batch, losses)
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)


@dataclasses.dataclass(frozen=True)
class PenaltyVF(Estimator):
  """Penalty with the value-function term, V-PBGD (Shen & Chen, ICML 2023).

  Objective ``f(theta) + gamma * (g(theta, omega) - v(omega))`` with ``v(omega) = min g(., omega)``
  approximated by an auxiliary copy ``theta_in`` that takes ``inner_steps`` (T) steps on ``g`` per
  outer step, warm-started across outer steps. Both gradients are divided by ``1 + gamma`` so the
  model step is on ``(f + gamma g) / (1 + gamma)`` (the ``penalty`` form with
  ``lam = 1 / (1 + gamma)``) and the weight gradient is
  ``gamma / (1 + gamma) * grad_omega [g(theta, omega) - g(theta_in, omega)]`` on the last train batch.
  ``gamma`` ramps linearly from ``gamma_init`` to ``gamma_max`` over ``gamma_ramp_steps`` outer steps.

  Consumes ``inner_steps`` train batches (the aux copy steps through them; the model and weight steps
  use the last). State ``extra``: ``aux_params``, ``aux_opt_state``. Extra metrics: ``gamma``,
  ``aux_loss`` (``g(theta_in)``), ``vf_gap`` (``g(theta) - g(theta_in)``).

  A pair's weight score ``l_i(theta) - l_i(theta_in)`` is, to first order and with ``theta_in``
  near ``theta``, ``grad l_i . grad g``: how typical the pair is of the pool. Validation enters only
  through ``theta``; on the real `safety_matched` pool that alignment scored AUROC 0.44-0.48 and
  explained about 30% of a 40-step run's logits (docs/selection_study.md, ``pool_alignment``).
  """

  name: ClassVar[str] = "penalty_vf"
  inner_steps: int = 1
  gamma_init: float = 0.1
  gamma_max: float = 10.0
  gamma_ramp_steps: int = 100

  @property
  def train_batches(self) -> int:
    return max(self.inner_steps, 1)

  def init_extra(self, problem, params):
    aux = jax.tree.map(jnp.copy, params)
    return {"aux_params": aux, "aux_opt_state": problem.inner_optimizer.init(aux)}

  def gamma(self, step):
    return _linear_schedule(step, self.gamma_init, self.gamma_max, self.gamma_ramp_steps)

  def __call__(self, problem, state, logits, frozen, batches, key):
    del key
    gamma = self.gamma(state.step)
    p = problem.weights(logits)
    aux, aux_s, _ = _plain_steps(problem, state.extra["aux_params"], state.extra["aux_opt_state"],
                                 frozen, batches["train"], p)
    batch = take(batches["train"], self.train_batches - 1)
    lam = 1.0 / (1.0 + gamma)
    (_, (f, g, losses)), grads = jax.value_and_grad(penalty_model_loss, argnums=1, has_aux=True)(
        problem, state.params, frozen, logits, batch, batches["val"], lam)
    updates, opt_state = problem.inner_optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux_losses = problem.loss_fn(aux, frozen, batch)
    w = jax.lax.stop_gradient(row_weights(problem, logits, batch))
    g_aux = sft.weighted_mean(aux_losses, w, valid_mask(batch, aux_losses))
    grad = (gamma / (1.0 + gamma)) * weight_loss_grad(problem, logits, batch, losses - aux_losses)
    metrics = {"val_loss": f, "train_loss": g, "gamma": gamma, "aux_loss": g_aux,
               "vf_gap": g - g_aux}
    return _finish(grad, state, metrics, params=params, opt_state=opt_state,
                   extra={"aux_params": aux, "aux_opt_state": aux_s})


# ----------------------------------------------------------------------------- implicit


LINEAR_SOLVERS = ("cg", "truncated_cg", "neumann")


def truncated_cg(matvec, b: Params, iters: int, tol: float
                 ) -> tuple[Params, Array, Array]:
  """CG for ``A v = b`` that stops where ``A`` shows non-positive curvature (truncated Newton).

  Plain CG assumes ``A`` positive definite; a Hessian away from a minimum is indefinite, and CG then
  divides by ``d . A d <= 0`` and diverges. Here the loop stops at the first such direction and
  returns the iterate it reached, or ``b`` itself when that happens at the first iteration (the
  Dembo-Steihaug rule; Nocedal & Wright, Algorithm 7.1 without the trust region). It also stops when
  ``|r| <= tol |b|`` or after ``iters`` iterations.

  Returns:
    ``(v, iterations, negative_curvature)``: ``iterations`` counts the completed CG updates;
    ``negative_curvature`` is True when the curvature test stopped the loop.
  """
  tree = optax.tree
  bb = tree.vdot(b, b)

  def cond(c):
    k, _, _, _, rr, stop = c
    return (k < iters) & ~stop & (rr > tol ** 2 * bb)

  def body(c):
    k, v, r, d, rr, _ = c
    ad = matvec(d)
    curv = tree.vdot(d, ad)
    negative = ~(curv > 0)
    alpha = rr / jnp.where(negative, 1.0, curv)
    v_new = tree.add_scale(v, alpha, d)
    r_new = tree.add_scale(r, -alpha, ad)
    rr_new = tree.vdot(r_new, r_new)
    d_new = tree.add_scale(r_new, rr_new / rr, d)
    fallback = jax.tree.map(lambda x, y: jnp.where(k == 0, x, y), b, v)
    keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(negative, o, n), old, new)
    return (k + jnp.where(negative, 0, 1), keep(fallback, v_new), keep(r, r_new), keep(d, d_new),
            jnp.where(negative, rr, rr_new), negative)

  init = (jnp.zeros((), jnp.int32), tree.zeros_like(b), b, b, bb, jnp.zeros((), bool))
  k, v, _, _, _, negative = jax.lax.while_loop(cond, body, init)
  return v, k, negative


def solve_linear(matvec, b: Params, method: str, iters: int, alpha: float, tol: float,
                 x0: Params | None = None) -> tuple[Params, dict[str, Array]]:
  """Approximately solves ``A v = b`` for a pytree ``b``: ``cg``, ``truncated_cg`` or Neumann.

  Neumann: ``v = alpha * sum_{j=0..iters} (I - alpha A)^j b``, which converges when
  ``0 < alpha < 2 / lambda_max(A)``; ``cg`` (``jax.scipy.sparse.linalg.cg``) needs ``A`` symmetric
  positive definite (add damping); ``truncated_cg`` (:func:`truncated_cg`) stops at non-positive
  curvature instead of diverging. With a start ``x0`` every method solves for the correction,
  ``v = x0 + solve(A, b - A x0)`` (one more ``matvec``; for ``cg`` the same iterates as CG started
  at ``x0``).

  Returns:
    ``v`` and the solver's own metrics: ``solver_iters`` and ``negative_curvature`` (1.0 when the
    curvature test stopped it) for ``truncated_cg``, none for the others.
  """
  if x0 is not None:
    correction, metrics = solve_linear(matvec, optax.tree.sub(b, matvec(x0)), method, iters, alpha,
                                       tol)
    return optax.tree.add(x0, correction), metrics
  if method == "cg":
    v, _ = jax.scipy.sparse.linalg.cg(matvec, b, maxiter=iters, tol=tol)
    return v, {}
  if method == "truncated_cg":
    v, k, negative = truncated_cg(matvec, b, iters, tol)
    return v, {"solver_iters": k.astype(jnp.float32),
               "negative_curvature": negative.astype(jnp.float32)}
  if method == "neumann":
    def body(_, carry):
      acc, term = carry
      term = optax.tree.add_scale(term, -alpha, matvec(term))
      return optax.tree.add(acc, term), term

    acc, _ = jax.lax.fori_loop(0, iters, body, (b, b))
    return optax.tree.scale(alpha, acc), {}
  raise ValueError(f"unknown linear solver {method!r}: use one of {LINEAR_SOLVERS}")


@dataclasses.dataclass(frozen=True)
class Implicit(Estimator):
  """Implicit-function-theorem hypergradient with Hessian-vector products.

  At a lower-level solution, ``d f / d omega = -(d/d omega grad_theta g)^T v`` with
  ``(H + damping I) v = grad f`` and ``H = grad^2_theta g`` (Lorraine, Vicol & Duvenaud, AISTATS 2020;
  Betty's ``neumann`` and ``cg`` hypergradients). HVPs are forward-over-reverse (``jax.jvp`` of
  ``jax.grad``); the mixed term is one more ``jvp`` of the per-example losses along ``v``, so each
  row's term is ``grad l_i . v / B``. The inner model first takes ``inner_steps`` plain steps
  (warm-started) towards ``theta*``; H and the mixed term use the last train batch.

  Consumes ``max(inner_steps, 1)`` train batches. Extra metrics: ``solver_residual``
  (``|(H + damping) v - grad f| / |grad f|``); with ``method="truncated_cg"`` also
  ``solver_iters`` and ``negative_curvature`` (1.0 when CG stopped at non-positive curvature).

  Away from a minimum of ``g`` the Hessian is indefinite: on the real model's 96-pair
  `safety_matched` pool at the start, CG met negative curvature at its fourth iteration even with
  damping 1, and ``jax.scipy.sparse.linalg.cg`` has no safeguard for that, so watch
  ``solver_residual``; the direction reached after 3 iterations on whole sets still scored AUROC 0.91
  (docs/selection_study.md, ``influence_alignment``), and the estimator itself (``iters=3``,
  ``damping=1.0``) 0.78 after 40 outer steps. ``method="truncated_cg"`` stops there instead.

  ``warm_start=True`` starts each solve from the previous outer step's ``v`` (kept in ``extra``)
  instead of zero, the amortized implicit differentiation of AmIGO (Arbel & Mairal, ICLR 2022): a
  few iterations per outer step then keep refining one solve while the model and batches move. It
  needs ``H + damping`` positive definite: on the real `safety_matched` pool (indefinite at the
  start) the warm-started CG grew along negative curvature (residual 2.8e4 after 40 steps, AUROC 0.34
  against 0.78 cold).
  """

  name: ClassVar[str] = "implicit"
  method: str = "cg"
  iters: int = 10
  damping: float = 0.0
  neumann_alpha: float = 0.1
  tol: float = 1e-10
  inner_steps: int = 1
  warm_start: bool = False

  def __post_init__(self):
    if self.method not in LINEAR_SOLVERS:
      raise ValueError(f"implicit method {self.method!r}: use one of {LINEAR_SOLVERS}")

  def init_extra(self, problem, params):
    del problem
    return {"v": jax.tree.map(jnp.zeros_like, params)} if self.warm_start else {}

  @property
  def train_batches(self) -> int:
    return max(self.inner_steps, 1)

  def __call__(self, problem, state, logits, frozen, batches, key):
    del key
    p = problem.weights(logits)
    params, opt_state = state.params, state.opt_state
    if self.inner_steps > 0:
      params, opt_state, _ = _plain_steps(problem, params, opt_state, frozen, batches["train"], p)
    batch = take(batches["train"], self.train_batches - 1)
    w = jax.lax.stop_gradient(wts.gather_weights(p, batch["index"]))

    def grad_g(th):
      return jax.grad(lambda t: sft.weighted_loss(problem.loss_fn, t, frozen, batch, w)[0])(th)

    def matvec(v):
      return optax.tree.add_scale(jax.jvp(grad_g, (params,), (v,))[1], self.damping, v)

    f, grad_f = jax.value_and_grad(mean_loss, argnums=1)(problem.loss_fn, params, frozen,
                                                         batches["val"])
    v, solver = solve_linear(matvec, grad_f, self.method, self.iters, self.neumann_alpha,
                             self.tol, x0=state.extra["v"] if self.warm_start else None)
    residual = optax.tree.norm(optax.tree.sub(matvec(v), grad_f)) / jnp.maximum(
        optax.tree.norm(grad_f), 1e-30)
    mixed = directional_losses(problem.loss_fn, params, frozen, batch, v)
    valid = valid_mask(batch, mixed)
    grad = logits_vjp(problem, logits, batch, -mixed * valid / jnp.maximum(jnp.sum(valid), 1.0))
    losses = problem.loss_fn(params, frozen, batch)
    metrics = {"val_loss": f, "train_loss": sft.weighted_mean(losses, w, valid),
               "solver_residual": residual, **solver}
    return _finish(grad, state, metrics, params=params, opt_state=opt_state,
                   extra={"v": v} if self.warm_start else state.extra)


# ----------------------------------------------------------------------------- likelihood ratio


LIKELIHOOD_RATIO_SCORES = ("linear", "ratio")


def _check_score(score: str) -> None:
  if score not in LIKELIHOOD_RATIO_SCORES:
    raise ValueError(f"likelihood_ratio score {score!r}: use one of {LIKELIHOOD_RATIO_SCORES}")


def likelihood_ratio_scores(loss_fn: sft.LossFn, start_params: Params, fit_params: Params,
                            frozen: Params, batch: dict, score: str = "ratio") -> Float[Array, "b"]:
  """Per-row score of the fitted copy against the start.

  ``score="ratio"``: mean response log-prob under the fitted copy minus under the start,
  ``l_i(start) - l_i(fit)``. ``score="linear"``: its first-order part along the fitted displacement,
  ``grad l_i(start) . (start - fit)`` (one forward-mode pass, :func:`directional_losses`).
  """
  _check_score(score)
  if score == "ratio":
    return loss_fn(start_params, frozen, batch) - loss_fn(fit_params, frozen, batch)
  direction = jax.tree.map(jnp.subtract, start_params, fit_params)
  return directional_losses(loss_fn, start_params, frozen, batch, direction)


@dataclasses.dataclass(frozen=True)
class LikelihoodRatio(Estimator):
  """Closed-form, importance-ratio style weights from a validation-fitted copy of the model.

  This follows the design brief's reading (DESIGN.md section 2, issue 7), not a formula read from
  the paper (arXiv 2511.21056 states that its multi-objective form recovers BDS's validation-aligned
  solution with a closed-form importance-ratio weight; that formula could not be read from any stored
  source). The first ``fit_steps`` calls each take one step of a copy of the model on the validation
  batch (uniform weights; ``fit_optimizer``/``fit_lr``, Adam at 1e-4 by default, or the inner
  optimizer when ``fit_optimizer`` is None) and return a zero gradient. Later calls score the
  train rows by ``s_i`` (:func:`likelihood_ratio_scores`; ``score="ratio"``: the exact log-ratio
  ``s_i = mean_t log pi_fit(y_it) - mean_t log pi_start(y_it)``; ``score="linear"``, the default:
  its first-order part, below), where ``start`` is ``state.params``, left untouched, and return
  ``grad = omega_rows - s / temperature`` on the scored rows (0 elsewhere): the gradient of
  ``0.5 * ||omega_rows - s / T||^2``, so one SGD step of size 1 sets those logits to ``s / T`` and
  ``softmax_n`` gives ``p = N softmax(s / T)`` (``closed_form = True``: the driver uses
  ``sgd(1)``). Scoring is idempotent across epochs.

  State ``extra``: ``fit_params``, ``fit_opt_state``. Extra metrics: ``fitting`` (1 while fitting),
  ``fit_val_loss``, ``score_mean``.

  ``score="linear"`` replaces the exact ratio by its first-order part
  ``grad l_i(start) . (start - fit)``: the alignment of each pair's gradient with the whole
  validation-fitted displacement rather than with one validation gradient (``one_step``). On the
  real `safety_matched` pool it scored AUROC
  0.998 / 0.974 / 0.980 on seeds 0-2 against 0.948 / 0.916 / 0.939 for ``"ratio"``
  (docs/selection_study.md), and on seed 0 of `quality` / `math` 0.588 / 0.496 against 0.596 / 0.484,
  so ``"linear"`` is the default; ``"ratio"`` is the exact log-ratio above.
  """

  name: ClassVar[str] = "likelihood_ratio"
  closed_form: ClassVar[bool] = True
  fit_steps: int = 30
  temperature: float = 1.0
  # Adam at 1e-4 on the real model: AUROC 0.94-0.95 on `safety_matched` where the inner SGD at 1e-3
  # reached 0.68 in the same 30 fitting steps (docs/selection_study.md).
  fit_optimizer: str | None = "adam"
  fit_lr: float = 1e-4
  score: str = "linear"  # or "ratio" (the exact log-ratio; see the class docstring)

  def __post_init__(self):
    _check_score(self.score)  # at construction, not at the first traced scoring call

  @property
  def warmup_steps(self) -> int:
    return self.fit_steps

  def _fit_opt(self, problem):
    if self.fit_optimizer is None:
      return problem.inner_optimizer
    return sft.sgd_or_adam(self.fit_optimizer, self.fit_lr)

  def init_extra(self, problem, params):
    fit = jax.tree.map(jnp.copy, params)
    return {"fit_params": fit, "fit_opt_state": self._fit_opt(problem).init(fit)}

  def __call__(self, problem, state, logits, frozen, batches, key):
    del key
    batch, val = take(batches["train"], 0), batches["val"]
    fit, fit_s = state.extra["fit_params"], state.extra["fit_opt_state"]
    n = logits.shape[0]

    def fit_branch(_):
      ones = jnp.ones(jax.tree.leaves(val)[0].shape[0], jnp.float32)
      fit_batch = val if "index" in val else {**val, "index": jnp.zeros(ones.shape, jnp.int32)}
      new_fit, new_s, m = sft.inner_step(problem.loss_fn, self._fit_opt(problem), fit, frozen, fit_s,
                                         fit_batch, ones)
      zero = jnp.zeros((), logits.dtype)
      return jnp.zeros_like(logits), new_fit, new_s, m["nll"].astype(logits.dtype), zero

    def score_branch(_):
      s = likelihood_ratio_scores(problem.loss_fn, state.params, fit, frozen, batch, self.score)
      target = (s / self.temperature).astype(logits.dtype)
      idx = jnp.where(batch["index"] >= 0, batch["index"], n)  # padding -> out of range, dropped
      grad = jnp.zeros_like(logits).at[idx].set(logits[jnp.minimum(idx, n - 1)] - target,
                                                 mode="drop")
      f_fit = mean_loss(problem.loss_fn, fit, frozen, val).astype(logits.dtype)
      return grad, fit, fit_s, f_fit, mean_loss_of(s, batch).astype(logits.dtype)

    fitting = state.step < self.fit_steps
    grad, fit, fit_s, fit_val, score_mean = jax.lax.cond(fitting, fit_branch, score_branch, None)
    metrics = {"val_loss": fit_val, "train_loss": jnp.zeros((), logits.dtype),
               "fitting": fitting.astype(jnp.float32), "fit_val_loss": fit_val,
               "score_mean": score_mean}
    return _finish(grad, state, metrics, extra={"fit_params": fit, "fit_opt_state": fit_s})


# ----------------------------------------------------------------------------- registry


ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (Unroll, Penalty, PenaltyVF, Implicit, OneStep, LikelihoodRatio)}


def make_estimator(name: str, **kwargs) -> Estimator:
  """Builds the estimator called ``name`` from keyword settings (e.g. from a config dict).

  Raises:
    ValueError: for an unknown name or setting, listing the valid ones.
  """
  if name not in ESTIMATORS:
    raise ValueError(f"unknown hypergradient estimator {name!r}; expected one of {sorted(ESTIMATORS)}")
  cls = ESTIMATORS[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"estimator {name!r} has no setting(s) {unknown}; valid: {sorted(fields)}")
  return cls(**kwargs)
