"""Importance weights for regenerated responses (online self-refining generation, "BMO").

When the online loop (``bilevel_jax.refine``) replaces a question's response by ``G`` responses sampled
from the policy, the model keeps training for ``F`` more steps before it samples again, so the responses
become off-policy. Each regenerated token is weighted by how much more (or less) likely the current
model makes it than the model that sampled it.

Where the formulas come from:

* :func:`token_importance_weights` is the clipped token-level ratio
  ``w_t = stop_grad(min(exp(log pi_theta(y_t) - max(log pi_gen(y_t), -30)), c))`` with ``c = 10``.
  It follows the authors' public code as quoted in this project's DESIGN.md (section 2, "Online
  self-refinement"). The paper's own closed-form weight (arXiv 2511.21056) could not be read from any
  stored source, so this is *the authors' code*, not a formula checked against the paper.
  The floor on ``log pi_gen`` keeps a token the generator found nearly impossible from producing an
  overflowing ratio; the cap ``c`` bounds the variance, as in clipped importance sampling
  (e.g. PPO-style ratios). With the floor and cap inactive, ``E_{y ~ pi_gen}[w(y) f(y)] =
  E_{y ~ pi_theta}[f(y)]`` per token: the weighted SFT gradient on stale samples estimates the one on
  fresh samples.
* :func:`self_normalized_response_weights` is the per-response, self-normalized variant listed as an
  option in DESIGN.md: ``w_i proportional to exp(log pi_ref(y_i) - log pi_gen(y_i))`` for a reference
  model ``pi_ref`` (e.g. a copy fitted on the validation set), normalized over the ``G`` responses of the
  same question so that they average 1. This is standard self-normalized importance sampling (Owen,
  "Monte Carlo theory, methods and examples", 2013, ch. 9), not a formula from the paper. It moves the
  regenerated answers towards ``pi_ref`` instead of only correcting for staleness.
* :func:`importance_weighted_nll` is the per-example SFT loss of ``bilevel_jax.core.sft`` with each
  response token's log-likelihood multiplied by its weight:
  ``l_i = -(1 / |y_i|) sum_t w_{i,t} log pi_theta(y_{i,t} | x_i, y_{i,<t})``.

Every function is pure and jit-able; weights never carry gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bilevel_jax.core import sft

Params = Any
CLIP_DEFAULT = 10.0
LOG_PROB_FLOOR_DEFAULT = -30.0


def token_importance_weights(current_log_probs: Float[Array, "b t"],
                             generator_log_probs: Float[Array, "b t"],
                             mask: Float[Array, "b t"] | None = None,
                             clip: float = CLIP_DEFAULT,
                             log_prob_floor: float = LOG_PROB_FLOOR_DEFAULT) -> Float[Array, "b t"]:
  """Clipped token-level importance ratio ``min(exp(log pi_theta - max(log pi_gen, floor)), clip)``.

  Follows the authors' public code (see the module docstring); gradients are stopped.

  Args:
    current_log_probs: ``log pi_theta(y_t)`` under the model being trained.
    generator_log_probs: ``log pi_gen(y_t)`` stored when the token was sampled (the untempered model
      log-prob, ``SampleOutput.log_probs``).
    mask: 1 on response tokens; weights are 0 elsewhere. None means all ones.
    clip: cap ``c`` on the ratio (10 in the authors' code).
    log_prob_floor: floor on the generator's log-prob (-30 in the authors' code).
  Returns:
    The weights, same shape as the inputs.
  """
  log_ratio = current_log_probs.astype(jnp.float32) - jnp.maximum(
      generator_log_probs.astype(jnp.float32), log_prob_floor)
  # min before exp: exp(min(x, log c)) == min(exp(x), c) and cannot overflow.
  w = jnp.exp(jnp.minimum(log_ratio, jnp.log(clip)))
  if mask is not None:
    w = w * mask.astype(jnp.float32)
  return jax.lax.stop_gradient(w)


def response_log_ratio(reference_log_probs: Float[Array, "b t"],
                       generator_log_probs: Float[Array, "b t"], mask: Float[Array, "b t"],
                       length_normalize: bool = True) -> Float[Array, "b"]:
  """``log pi_ref(y) - log pi_gen(y)`` per response: summed over tokens, or their mean.

  The token mean (default) keeps long responses from dominating the self-normalized weights with
  ratios of hundreds of nats; the sum is the exact sequence-level ratio.
  """
  diff = (reference_log_probs - generator_log_probs).astype(jnp.float32)
  if length_normalize:
    return sft.masked_token_mean(diff, mask)
  return jnp.sum(diff * mask, axis=-1)


def self_normalized_response_weights(log_ratio: Float[Array, "n"], group: Int[Array, "n"],
                                     num_groups: int, valid: Float[Array, "n"] | None = None
                                     ) -> Float[Array, "n"]:
  """Self-normalized importance weights over the responses of each question.

  ``w_i = n_g * exp(r_i) / sum_{j in g} exp(r_j)`` for response ``i`` of group (question) ``g`` with
  ``n_g`` valid responses, so the weights of a group average 1 and a question counts as much as with
  plain SFT. Gradients are stopped.

  Args:
    log_ratio: per-response log importance ratio (see :func:`response_log_ratio`).
    group: group (question) id of each response, in ``[0, num_groups)``.
    num_groups: static number of groups.
    valid: 1 for real responses, 0 for padding (weight 0, not counted).
  Returns:
    Per-response weights.
  """
  if valid is None:
    valid = jnp.ones_like(log_ratio)
  valid = valid.astype(jnp.float32)
  masked = jnp.where(valid > 0, log_ratio.astype(jnp.float32), -jnp.inf)
  group_max = jax.ops.segment_max(masked, group, num_segments=num_groups)
  shifted = jnp.where(valid > 0, jnp.exp(masked - group_max[group]), 0.0)
  group_sum = jax.ops.segment_sum(shifted, group, num_segments=num_groups)
  group_n = jax.ops.segment_sum(valid, group, num_segments=num_groups)
  w = group_n[group] * shifted / jnp.maximum(group_sum[group], 1e-30)
  return jax.lax.stop_gradient(w)


def importance_weighted_nll(logits: Float[Array, "b t v"], targets: Int[Array, "b t"],
                            loss_mask: Float[Array, "b t"],
                            generator_log_probs: Float[Array, "b t"],
                            is_generated: Float[Array, "b"], clip: float = CLIP_DEFAULT,
                            log_prob_floor: float = LOG_PROB_FLOOR_DEFAULT) -> Float[Array, "b"]:
  """Per-example token-mean NLL where regenerated rows weight each token by its importance ratio.

  ``l_i = -(1/|y_i|) sum_t w_{i,t} log pi_theta(y_{i,t})`` with ``w`` from
  :func:`token_importance_weights` on rows with ``is_generated = 1`` and ``w = 1`` on offline rows
  (then ``l_i`` is exactly :func:`bilevel_jax.core.sft.per_example_nll`).

  Args:
    logits: model logits.
    targets: next-token targets.
    loss_mask: 1 on response targets.
    generator_log_probs: generator's log-probs aligned with ``targets`` (any value on offline rows).
    is_generated: 1 for regenerated rows, 0 for offline rows.
    clip, log_prob_floor: see :func:`token_importance_weights`.
  Returns:
    Per-example losses.
  """
  logp = sft.token_log_probs(logits, targets)
  w = token_importance_weights(logp, generator_log_probs, loss_mask, clip, log_prob_floor)
  w = jnp.where(is_generated[:, None] > 0, w, 1.0)
  return sft.masked_token_mean(-w * logp, loss_mask)


def make_importance_weighted_loss_fn(logits_fn: Callable[[Params, Params, dict], Array],
                                     clip: float = CLIP_DEFAULT,
                                     log_prob_floor: float = LOG_PROB_FLOOR_DEFAULT) -> sft.LossFn:
  """``loss_fn(trainable, frozen, batch) -> [B]`` for batches that mix offline and regenerated rows.

  The batch is the SFT batch of ``bilevel_jax.core.sft`` plus ``gen_log_probs`` (float32 [B, T],
  aligned with ``targets``) and ``is_generated`` (float32 [B]). The result plugs into
  :func:`bilevel_jax.core.sft.inner_step`, whose per-row ``weights`` then carry the offline pairs' BDS
  weights and, if used, the self-normalized response weights.
  """

  def loss_fn(trainable, frozen, batch):
    logits = logits_fn(trainable, frozen, batch)
    return importance_weighted_nll(logits, batch["targets"], batch["loss_mask"],
                                   batch["gen_log_probs"], batch["is_generated"], clip,
                                   log_prob_floor)

  return loss_fn
