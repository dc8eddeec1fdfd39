"""Per-example data weights: parametrizations, selection rules and statistics.

Notation (DESIGN.md section 2): one logit per pool example, ``omega in R^N``, indexed by the stable
``example_id`` row of the pool. The weights ``p(omega)`` enter the lower level
``g(theta, omega) = mean_i p_i(omega) l_i(theta)``.

* ``softmax_n``: ``p = N * softmax(omega)`` (the default; SEAL's ``softmax`` selector). The weights
  sum to ``N``, so the mean weight is 1 and uniform logits give ``p_i = 1``. Every logit moves every
  weight through the normalizer.
* ``sigmoid2``: ``p = 2 * sigmoid(omega)`` (SEAL's ``sigmoid`` selector), each weight in (0, 2) and
  independent of the others; zero logits give ``p_i = 1``.

Both start uniform at ``omega = 0`` (:func:`init_logits`).

Selection rules turn weights into the data the final model is trained on: ``top_p`` keeps the best
fraction (SEAL keeps 80%), ``threshold`` keeps ``p_i >= tau`` (``tau = 1``: above uniform), ``soft``
keeps everything and trains on ``p_i`` itself.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

PARAMETRIZATIONS = ("softmax_n", "sigmoid2")
SELECTION_RULES = ("top_p", "threshold", "soft")


def softmax_n(logits: Float[Array, "n"]) -> Float[Array, "n"]:
  """``p = N * softmax(omega)``: mean weight 1, uniform at equal logits."""
  return logits.shape[-1] * jax.nn.softmax(logits, axis=-1)


def sigmoid2(logits: Float[Array, "n"]) -> Float[Array, "n"]:
  """``p = 2 * sigmoid(omega)``: each weight in (0, 2), 1 at ``omega = 0``."""
  return 2.0 * jax.nn.sigmoid(logits)


def weight_fn(name: str) -> Callable[[Float[Array, "n"]], Float[Array, "n"]]:
  """The parametrization called ``name`` (``softmax_n`` or ``sigmoid2``)."""
  if name == "softmax_n":
    return softmax_n
  if name == "sigmoid2":
    return sigmoid2
  raise ValueError(f"unknown weight parametrization {name!r}; expected one of {PARAMETRIZATIONS}")


def weights_from_logits(logits: Float[Array, "n"], name: str = "softmax_n") -> Float[Array, "n"]:
  """``p(omega)`` under the parametrization ``name``."""
  return weight_fn(name)(logits)


def init_logits(n: int, dtype=jnp.float32) -> Float[Array, "n"]:
  """Zero logits: uniform weights ``p_i = 1`` under both parametrizations."""
  return jnp.zeros((n,), dtype)


def gather_weights(p: Float[Array, "n"], index: Int[Array, "b"]) -> Float[Array, "b"]:
  """Weights of the rows of a batch; padding rows (``index < 0``) get weight 0.

  Differentiating through this gather sends each row's gradient to its logit (a scatter-add, so a
  row seen twice in a batch adds up) and nothing to the padding rows.
  """
  safe = jnp.maximum(index, 0)
  return jnp.where(index >= 0, p[safe], jnp.zeros((), p.dtype))


def logits_for_weights(p: Float[Array, "n"], name: str = "softmax_n") -> Float[Array, "n"]:
  """Logits whose weights are ``p`` (inverse of the parametrization, up to softmax's shift).

  For ``softmax_n``, ``p`` is renormalized to sum to N; for ``sigmoid2`` it is clipped into (0, 2).
  """
  p = jnp.asarray(p)
  if name == "softmax_n":
    log_p = jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))
    return log_p - jnp.mean(log_p)
  if name == "sigmoid2":
    q = jnp.clip(p / 2.0, 1e-7, 1 - 1e-7)
    return jnp.log(q) - jnp.log1p(-q)
  raise ValueError(f"unknown weight parametrization {name!r}; expected one of {PARAMETRIZATIONS}")


# ----------------------------------------------------------------------------- selection


class Selection(NamedTuple):
  """What the final model trains on.

  Attributes:
    keep: bool [N], the examples that stay in the training set.
    train_weights: float [N], per-example weights for the final fine-tune: 1 on kept rows and 0
      elsewhere for ``top_p``/``threshold``, ``p`` itself for ``soft``.
  """

  keep: Bool[np.ndarray, "n"]
  train_weights: Float[np.ndarray, "n"]


def top_p_count(n: int, fraction: float) -> int:
  """How many of ``n`` examples ``top_p`` keeps: ``round(fraction * n)``, halves rounded up."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"top_p fraction must be in [0, 1], got {fraction}")
  return int(math.floor(fraction * n + 0.5))


def top_p(p: Float[Array, "n"], fraction: float = 0.8) -> Bool[np.ndarray, "n"]:
  """Keeps exactly :func:`top_p_count` examples, the highest weights; ties go to the lower index."""
  p = np.asarray(p)
  k = top_p_count(p.shape[0], fraction)
  order = np.argsort(-p, kind="stable")  # stable: equal weights keep pool order
  keep = np.zeros(p.shape[0], bool)
  keep[order[:k]] = True
  return keep


def threshold(p: Float[Array, "n"], tau: float = 1.0) -> Bool[np.ndarray, "n"]:
  """Keeps ``p_i >= tau`` (``tau = 1``: at least the uniform weight)."""
  return np.asarray(p) >= tau


def select_examples(p: Float[Array, "n"], rule: str = "top_p", *, fraction: float = 0.8,
           tau: float = 1.0) -> Selection:
  """Applies a selection rule to the learned weights.

  Args:
    p: weights ``p(omega)``, one per pool example.
    rule: ``top_p`` (keep the best ``fraction``), ``threshold`` (keep ``p >= tau``) or ``soft``
      (keep all, train on ``p``).
    fraction: the share ``top_p`` keeps.
    tau: the cut ``threshold`` uses.
  Returns:
    A :class:`Selection` (numpy arrays; selection happens once, outside any jit).
  """
  p = np.asarray(p, np.float64)
  if rule == "top_p":
    keep = top_p(p, fraction)
  elif rule == "threshold":
    keep = threshold(p, tau)
  elif rule == "soft":
    return Selection(keep=np.ones(p.shape[0], bool), train_weights=p.astype(np.float32))
  else:
    raise ValueError(f"unknown selection rule {rule!r}; expected one of {SELECTION_RULES}")
  return Selection(keep=keep, train_weights=keep.astype(np.float32))


# ----------------------------------------------------------------------------- statistics


def normalized(p: Float[Array, "n"]) -> Float[Array, "n"]:
  """``p / sum(p)``, the weights as a distribution over the pool."""
  return p / jnp.sum(p)


def entropy(p: Float[Array, "n"]) -> Float[Array, ""]:
  """Entropy (nats) of ``p / sum(p)``; ``log N`` for uniform weights."""
  q = normalized(p)
  return -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0))


def effective_sample_size(p: Float[Array, "n"]) -> Float[Array, ""]:
  """Kish's effective sample size ``(sum p)^2 / sum p^2``; N for uniform weights, 1 for one-hot."""
  return jnp.sum(p) ** 2 / jnp.sum(p * p)


def mass_per_source(p: Float[Array, "n"], source_ids: Int[Array, "n"],
                    num_sources: int) -> tuple[Float[Array, "s"], Float[Array, "s"]]:
  """Share of the total weight and mean weight of each source.

  Args:
    p: weights.
    source_ids: integer source of each example, in ``0..num_sources-1``.
    num_sources: number of sources (static).
  Returns:
    ``(share, mean)``: ``share[s] = sum_{i in s} p_i / sum_i p_i`` and ``mean[s]`` the mean weight of
    source ``s`` (0 for an empty source).
  """
  total = jax.ops.segment_sum(p, source_ids, num_segments=num_sources)
  count = jax.ops.segment_sum(jnp.ones_like(p), source_ids, num_segments=num_sources)
  return total / jnp.sum(p), total / jnp.maximum(count, 1.0)


def weight_stats(p: Float[Array, "n"], source_ids: Int[Array, "n"] | None = None,
                 source_names: list[str] | tuple[str, ...] | None = None) -> dict[str, float]:
  """Summary of a weight vector as plain floats (for ``metrics.jsonl`` and reports).

  Keys: ``entropy``, ``entropy_ratio`` (entropy / log N), ``ess``, ``ess_ratio`` (ESS / N),
  ``p_min``, ``p_max``, ``p_mean``, ``above_uniform`` (share with ``p >= 1``) and, with sources,
  ``mass/<name>`` and ``mean_p/<name>`` per source.
  """
  p = jnp.asarray(p)
  n = p.shape[0]
  out = {"entropy": float(entropy(p)), "ess": float(effective_sample_size(p)),
         "p_min": float(jnp.min(p)), "p_max": float(jnp.max(p)), "p_mean": float(jnp.mean(p)),
         "above_uniform": float(jnp.mean(p >= 1.0))}
  out["entropy_ratio"] = out["entropy"] / math.log(n) if n > 1 else 1.0
  out["ess_ratio"] = out["ess"] / n
  if source_ids is not None:
    source_ids = jnp.asarray(source_ids)
    k = len(source_names) if source_names is not None else int(jnp.max(source_ids)) + 1
    names = list(source_names) if source_names is not None else [str(s) for s in range(k)]
    share, mean = mass_per_source(p, source_ids, k)
    for s, name in enumerate(names):
      out[f"mass/{name}"] = float(share[s])
      out[f"mean_p/{name}"] = float(mean[s])
  return out
