"""The weighted SFT step: response-only loss, exact weighting, jit equals eager."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax.core import sft
from bilevel_jax.model import llama, lora


@pytest.fixture(scope="module")
def setup():
  cfg = llama.tiny_config()
  params = llama.init_params(cfg, jax.random.key(0))
  b, t = 3, 10
  toks = jax.random.randint(jax.random.key(1), (b, t + 1), 0, cfg.vocab_size)
  prompt_len = jnp.array([3, 5, 2])
  lengths = jnp.array([11, 8, 11])  # row 1 is right-padded
  ar = jnp.arange(t)
  batch = {
      "tokens": toks[:, :-1], "targets": toks[:, 1:],
      # target t is a response token when t+1 >= prompt_len and t+1 < length
      "loss_mask": ((ar[None] + 1 >= prompt_len[:, None]) & (ar[None] + 1 < lengths[:, None])
                    ).astype(jnp.float32),
      "positions": jnp.broadcast_to(ar, (b, t)).astype(jnp.int32),
      "segment_ids": (ar[None] < lengths[:, None] - 1).astype(jnp.int32),
      "index": jnp.array([0, 1, 2], jnp.int32),
  }
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(lora.TrainableSpec("full"), cfg))
  return cfg, params, batch, loss_fn


def test_prompt_targets_do_not_change_the_loss(setup):
  cfg, params, batch, loss_fn = setup
  base = loss_fn(params, {}, batch)
  masked = batch["loss_mask"] == 0
  other = jnp.where(masked, (batch["targets"] + 7) % cfg.vocab_size, batch["targets"])
  np.testing.assert_array_equal(loss_fn(params, {}, {**batch, "targets": other}), base)
  # ...while a response target does change it.
  resp = jnp.where(~masked, (batch["targets"] + 7) % cfg.vocab_size, batch["targets"])
  assert not np.allclose(loss_fn(params, {}, {**batch, "targets": resp}), base)


def test_per_example_loss_is_token_mean_nll(setup):
  cfg, params, batch, loss_fn = setup
  logits, _ = llama.apply(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"])
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  tg, m = np.asarray(batch["targets"]), np.asarray(batch["loss_mask"])
  for i in range(tg.shape[0]):
    nll = -logp[i, np.arange(tg.shape[1]), tg[i]]
    np.testing.assert_allclose(loss_fn(params, {}, batch)[i], (nll * m[i]).sum() / m[i].sum(),
                               rtol=1e-5)


def test_weights_scale_per_example_losses_exactly(setup):
  _, params, batch, loss_fn = setup
  losses = loss_fn(params, {}, batch)
  w = jnp.array([0.5, 2.0, 0.0])
  loss, _ = sft.weighted_loss(loss_fn, params, {}, batch, w)
  np.testing.assert_allclose(loss, jnp.sum(w * losses) / 3, rtol=1e-6)
  # The gradient is the weighted sum of per-example gradients.
  g = jax.grad(lambda p: sft.weighted_loss(loss_fn, p, {}, batch, w)[0])(params)
  gi = [jax.grad(lambda p, i=i: loss_fn(p, {}, batch)[i])(params) for i in range(3)]
  want = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip([0.5, 2.0, 0.0], xs)) / 3, *gi)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_padding_rows_are_ignored(setup):
  _, params, batch, loss_fn = setup
  w = jnp.ones(3)
  padded = {**batch, "index": jnp.array([0, 1, -1], jnp.int32)}
  loss, losses = sft.weighted_loss(loss_fn, params, {}, padded, w)
  np.testing.assert_allclose(loss, (losses[0] + losses[1]) / 2, rtol=1e-6)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_jit_step_equals_eager_step(setup, opt_name):
  # In float64: Adam divides by sqrt(v) + eps, so for near-zero gradients f32 reordering noise
  # between the fused (jit) and op-by-op programs is amplified; f64 makes the comparison exact
  # to rounding without loosening the tolerance.
  cfg, params, batch, _ = setup
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(lora.TrainableSpec("full"), cfg.replace(dtype="float64")))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    opt = sft.sgd_or_adam(opt_name, 1e-2)
    w = jnp.array([1.0, 0.5, 1.5], jnp.float64)
    eager = sft.inner_step(loss_fn, opt, p64, {}, opt.init(p64), batch, w)
    copy = jax.tree.map(jnp.copy, p64)
    jitted = sft.make_inner_step(loss_fn, opt)(copy, {}, opt.init(copy), batch, w)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(a, b, atol=1e-12, rtol=1e-10)


def test_steps_reduce_the_weighted_loss(setup):
  _, params, batch, loss_fn = setup
  opt = optax.adam(3e-3)
  step = sft.make_inner_step(loss_fn, opt)
  p = jax.tree.map(jnp.copy, params)
  state = opt.init(p)
  first = None
  for _ in range(20):
    p, state, m = step(p, {}, state, batch, jnp.ones(3))
    first = first if first is not None else float(m["loss"])
  assert float(m["loss"]) < 0.8 * first


def test_bf16_step_keeps_f32_loss(setup):
  cfg, params, batch, _ = setup
  cfg16 = cfg.replace(dtype="bfloat16")
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(lora.TrainableSpec("full"), cfg16))
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  opt = optax.sgd(1e-2)
  new, _, m = sft.inner_step(loss_fn, opt, p16, {}, opt.init(p16), batch, jnp.ones(3))
  assert m["loss"].dtype == jnp.float32
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
  f32_loss = sft.weighted_loss(sft.make_loss_fn(lora.make_logits_fn(lora.TrainableSpec("full"), cfg)),
                               params, {}, batch, jnp.ones(3))[0]
  np.testing.assert_allclose(m["loss"], f32_loss, rtol=0.05)
