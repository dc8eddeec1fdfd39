"""The interface every hypergradient estimator implements, and the helpers they share.

The estimators themselves are in ``hypergrad.py`` (the registry, chosen by name) and ``unroll.py``.

The problem (DESIGN.md section 2): per-example weights ``p(omega)``, lower level
``g(theta, omega) = mean_i p_i(omega) l_i(theta)``, upper level ``f(theta) = mean_j l'_j(theta)``
on validation data, ``min_omega f(theta*(omega))``.

Every estimator is a frozen, hashable config object (a static jit argument) with

* ``init(problem, params) -> EstimatorState`` and
* ``__call__(problem, state, logits, frozen, batches, key) -> (grad_logits, new_state, metrics)``,

a pure function: ``state`` carries the warm-started inner params and optimizer state (truncation)
and the schedule position; ``batches = {"train": stacked, "val": batch}`` where ``stacked`` holds
``estimator.train_batches`` train batches stacked on a leading axis (every train batch has ``index``,
its rows in the logit vector, -1 for padding rows) and ``val`` is one validation batch (an optional
``index`` there only marks padding with -1). ``grad_logits`` has the shape of ``logits``; gradients
reach the logits of the rows that were used through a gather (a scatter-add in the backward pass),
plus, for ``softmax_n``, every logit through the normalizer. The outer optimizer (Adam by default,
see ``bilevel_jax/core/select.py``) applies it.

The loss is generic: ``problem.loss_fn(trainable, frozen, batch) -> [B]`` per-example losses
(``bilevel_jax/core/sft.py`` builds it for the decoder; a ridge problem passes a vector and ``{}``).
``key`` is accepted for a uniform signature; no estimator here is stochastic beyond its batches.

Every ``metrics`` dict has ``val_loss``, ``train_loss`` (weighted ``g`` on the train batch) and
``hypergrad_norm``; estimator-specific keys are listed on each class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from bilevel_jax.core import sft, weights as wts

Params = Any


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static description of the bilevel problem (hashable, so usable as a static jit argument).

  Attributes:
    loss_fn: per-example loss ``loss_fn(trainable, frozen, batch) -> [B]``.
    inner_optimizer: optax optimizer of the lower level (``sft.sgd_or_adam``; SGD by default:
      hypergradients through Adam are fragile in f32, DESIGN.md section 7).
    parametrization: ``softmax_n`` or ``sigmoid2`` (``bilevel_jax/core/weights.py``).
  """

  loss_fn: sft.LossFn
  inner_optimizer: optax.GradientTransformation
  parametrization: str = "softmax_n"

  def weights(self, logits: Float[Array, "n"]) -> Float[Array, "n"]:
    return wts.weight_fn(self.parametrization)(logits)


class EstimatorState(NamedTuple):
  """What an estimator carries from one outer step to the next (a pytree).

  Attributes:
    params: the inner (trainable) params ``theta``, warm-started across outer steps.
    opt_state: their inner optimizer state.
    step: int32 scalar, outer steps taken (schedules read it).
    extra: estimator-specific arrays (``{}`` unless the class says otherwise).
  """

  params: Params
  opt_state: Any
  step: Int[Array, ""]
  extra: dict


# ----------------------------------------------------------------------------- shared pieces


def valid_mask(batch: dict, losses: Float[Array, "b"]) -> Float[Array, "b"]:
  """1 for real rows, 0 for padding (``index < 0``); all ones when the batch has no ``index``."""
  if "index" in batch:
    return (batch["index"] >= 0).astype(losses.dtype)
  return jnp.ones_like(losses)


def mean_loss(loss_fn: sft.LossFn, params: Params, frozen: Params, batch: dict) -> Float[Array, ""]:
  """Unweighted mean per-example loss over the real rows (``f`` on a validation batch)."""
  losses = loss_fn(params, frozen, batch)
  valid = valid_mask(batch, losses)
  return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def row_weights(problem: Problem, logits: Float[Array, "n"], batch: dict) -> Float[Array, "b"]:
  """``p(omega)[index]`` for the rows of a train batch (0 on padding rows)."""
  return wts.gather_weights(problem.weights(logits), batch["index"])


def logits_vjp(problem: Problem, logits: Float[Array, "n"], batch: dict,
               row_grad: Float[Array, "b"]) -> Float[Array, "n"]:
  """Pulls a gradient w.r.t. the batch's row weights back to the logits (scatter-add)."""
  _, vjp = jax.vjp(lambda lg: row_weights(problem, lg, batch), logits)
  return vjp(row_grad.astype(logits.dtype))[0]


def take(stacked: dict, i: int) -> dict:
  """Batch ``i`` of a stack of batches."""
  return jax.tree.map(lambda x: x[i], stacked)


def directional_losses(loss_fn: sft.LossFn, params: Params, frozen: Params, batch: dict,
                       direction: Params) -> Float[Array, "b"]:
  """``grad l_i(theta) . direction`` for every row, by one forward-mode pass (``jax.jvp``)."""
  return jax.jvp(lambda th: loss_fn(th, frozen, batch), (params,), (direction,))[1]


def _weighted_step(problem: Problem, params, opt_state, frozen, batch, w):
  return sft.inner_step(problem.loss_fn, problem.inner_optimizer, params, frozen, opt_state,
                        batch, w)


def _plain_steps(problem: Problem, params, opt_state, frozen, stacked, p):
  """Inner steps on each batch of ``stacked`` with fixed weights ``p`` (not differentiated)."""
  p = jax.lax.stop_gradient(p)

  def body(carry, batch):
    th, s = carry
    th, s, m = _weighted_step(problem, th, s, frozen, batch, wts.gather_weights(p, batch["index"]))
    return (th, s), m

  (params, opt_state), ms = jax.lax.scan(body, (params, opt_state), stacked)
  return params, opt_state, ms


def _remat(fn, policy: str | None, prevent_cse: bool = False):
  """``jax.checkpoint(fn)`` with a policy named in ``jax.checkpoint_policies`` (None: no remat).

  ``prevent_cse=False`` suits a step inside ``lax.scan`` (the loop keeps XLA from merging the
  recomputation with the forward pass); a step in straight-line code needs ``True``, or XLA's CSE
  merges the two and the residuals are stored after all.
  """
  if policy in (None, "none"):
    return fn
  _check_remat_policy(policy)
  return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=prevent_cse)


def _check_remat_policy(policy: str | None) -> None:
  if policy not in (None, "none") and not hasattr(jax.checkpoint_policies, policy):
    raise ValueError(f"unknown remat policy {policy!r}; use None or a name in jax.checkpoint_policies")


def _linear_schedule(step, start: float, end: float, steps: int, every: int = 1):
  """``start`` moving linearly to ``end`` over ``steps`` changes, one change every ``every`` steps."""
  t = jnp.minimum((step // max(every, 1)).astype(jnp.result_type(float)), float(max(steps, 0)))
  frac = t / max(steps, 1)
  return start + (end - start) * frac


# ----------------------------------------------------------------------------- base class


@dataclasses.dataclass(frozen=True)
class Estimator:
  """Base class: one outer step's hypergradient. Subclasses are frozen dataclasses."""

  name: ClassVar[str] = ""
  # True when grad_logits is the gradient of 0.5 * ||omega_rows - target||^2, so that one SGD step
  # of size 1 assigns the closed-form logits (``likelihood_ratio``); the driver then uses sgd(1).
  closed_form: ClassVar[bool] = False

  @property
  def train_batches(self) -> int:
    """How many train batches one call consumes (stacked on a leading axis)."""
    return 1

  @property
  def warmup_steps(self) -> int:
    """Outer steps spent before the logits get any gradient (``likelihood_ratio``'s fitting)."""
    return 0

  def init(self, problem: Problem, params: Params) -> EstimatorState:
    """Initial state: ``params`` as the warm start and a fresh inner optimizer state."""
    return EstimatorState(params=params, opt_state=problem.inner_optimizer.init(params),
                          step=jnp.zeros((), jnp.int32), extra=self.init_extra(problem, params))

  def init_extra(self, problem: Problem, params: Params) -> dict:
    del problem, params
    return {}

  def __call__(self, problem: Problem, state: EstimatorState, logits: Float[Array, "n"],
               frozen: Params, batches: dict, key: Array
               ) -> tuple[Float[Array, "n"], EstimatorState, dict]:
    raise NotImplementedError


def _finish(grad, state: EstimatorState, metrics: dict, **updates):
  metrics = {**metrics, "hypergrad_norm": jnp.linalg.norm(grad)}
  return grad, state._replace(step=state.step + 1, **updates), metrics
