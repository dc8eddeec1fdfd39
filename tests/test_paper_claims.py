"""The paper's claims about offline bilevel data selection, on small synthetic problems, 5 seeds each.

1. Separable toy: a categorical "language model" per question (one logit vector per question), a
   pool of useful pairs (the question's right answer) and conflicting useless pairs (a wrong answer
   to the same question), a validation set of right answers. BDS (``unroll``, K = 2, truncated,
   minibatches) must push every useless weight below every useful one, and the model fine-tuned on
   its weights (``soft`` rule) must reach a lower validation-distribution loss and put a larger
   share of its training weight on useful pairs than direct mixing (pool plus validation,
   unweighted).
2. One-layer attention model (the tiny decoder with one layer) on a "topic" task: five content
   tokens of one class, then a separator, then the class label; 30% of the pool has its label
   flipped. Penalty BDS (SEAL's single loop, ``lam`` decaying from 1 to 0.5) must reach the target
   validation loss (0.1 nats) from every seed, where direct mixing with the same optimizer and
   steps does not, rank flipped pairs below clean ones (AUROC >= 0.9), and leave its model with a
   lower held-out clean loss than direct mixing. In this regime the 32 validation examples alone
   already teach the task well on most seeds; the claim shown is that BDS turns a noisy pool from
   harmful (direct mixing) into harmless, not that the pool adds skill beyond the validation set.
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

SEEDS = range(5)


def auroc(scores, positive):
  """P(score of a random positive > score of a random negative), ties counted half."""
  pos, neg = scores[positive], scores[~positive]
  diff = pos[:, None] - neg[None, :]
  return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


# ----------------------------------------------------------------------------- separable toy

Q, V = 8, 10  # questions, answers


def categorical_loss(theta, frozen, batch):
  del frozen
  logp = jax.nn.log_softmax(theta[batch["q"]], axis=-1)
  return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]


def separable_toy(seed):
  """Per question 12 pairs: 3-9 useful (its right answer), the rest useless (one conflicting answer).

  The pool size is the same for every seed so that one compilation serves all seeds.
  """
  rng = np.random.default_rng(seed)
  right, wrong = np.zeros(Q, int), np.zeros(Q, int)
  qs, ys, useful = [], [], []
  for q in range(Q):
    right[q], wrong[q] = rng.choice(V, 2, replace=False)
    n_useful = rng.integers(3, 10)
    n_useless = 12 - n_useful
    qs += [q] * (n_useful + n_useless)
    ys += [right[q]] * n_useful + [wrong[q]] * n_useless
    useful += [True] * n_useful + [False] * n_useless
  order = rng.permutation(len(qs))
  pool = {"q": np.asarray(qs, np.int32)[order], "y": np.asarray(ys, np.int32)[order]}
  val = {"q": np.arange(Q, dtype=np.int32), "y": right.astype(np.int32)}
  theta0 = jnp.asarray(0.1 * rng.normal(size=(Q, V)), jnp.float32)
  return pool, np.asarray(useful)[order], val, right, theta0


@jax.jit
def fit_categorical(theta0, q, y, w):
  """The final fine-tune: 100 full-batch gradient steps on the w-weighted pairs."""
  def step(th, _):
    grad = jax.grad(lambda t: jnp.sum(w * categorical_loss(t, {}, {"q": q, "y": y})) / jnp.sum(w))(th)
    return th - 2.0 * grad, None
  return jax.lax.scan(step, theta0, None, length=100)[0]


def test_bds_separates_useful_from_conflicting_pairs_and_beats_direct_mixing():
  problem = hg.Problem(categorical_loss, optax.sgd(1.0))
  est = hg.Unroll(k=2)
  outer_step = sel.make_outer_step(problem, est, optax.adam(0.1))
  for seed in SEEDS:
    pool, useful, val, right, theta0 = separable_toy(seed)
    n = len(useful)
    result = sel.select(problem, est, theta0, {}, n, sel.epoch_batches(pool, 16, seed=seed),
                        sel.cycle([val]), num_steps=150, outer_step=outer_step, history_every=0,
                        log_every=0)
    p = result.weights
    assert p[~useful].max() < p[useful].min(), f"seed {seed}: a useless pair outweighs a useful one"

    # Train on the learned weights (the ``soft`` rule). ``threshold`` can drop every pair of a
    # question with many useful pairs (each then carries less than the uniform weight).
    soft = wts.select_examples(p, "soft").train_weights
    bds = fit_categorical(theta0, pool["q"], pool["y"], jnp.asarray(soft))
    mix_q, mix_y = np.concatenate([pool["q"], val["q"]]), np.concatenate([pool["y"], val["y"]])
    mixed = fit_categorical(theta0, mix_q, mix_y, jnp.ones(len(mix_q)))

    def val_loss(theta):  # the validation distribution: every question with its right answer
      return float(jnp.mean(categorical_loss(theta, {}, {"q": jnp.arange(Q), "y": jnp.asarray(right)})))

    assert val_loss(bds) < val_loss(mixed) - 0.1, f"seed {seed}"
    useful_share_bds = soft[useful].sum() / soft.sum()  # share of the training weight
    useful_share_mix = (useful.sum() + Q) / (n + Q)  # validation pairs count as useful
    assert useful_share_bds > useful_share_mix, f"seed {seed}"


# ----------------------------------------------------------------------------- one-layer attention

ATTN_CFG = llama.tiny_config(n_layers=1, vocab_size=24)
SEP, LABEL_A, LABEL_B, T = 1, 2, 3, 6


def topic_rows(rng, n, flip_fraction):
  """Five tokens of class A (4..11) or B (12..19), SEP, then the label token (A=2, B=3)."""
  cls = rng.integers(0, 2, n)
  tokens = np.zeros((n, T), np.int32)
  tokens[:, :5] = np.where(cls[:, None] == 0, rng.integers(4, 12, (n, 5)), rng.integers(12, 20, (n, 5)))
  tokens[:, 5] = SEP
  flipped = np.zeros(n, bool)
  flipped[rng.permutation(n)[:int(round(flip_fraction * n))]] = True
  label = np.where((cls == 0) != flipped, LABEL_A, LABEL_B)
  mask = np.zeros((n, T), np.float32)
  mask[:, -1] = 1.0  # only the label is a response token
  targets = np.concatenate([tokens[:, 1:], label[:, None]], 1).astype(np.int32)
  return {"tokens": tokens, "targets": targets,
          "loss_mask": mask, "positions": np.tile(np.arange(T, dtype=np.int32), (n, 1)),
          "segment_ids": np.ones((n, T), np.int32)}, flipped


ATTN_LOSS = sft.make_loss_fn(lora.make_logits_fn(lora.TrainableSpec("full"), ATTN_CFG))
TARGET_VAL_LOSS = 0.1
N_POOL, BATCH, STEPS = 96, 32, 90


def test_penalty_bds_reaches_target_on_one_layer_attention_with_flipped_labels():
  inner = optax.adam(3e-3)
  problem = hg.Problem(ATTN_LOSS, inner)
  est = hg.Penalty(lam_init=1.0, lam_decay=0.05, decay_every=N_POOL // BATCH, lam_min=0.5)
  fast_compile = {"xla_backend_optimization_level": 0}  # tiny programs: halves XLA's compile time
  outer_step = sel.make_outer_step(problem, est, optax.adam(0.05), compiler_options=fast_compile)
  sft_step = jax.jit(functools.partial(sft.inner_step, ATTN_LOSS, inner), compiler_options=fast_compile)
  eval_loss = jax.jit(lambda params, batch: hg.mean_loss(ATTN_LOSS, params, {}, batch))
  init = jax.jit(lambda key: llama.init_params(ATTN_CFG, key))
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    pool, flipped = topic_rows(rng, N_POOL, 0.3)
    val, _ = topic_rows(rng, 32, 0.0)
    held_out, _ = topic_rows(rng, 256, 0.0)
    params = init(jax.random.key(seed))
    result = sel.select(problem, est, params, {}, N_POOL, sel.epoch_batches(pool, BATCH, seed=seed),
                        sel.cycle([val]), num_steps=STEPS, outer_step=outer_step, history_every=0,
                        log_every=STEPS)
    bds_model = result.state.est.params
    assert result.metrics[-1]["lam"] == pytest.approx(0.5)
    assert float(eval_loss(bds_model, val)) <= TARGET_VAL_LOSS, f"seed {seed}"
    assert auroc(result.weights, ~flipped) >= 0.9, f"seed {seed}"

    # Direct mixing: the same optimizer and number of steps on pool + validation, unweighted.
    mixed = {k: np.concatenate([pool[k], val[k]]) for k in pool}
    direct, opt_state = params, inner.init(params)
    batches = sel.epoch_batches(mixed, BATCH, seed=seed)
    for _ in range(STEPS):
      b = next(batches)
      direct, opt_state, _ = sft_step(direct, {}, opt_state, b, (b["index"] >= 0).astype(np.float32))
    assert float(eval_loss(direct, val)) > TARGET_VAL_LOSS, f"seed {seed}: the target is trivial"
    assert float(eval_loss(bds_model, held_out)) < float(eval_loss(direct, held_out)), f"seed {seed}"
