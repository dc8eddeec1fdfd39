"""``unroll``: the hypergradient through ``K`` truncated inner steps (the design card's estimator).

Two reverse passes, the same gradient: autodiff through a rematerialized ``lax.scan`` and a
hand-written adjoint (the default), optionally keeping the steps' linearizations
(``Unroll.keep_linearization``). Registered by name in ``hypergrad.py``; the interface is in
``estimator.py``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from bilevel_jax.core import sft, weights as wts
from bilevel_jax.core.estimator import (
    Estimator, EstimatorState, Problem, _check_remat_policy, _finish, _remat, _weighted_step,
    directional_losses, mean_loss, take)


@dataclasses.dataclass(frozen=True)
class Unroll(Estimator):
  """Exact ``d f(theta_K) / d omega`` through ``K`` inner optimizer steps (truncated back-prop).

  The inner state is warm-started from the previous outer step and only these ``K`` steps are
  differentiated (Shaban et al., "Truncated back-propagation for bilevel optimization", AISTATS
  2019; the design card of this project). The inner optimizer is ``problem.inner_optimizer`` (SGD by
  default; Adam needs ``eps_root > 0``).

  Two reverse passes give the same gradient (tests, float64), chosen by ``backward``:

  * ``"adjoint"`` (default): the reverse pass written out step by step (``_adjoint_unroll``): one
    forward-over-reverse Hessian-vector product per step after the first, which gives the row
    weights' cotangents too, and only forward-mode tangents for the first step (``theta_0`` is a
    constant). It stores ``(theta_k, s_k, G_k)`` per step, no activations. Measured on
    SmolLM2-135M (docs/benchmarks.md, nearly idle CPU): K = 1 / 2 / 4 at 2.7 / 6.1 / 11.1 x the SFT
    step with LoRA (2.5 / 6.4 / 12.6 x full); in one run K = 2 took 5.1 x at 2.7 GiB against
    autodiff's 9.0 x at 4.5 GiB.
  * ``"autodiff"``: ``jax.value_and_grad`` through the ``K`` steps in ``lax.scan``, the scanned step
    under ``jax.checkpoint`` (``remat_policy``, a name from ``jax.checkpoint_policies``, or None):
    the backward pass recomputes each step's activations instead of storing all ``K`` of them. With
    ``peel_first`` the first step runs before the scan, so that its backward skips the
    Hessian-vector product through ``theta_0`` that the scan's shared transposed body would compute
    and discard; peeling made K = 2 1.4 x faster but stored the peeled step's activations and, with
    only one step left (XLA inlines it), the second one's too: 7.4 GiB instead of 4.5 GiB. Its
    default (``None``) therefore peels only from ``K = 3`` on.

  ``keep_linearization`` (adjoint only) trades memory for the primal recomputations of the reverse
  pass (``_kept_adjoint_unroll``): ``"first"`` takes the first step by ``jax.linearize``, so its
  reverse pass is a tangent pass only; ``"all"`` keeps every step's linearized gradient too, so no
  Hessian-vector product repeats its step's forward and backward (the residuals that
  ``torch.func``'s reverse-over-reverse keeps). Measured on SmolLM2-135M (f32, B = 4, T = 128, a
  2-core AMD EPYC; docs/benchmarks.md): K = 1 ``"first"`` 0.84 x the time of ``"none"`` with LoRA
  at +0.09 GiB, 0.85 x full at +0.20 GiB, hence the default ``"auto"`` (``"first"`` at K = 1 only);
  K = 2 ``"all"`` 0.84 x with LoRA at 2.4 x the memory (7.1 vs 2.9 GiB), 0.88 x full at 1.5 x
  (10.3 vs 6.7 GiB); K = 2 ``"first"`` 0.92 x at 2 x the memory with LoRA (the later steps run
  as straight-line code, where XLA merges a Hessian-vector product's recomputation with its
  step's forward pass and keeps those activations alive), so "auto" leaves K >= 2 alone.

  Consumes ``k`` train batches. Extra metrics: ``train_nll`` (mean of the K steps).
  """

  name: ClassVar[str] = "unroll"
  k: int = 2
  remat_policy: str | None = "nothing_saveable"  # autodiff only
  # autodiff only: take the first inner step outside the scan (same gradient; see the class
  # docstring). None: only when k >= 3.
  peel_first: bool | None = None
  # autodiff only: ``unroll`` of the ``lax.scan`` over the (remaining) steps: 1, an int, or True.
  scan_unroll: int | bool = 1
  # "adjoint" (the reverse pass by hand) or "autodiff" (through the scan; the settings above apply
  # to it only). Same gradient; see the class docstring.
  backward: str = "adjoint"
  # adjoint only: which inner steps keep their linearization from the forward pass, so that the
  # reverse pass evaluates only its tangent part (see ``_kept_adjoint_unroll``): "none" (recompute
  # every step's primal: least memory), "first" (one step's activations more) or "all" (every
  # step's residuals, as reverse-over-reverse keeps them); "auto": "first" at k = 1, else "none"
  # (the class docstring has the measurements behind it).
  keep_linearization: str = "auto"

  def __post_init__(self):
    if self.backward not in UNROLL_BACKWARDS:
      raise ValueError(f"unknown unroll backward {self.backward!r}; use one of {UNROLL_BACKWARDS}")
    if self.keep_linearization not in UNROLL_KEEP:
      raise ValueError(f"unknown keep_linearization {self.keep_linearization!r}; use one of "
                       f"{UNROLL_KEEP}")
    if self.keep_linearization not in ("auto", "none") and self.backward != "adjoint":
      raise ValueError("keep_linearization applies to backward='adjoint' only")
    _check_remat_policy(self.remat_policy)  # at construction, whichever backward

  @property
  def kept_linearizations(self) -> str:
    """``keep_linearization`` with "auto" resolved: "first" at ``k = 1``, else "none"."""
    if self.keep_linearization == "auto":
      return "first" if self.k == 1 else "none"
    return self.keep_linearization

  @property
  def train_batches(self) -> int:
    return self.k

  def __call__(self, problem, state, logits, frozen, batches, key):
    del key
    if self.backward == "adjoint":
      keep = self.kept_linearizations
      if keep == "none":
        grad, params, opt_state, metrics = _adjoint_unroll(problem, state, logits, frozen, batches)
      else:
        grad, params, opt_state, metrics = _kept_adjoint_unroll(
            problem, state, logits, frozen, batches, keep_all=keep == "all")
      return _finish(grad, state, metrics, params=params, opt_state=opt_state)

    def plain(th, s, p, fz, b):
      return _weighted_step(problem, th, s, fz, b, wts.gather_weights(p, b["index"]))

    def outer(lg):
      p = problem.weights(lg)

      def run(fn):
        def body(carry, batch):
          th, s, m = fn(carry[0], carry[1], p, frozen, batch)
          return (th, s), m
        return body

      carry, train, ms = (state.params, state.opt_state), batches["train"], []
      scanned = self.k
      peel = self.k >= 3 if self.peel_first is None else self.peel_first
      if peel and self.k >= 1:
        # Straight-line code: XLA may merge the recomputation with the forward here, which only
        # stores the residuals of the logits path (theta_0 is a constant).
        carry, m = run(_remat(plain, self.remat_policy))(carry, take(train, 0))
        ms.append(jax.tree.map(lambda x: x[None], m))
        train, scanned = jax.tree.map(lambda x: x[1:], train), self.k - 1
      if scanned == 1 and peel:
        # One step left (XLA would inline a scan of length 1): barriers against CSE with the forward.
        # On the real model this still stored the step's activations (class docstring).
        carry, m = run(_remat(plain, self.remat_policy, prevent_cse=True))(carry, take(train, 0))
        ms.append(jax.tree.map(lambda x: x[None], m))
      elif scanned >= 1:
        carry, m = jax.lax.scan(run(_remat(plain, self.remat_policy)), carry, train,
                                unroll=self.scan_unroll)
        ms.append(m)
      ms = jax.tree.map(lambda *xs: jnp.concatenate(xs), *ms)
      th, s = carry
      return mean_loss(problem.loss_fn, th, frozen, batches["val"]), (th, s, ms)

    (f, (params, opt_state, ms)), grad = jax.value_and_grad(outer, has_aux=True)(logits)
    metrics = _unroll_metrics(f, ms)
    return _finish(grad, state, metrics, params=params, opt_state=opt_state)


UNROLL_BACKWARDS = ("autodiff", "adjoint")


UNROLL_KEEP = ("auto", "none", "first", "all")


def _float_part(s):
  """The optimizer state's float leaves (the ones with cotangents; step counts are ints)."""
  return [x for x in jax.tree.leaves(s) if jnp.issubdtype(x.dtype, jnp.inexact)]


def _update_pullback(problem: Problem, th, s, g, ct_th, ct_s):
  """Pulls the cotangents of ``(theta_{k+1}, float leaves of s_{k+1})`` back through the inner
  optimizer update ``apply(theta_k, s_k, G_k)``: ``(ct theta_k, ct s_k floats, u = ct G_k)``."""

  def apply_on_floats(th_, floats, g_):
    leaves, treedef = jax.tree.flatten(s)
    it = iter(floats)
    leaves = [next(it) if jnp.issubdtype(x.dtype, jnp.inexact) else x for x in leaves]
    th_, s_ = sft.apply_update(problem.inner_optimizer, th_, jax.tree.unflatten(treedef, leaves),
                               g_)
    return th_, _float_part(s_)

  _, apply_vjp = jax.vjp(apply_on_floats, th, _float_part(s), g)
  return apply_vjp((ct_th, ct_s))


def _grad_and_losses(problem: Problem, th, frozen, batch, w):
  """``(grad_theta g(theta, w), per-row losses)`` on one batch."""
  (_, losses), grad = jax.value_and_grad(sft.weighted_loss, argnums=1, has_aux=True)(
      problem.loss_fn, th, frozen, batch, w)
  return grad, losses


def _hvp_and_loss_tangents(problem: Problem, th, frozen, batch, w, u):
  """``(H u, grad l_i . u)`` at ``theta`` by one forward-over-reverse pass."""
  _, (hvp, loss_tangents) = jax.jvp(
      lambda t: _grad_and_losses(problem, t, frozen, batch, w), (th,), (u,))
  return hvp, loss_tangents


def _row_pullback(p, batch, loss_tangents):
  """``d <u, grad_theta g(theta, p)> / d p`` from ``grad l_i . u`` (a scatter-add over rows)."""
  w = wts.gather_weights(p, batch["index"])
  _, w_vjp = jax.vjp(lambda w_: sft.weighted_mean(loss_tangents, w_, sft.valid_rows(batch)), w)
  _, gather_vjp = jax.vjp(lambda p_: wts.gather_weights(p_, batch["index"]), p)
  return gather_vjp(w_vjp(jnp.ones((), loss_tangents.dtype))[0])[0]


def _unroll_metrics(val_loss, step_metrics: dict) -> dict:
  """``val_loss`` and the K inner steps' mean ``train_loss`` / ``train_nll``."""
  return {"val_loss": val_loss, "train_loss": jnp.mean(step_metrics["loss"]),
          "train_nll": jnp.mean(step_metrics["nll"])}


def _adjoint_unroll(problem: Problem, state: EstimatorState, logits, frozen, batches):
  """``d f(theta_K) / d omega`` through the inner steps, with the reverse pass written by hand.

  Step ``k`` is ``(theta_{k+1}, s_{k+1}) = apply(theta_k, s_k, G_k)`` with
  ``G_k = grad_theta g_k(theta_k, p)``. Going back from ``v = grad f(theta_K)``, each step pulls
  the cotangent through the (elementwise) optimizer update by ``jax.vjp``, which gives the
  cotangent ``u`` of ``G_k``; then one forward-over-reverse pass at ``theta_k`` along ``u`` gives
  both the Hessian-vector product ``H_k u`` (added to the cotangent of ``theta_k``) and, as the
  tangents of the per-example losses, ``grad l_i . u``, which is ``u``'s pull-back to the row
  weights (``g_k`` is linear in the losses). ``theta_0`` is the warm start, a constant, so the first
  step needs only the forward-mode tangents (``directional_losses``), no Hessian-vector product.

  Autodiff through a rematerialized ``lax.scan`` recomputes each step's forward pass and then
  transposes its backward pass (and, from K = 2 on, takes the Hessian-vector product through the
  constant ``theta_0`` too); here a step's whole backward is that one forward-over-reverse pass.
  The forward stores ``(theta_k, s_k, G_k)`` per step, no activations. All ``K`` backward steps
  run in one reverse scan, the first step's shortcut a ``lax.cond``: with the first step taken
  outside, K = 2 left a scan of length one, which XLA inlines, and its program then needed
  3.8 GiB of temporaries on the real model with LoRA instead of 2.2. The gradient is the same as
  autodiff's (tests, float64).
  """
  p, p_vjp = jax.vjp(problem.weights, logits)

  def forward(carry, batch):
    th, s = carry
    g, m = sft.weighted_grad(problem.loss_fn, th, frozen, batch,
                             wts.gather_weights(p, batch["index"]))
    return sft.apply_update(problem.inner_optimizer, th, s, g), ((th, s, g), m)

  train = batches["train"]
  (params, opt_state), (trajectory, ms) = jax.lax.scan(
      forward, (state.params, state.opt_state), train)
  f, v = jax.value_and_grad(mean_loss, argnums=1)(problem.loss_fn, params, frozen, batches["val"])

  def backward(carry, xs):
    ct_th, ct_s, ct_p = carry
    (th, s, g), batch, first = xs
    ct_th, ct_s, u = _update_pullback(problem, th, s, g, ct_th, ct_s)
    w = wts.gather_weights(p, batch["index"])

    def later():
      hvp, loss_tangents = _hvp_and_loss_tangents(problem, th, frozen, batch, w, u)
      return jax.tree.map(jnp.add, ct_th, hvp), loss_tangents

    def first_step():
      # theta_0 is a constant (the warm start): only the row weights need the cotangent.
      return ct_th, directional_losses(problem.loss_fn, th, frozen, batch, u)

    ct_th, loss_tangents = jax.lax.cond(first, first_step, later)
    return (ct_th, ct_s, ct_p + _row_pullback(p, batch, loss_tangents)), None

  k = jax.tree.leaves(train)[0].shape[0]
  carry = (v, [jnp.zeros_like(x) for x in _float_part(opt_state)], jnp.zeros_like(p))
  (_, _, ct_p), _ = jax.lax.scan(backward, carry, (trajectory, train, jnp.arange(k) == 0),
                                 reverse=True)
  (grad,) = p_vjp(ct_p)
  metrics = _unroll_metrics(f, ms)
  return grad, params, opt_state, metrics


def _kept_adjoint_unroll(problem: Problem, state: EstimatorState, logits, frozen, batches,
                         keep_all: bool):
  """``_adjoint_unroll``'s gradient, with the steps' linearizations kept from the forward pass.

  ``_adjoint_unroll`` stores ``(theta_k, s_k, G_k)`` and recomputes each step's primal in the
  reverse pass: the first step's forward-mode tangents repeat its forward pass, and every later
  step's forward-over-reverse pass repeats its forward and backward. Here the first step is taken
  by ``jax.linearize`` of the per-row losses (its gradient by the linear map's transpose, as
  ``jax.vjp`` does), so the reverse pass evaluates only the tangent part (``grad l_i . u``); with
  ``keep_all`` every later step is ``jax.linearize`` of ``(grad_theta g, losses)`` too, so its
  Hessian-vector product skips the primal forward and backward, at the price of storing that
  step's residuals (activations and backward intermediates) until the reverse pass reaches it.
  ``torch.func``'s reverse-over-reverse keeps the same residuals. The steps run as straight-line
  code (K is small), since a linearization cannot be a ``lax.scan`` carry. Same gradient, state
  and metrics as ``_adjoint_unroll`` (tests, float64).
  """
  p, p_vjp = jax.vjp(problem.weights, logits)
  train = batches["train"]
  k = jax.tree.leaves(train)[0].shape[0]
  th, s = state.params, state.opt_state
  saved, ms = [], []
  for i in range(k):
    batch = take(train, i)
    w = wts.gather_weights(p, batch["index"])
    if i == 0:
      losses, lin = jax.linearize(lambda t, b=batch: problem.loss_fn(t, frozen, b), th)
      _, w_mean_vjp = jax.vjp(lambda ls: sft.weighted_mean(ls, w, sft.valid_rows(batch)), losses)
      (ct_losses,) = w_mean_vjp(jnp.ones((), losses.dtype))
      (g,) = jax.linear_transpose(lin, th)(ct_losses)
    elif keep_all:
      (g, losses), lin = jax.linearize(
          lambda t, b=batch, w_=w: _grad_and_losses(problem, t, frozen, b, w_), th)
    else:
      g, losses = _grad_and_losses(problem, th, frozen, batch, w)
      lin = None
    ms.append(sft.step_metrics(losses, w, batch))
    saved.append((th, s, g, lin))
    th, s = sft.apply_update(problem.inner_optimizer, th, s, g)
  params, opt_state = th, s
  f, ct_th = jax.value_and_grad(mean_loss, argnums=1)(problem.loss_fn, params, frozen,
                                                      batches["val"])
  ct_s = [jnp.zeros_like(x) for x in _float_part(opt_state)]
  ct_p = jnp.zeros_like(p)
  for i in reversed(range(k)):
    th_i, s_i, g_i, lin = saved[i]
    batch = take(train, i)
    ct_th, ct_s, u = _update_pullback(problem, th_i, s_i, g_i, ct_th, ct_s)
    if i == 0:  # theta_0 is a constant: only the row weights need the cotangent
      loss_tangents = lin(u)
    elif keep_all:
      hvp, loss_tangents = lin(u)
      ct_th = jax.tree.map(jnp.add, ct_th, hvp)
    else:
      hvp, loss_tangents = _hvp_and_loss_tangents(
          problem, th_i, frozen, batch, wts.gather_weights(p, batch["index"]), u)
      ct_th = jax.tree.map(jnp.add, ct_th, hvp)
    ct_p = ct_p + _row_pullback(p, batch, loss_tangents)
  (grad,) = p_vjp(ct_p)
  ms = jax.tree.map(lambda *xs: jnp.stack(xs), *ms)
  metrics = _unroll_metrics(f, ms)
  return grad, params, opt_state, metrics
