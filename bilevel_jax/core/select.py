"""The ``select`` driver: a jitted outer step and a thin loop that learns one logit per example.

Usable from research code without the CLI::

    problem = hypergrad.Problem(sft.make_loss_fn(lora.make_logits_fn(spec, cfg)),
                                sft.sgd_or_adam("sgd", 1e-2))
    est = hypergrad.make_estimator("unroll", k=2)
    result = select.select(problem, est, trainable, frozen, num_examples=len(pool),
                           train_batches=select.epoch_batches(pool_arrays, 8, seed=0),
                           val_batches=select.cycle([val_batch]), num_steps=200)
    keep = weights.select_examples(result.weights, "top_p", fraction=0.8).keep

One outer step: the estimator returns ``grad_logits`` and its new state; the logits' own optax
optimizer (Adam, lr 0.05 by default; ``sgd(1)`` for closed-form estimators) applies the gradient.
The CLI loop (checkpoints, metrics files, resume) lives in ``bilevel_jax/loops.py`` and reuses
:func:`make_outer_step` and :class:`SelectState`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from bilevel_jax.core import hypergrad, weights as wts

Params = Any


class SelectState(NamedTuple):
  """Everything one outer step reads and writes (a pytree; checkpoint it as a whole).

  Attributes:
    est: the estimator's state (inner params, inner optimizer state, step, extras).
    logits: [N] weight logits ``omega``.
    logit_opt_state: the logits' optimizer state.
    step: int32 scalar, outer steps taken.
  """

  est: hypergrad.EstimatorState
  logits: Float[Array, "n"]
  logit_opt_state: Any
  step: Int[Array, ""]


class SelectResult(NamedTuple):
  """What :func:`select` returns.

  Attributes:
    logits: [N] final logits (numpy).
    weights: [N] final ``p(omega)`` (numpy).
    history: [H, N] logits recorded every ``history_every`` steps, the initial ones first.
    history_steps: [H] the outer step of each history row.
    metrics: one dict of floats per logged step (``step`` plus the estimator's metrics and weight
      statistics ``p_min``, ``p_max``, ``entropy``, ``ess``).
    state: the final :class:`SelectState` (device arrays), e.g. to continue or to read the inner
      model ``state.est.params``.
  """

  logits: np.ndarray
  weights: np.ndarray
  history: np.ndarray
  history_steps: np.ndarray
  metrics: list[dict]
  state: SelectState


def make_logit_optimizer(estimator: hypergrad.Estimator, name: str = "adam",
                         learning_rate: float = 0.05) -> optax.GradientTransformation:
  """``name`` (``"adam"`` or ``"sgd"``) on the logits at ``learning_rate``; ``sgd(1)`` for
  closed-form estimators whatever the name (one step assigns their value)."""
  if name not in ("adam", "sgd"):
    raise ValueError(f"logits optimizer {name!r}: use 'adam' or 'sgd'")
  if estimator.closed_form:
    return optax.sgd(1.0)
  return optax.adam(learning_rate) if name == "adam" else optax.sgd(learning_rate)


def init_state(problem: hypergrad.Problem, estimator: hypergrad.Estimator, params: Params,
               num_examples: int, logit_optimizer: optax.GradientTransformation,
               logits: Float[Array, "n"] | None = None) -> SelectState:
  """Fresh state: uniform logits (unless given) and the estimator's warm start at ``params``.

  ``params`` is copied, so donating the state in the outer step never invalidates the caller's model.
  """
  params = jax.tree.map(jnp.copy, params)
  if logits is None:
    leaves = jax.tree.leaves(params)
    dtype = leaves[0].dtype if leaves and jnp.issubdtype(leaves[0].dtype, jnp.floating) else jnp.float32
    logits = wts.init_logits(num_examples, dtype)
  return SelectState(est=estimator.init(problem, params), logits=logits,
                     logit_opt_state=logit_optimizer.init(logits), step=jnp.zeros((), jnp.int32))


def make_outer_step(problem: hypergrad.Problem, estimator: hypergrad.Estimator,
                    logit_optimizer: optax.GradientTransformation, *, jit: bool = True,
                    donate: bool = True, compiler_options: dict | None = None) -> Callable:
  """``outer_step(state, frozen, batches, key) -> (state, metrics)``.

  Args:
    problem, estimator: static; closed over.
    logit_optimizer: optax optimizer of the logits.
    jit: return the jitted step (state donated when ``donate``); ``False`` returns the pure function,
      e.g. to jit it with explicit ``in_shardings``/``out_shardings``.
    compiler_options: passed to ``jax.jit`` (tests use ``xla_backend_optimization_level=0`` to halve
      the compile time of tiny programs).
  """

  def outer_step(state: SelectState, frozen: Params, batches: dict, key: Array):
    grad, est, metrics = estimator(problem, state.est, state.logits, frozen, batches, key)
    updates, opt_state = logit_optimizer.update(grad, state.logit_opt_state, state.logits)
    logits = optax.apply_updates(state.logits, updates)
    p = problem.weights(logits)
    metrics = {**metrics, "p_min": jnp.min(p), "p_max": jnp.max(p), "entropy": wts.entropy(p),
               "ess": wts.effective_sample_size(p)}
    return SelectState(est=est, logits=logits, logit_opt_state=opt_state,
                       step=state.step + 1), metrics

  if not jit:
    return outer_step
  return jax.jit(outer_step, donate_argnums=(0,) if donate else (),
                 compiler_options=compiler_options)


# ----------------------------------------------------------------------------- batches


def cycle(batches: Iterable[dict]) -> Iterator[dict]:
  """Repeats a finite list of batches forever (e.g. one validation batch)."""
  return itertools.cycle(list(batches))


def epoch_batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0,
                  index_key: str = "index") -> Iterator[dict]:
  """Shuffled minibatches of an in-memory pool, epoch after epoch, forever.

  ``arrays`` holds per-example arrays with a common leading axis N; the yielded batches add
  ``index`` (the row in the pool, i.e. the logit) unless ``arrays`` already has one. The last batch of
  an epoch is padded with copies of row 0 marked ``index = -1`` so every batch has one shape.
  """
  n = len(next(iter(arrays.values())))
  if index_key not in arrays:
    arrays = {**arrays, index_key: np.arange(n, dtype=np.int32)}
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
      rows = order[start:start + batch_size]
      pad = batch_size - len(rows)
      take_rows = np.concatenate([rows, np.zeros(pad, np.int64)])
      batch = {k: np.asarray(v)[take_rows] for k, v in arrays.items()}
      if pad:
        batch[index_key] = batch[index_key].copy()
        batch[index_key][len(rows):] = -1
      yield batch


def stack_batches(batches: list[dict]) -> dict:
  """Stacks same-shaped batches on a new leading axis (the ``train`` entry of an outer step)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _to_host(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ----------------------------------------------------------------------------- the loop


def select(problem: hypergrad.Problem, estimator: hypergrad.Estimator, params: Params,
           frozen: Params, num_examples: int, train_batches: Iterator[dict],
           val_batches: Iterator[dict], num_steps: int, *,
           logit_optimizer: optax.GradientTransformation | None = None, seed: int = 0,
           state: SelectState | None = None, outer_step: Callable | None = None,
           history_every: int = 1, log_every: int = 1,
           callback: Callable[[int, dict], None] | None = None,
           progress: bool = False) -> SelectResult:
  """Learns the weight logits by ``num_steps`` outer steps.

  Args:
    problem: the bilevel problem (loss, inner optimizer, parametrization).
    estimator: a hypergradient estimator (``hypergrad.make_estimator``).
    params: trainable params to warm-start from (copied, never donated).
    frozen: frozen params (``{}`` when everything trains).
    num_examples: N, the length of the logit vector.
    train_batches: iterator of single train batches with ``index``; ``estimator.train_batches`` of
      them are stacked per outer step.
    val_batches: iterator of validation batches (one per outer step).
    num_steps: outer steps (for ``likelihood_ratio`` include its ``warmup_steps`` of fitting).
    logit_optimizer: defaults to :func:`make_logit_optimizer` (Adam).
    seed: root seed; step ``t`` gets ``fold_in(key(seed), t)``.
    state: resume from this state instead of a fresh one.
    outer_step: a prebuilt :func:`make_outer_step` result (reuses its compilation across runs).
    history_every: record the logits every this many steps (0: only the first and last).
    log_every: fetch metrics to the host every this many steps (each fetch waits for the device).
    callback: called as ``callback(step, metrics)`` after each logged step.
    progress: show a tqdm progress bar.
  Returns:
    A :class:`SelectResult`.
  """
  logit_optimizer = logit_optimizer or make_logit_optimizer(estimator)
  if state is None:
    state = init_state(problem, estimator, params, num_examples, logit_optimizer)
  outer_step = outer_step or make_outer_step(problem, estimator, logit_optimizer)
  root = jax.random.key(seed)
  history, history_steps, log = [np.asarray(state.logits)], [int(state.step)], []
  steps = range(num_steps)
  if progress:
    from tqdm import tqdm
    steps = tqdm(steps, desc=f"select ({estimator.name})")
  t = int(state.step)
  for _ in steps:
    batches = {"train": stack_batches([next(train_batches) for _ in range(estimator.train_batches)]),
               "val": next(val_batches)}
    state, metrics = outer_step(state, frozen, batches, jax.random.fold_in(root, t))
    if log_every and (t + 1) % log_every == 0:
      row = {"step": t + 1, **_to_host(metrics)}
      log.append(row)
      if callback is not None:
        callback(t + 1, row)
    if history_every and (t + 1) % history_every == 0:
      history.append(np.asarray(state.logits))
      history_steps.append(t + 1)
    t += 1
  if history_steps[-1] != t:
    history.append(np.asarray(state.logits))
    history_steps.append(t)
  logits = np.asarray(state.logits)
  return SelectResult(logits=logits, weights=np.asarray(problem.weights(jnp.asarray(logits))),
                      history=np.stack(history), history_steps=np.asarray(history_steps),
                      metrics=log, state=state)
