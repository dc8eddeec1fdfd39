"""The lower-level problem: weighted supervised fine-tuning as pure functions.

Notation (DESIGN.md section 2): the per-example loss is the token-mean negative log-likelihood of
the response tokens only, ``l_i(theta) = -(1/|y_i|) sum_t log pi_theta(y_{i,t} | x_i, y_{i,<t})``;
the lower-level objective is ``g(theta, omega) = mean_i p_i(omega) l_i(theta)``.

A *batch* is a dict of arrays (see ``bilevel_jax/data/pipeline.py``):

* ``tokens``, ``targets``: int32 [B, T]; ``targets[:, t]`` is the token after ``tokens[:, t]``.
* ``loss_mask``: float32 [B, T], 1 where ``targets`` is a response token (prompt and padding 0).
* ``positions``, ``segment_ids``: int32 [B, T]; segment 0 is padding.
* ``index``: int32 [B], the row of the example in the weight vector (-1 for a padding row).

A *loss function* is ``loss_fn(trainable, frozen, batch) -> [B]`` per-example losses; build one
with :func:`make_loss_fn` from a logits function (``bilevel_jax.model.lora.make_logits_fn``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

Params = Any
LossFn = Callable[[Params, Params, dict], Float[Array, "b"]]


def token_log_probs(logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Float[Array, "b t"]:
  """log pi(targets) under ``logits``, in at least f32."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - lse


def masked_token_mean(values: Float[Array, "b t"], mask: Float[Array, "b t"]) -> Float[Array, "b"]:
  """Per-row mean of ``values`` over ``mask`` (0 for a row with an empty mask)."""
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def per_example_nll(logits: Float[Array, "b t v"], targets: Int[Array, "b t"],
                    loss_mask: Float[Array, "b t"]) -> Float[Array, "b"]:
  """Token-mean NLL of the masked (response) targets of each row."""
  return masked_token_mean(-token_log_probs(logits, targets), loss_mask)


def make_loss_fn(logits_fn: Callable[[Params, Params, dict], Array]) -> LossFn:
  """Per-example response NLL of ``logits_fn(trainable, frozen, batch)``."""

  def loss_fn(trainable, frozen, batch):
    logits = logits_fn(trainable, frozen, batch)
    return per_example_nll(logits, batch["targets"], batch["loss_mask"])

  return loss_fn


def valid_rows(batch: dict) -> Float[Array, "b"]:
  """1.0 for real examples, 0.0 for padding rows (``index < 0``)."""
  if "index" in batch:
    return (batch["index"] >= 0).astype(jnp.float32)
  return jnp.ones(batch["targets"].shape[0], jnp.float32)


def weighted_mean(losses: Float[Array, "b"], weights: Float[Array, "b"],
                  valid: Float[Array, "b"] | None = None) -> Float[Array, ""]:
  """``mean_i p_i l_i`` over the valid rows of a batch."""
  if valid is None:
    valid = jnp.ones_like(losses)
  return jnp.sum(weights * losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def weighted_loss(loss_fn: LossFn, trainable: Params, frozen: Params, batch: dict,
                  weights: Float[Array, "b"]) -> tuple[Float[Array, ""], Float[Array, "b"]]:
  """``g`` on one batch: the weighted mean of per-example losses, and the losses themselves."""
  losses = loss_fn(trainable, frozen, batch)
  return weighted_mean(losses, weights, valid_rows(batch)), losses


def inner_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, trainable: Params,
               frozen: Params, opt_state: optax.OptState, batch: dict,
               weights: Float[Array, "b"]) -> tuple[Params, optax.OptState, dict]:
  """One optimizer step on the weighted SFT loss. Pure; differentiable with respect to ``weights``.

  Args:
    loss_fn: per-example loss function (see :func:`make_loss_fn`).
    optimizer: any optax optimizer.
    trainable: params that get gradients.
    frozen: params passed through unchanged.
    opt_state: optimizer state for ``trainable``.
    batch: a batch dict (see module docstring).
    weights: per-row weights ``p_i`` (e.g. ``p(omega)[batch["index"]]``; ones for plain SFT).
  Returns:
    ``(new_trainable, new_opt_state, metrics)`` with metrics ``loss`` (weighted), ``nll`` (plain
    mean response NLL) and ``grad_norm``.
  """
  grads, metrics = weighted_grad(loss_fn, trainable, frozen, batch, weights)
  trainable, opt_state = apply_update(optimizer, trainable, opt_state, grads)
  return trainable, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def weighted_grad(loss_fn: LossFn, trainable: Params, frozen: Params, batch: dict,
                  weights: Float[Array, "b"]) -> tuple[Params, dict]:
  """``grad_theta g`` on one batch and the metrics ``loss`` (weighted) and ``nll`` (plain mean)."""
  (_, losses), grads = jax.value_and_grad(weighted_loss, argnums=1, has_aux=True)(
      loss_fn, trainable, frozen, batch, weights)
  return grads, step_metrics(losses, weights, batch)


def step_metrics(losses: Float[Array, "b"], weights: Float[Array, "b"], batch: dict) -> dict:
  """An inner step's metrics from its per-example losses: ``loss`` (weighted ``g``) and ``nll``
  (the plain mean over the real rows)."""
  valid = valid_rows(batch)
  return {"loss": weighted_mean(losses, weights, valid),
          "nll": jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1.0)}


def apply_update(optimizer: optax.GradientTransformation, trainable: Params,
                 opt_state: optax.OptState, grads: Params) -> tuple[Params, optax.OptState]:
  """One optimizer update of ``trainable`` by ``grads``."""
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state


def make_inner_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, donate: bool = True):
  """The jitted :func:`inner_step` with ``trainable`` and ``opt_state`` donated.

  Donation lets XLA update the params in place; measured on the real model on CPU it cut the step
  from 7.4 s to 4.0 s (DESIGN.md section 7). Callers must not reuse the arrays they passed in.
  """

  def step(trainable, frozen, opt_state, batch, weights):
    return inner_step(loss_fn, optimizer, trainable, frozen, opt_state, batch, weights)

  return jax.jit(step, donate_argnums=(0, 2) if donate else ())


def sgd_or_adam(name: str, learning_rate: float, *, eps: float = 1e-6, eps_root: float = 1e-16,
                weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Inner optimizers that are safe to differentiate through (DESIGN.md section 7).

  Adam with ``eps_root=0`` gave NaN hypergradients under remat, and ``eps=1e-8`` put the f32
  hypergradient 3% off the f64 one; hence ``eps=1e-6`` and ``eps_root=1e-16`` by default.
  """
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "adam":
    return optax.adam(learning_rate, eps=eps, eps_root=eps_root)
  if name == "adamw":
    return optax.adamw(learning_rate, eps=eps, eps_root=eps_root, weight_decay=weight_decay)
  raise ValueError(f"unknown inner optimizer {name!r} (sgd, adam, adamw)")
