"""The decoder on a tiny random model: caches, masks, LoRA and the trainable split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax.model import llama, lora


@pytest.fixture(scope="module")
def model():
  cfg = llama.tiny_config()
  return cfg, llama.init_params(cfg, jax.random.key(0))


def _tokens(cfg, b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


def test_kv_cache_decode_equals_full_sequence(model):
  cfg, params = model
  toks = _tokens(cfg, 2, 12)
  full, _ = llama.apply(params, cfg, toks)
  cache = llama.init_cache(cfg, 2, 16)
  first, cache = llama.apply(params, cfg, toks[:, :5], cache=cache)
  outs = [first]
  for t in range(5, 12):
    step, cache = llama.apply(params, cfg, toks[:, t:t + 1], cache=cache)
    outs.append(step)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
  assert int(cache.index) == 12


def test_left_padding_does_not_change_real_tokens(model):
  """A left-padded row (segment 0 on the pads, positions from 0) gives the unpadded logits."""
  cfg, params = model
  toks = _tokens(cfg, 1, 7)
  alone, _ = llama.apply(params, cfg, toks)
  pad = 3
  padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), toks], axis=1)
  seg = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 7), jnp.int32)], axis=1)
  pos = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.arange(7)[None]], axis=1)
  out, _ = llama.apply(params, cfg, padded, pos, seg)
  np.testing.assert_allclose(out[:, pad:], alone, atol=2e-5, rtol=2e-5)


def test_packed_segments_do_not_attend_to_each_other(model):
  cfg, params = model
  a, b = _tokens(cfg, 1, 5, seed=2), _tokens(cfg, 1, 4, seed=3)
  la, _ = llama.apply(params, cfg, a)
  lb, _ = llama.apply(params, cfg, b)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 4])
  pos = jnp.array([list(range(5)) + list(range(4))])
  out, _ = llama.apply(params, cfg, packed, pos, seg)
  np.testing.assert_allclose(out[:, :5], la, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(out[:, 5:], lb, atol=2e-5, rtol=2e-5)


def test_future_tokens_do_not_change_past_logits(model):
  cfg, params = model
  toks = _tokens(cfg, 1, 8)
  changed = toks.at[0, 6].set((toks[0, 6] + 1) % cfg.vocab_size)
  out1, _ = llama.apply(params, cfg, toks)
  out2, _ = llama.apply(params, cfg, changed)
  np.testing.assert_array_equal(out1[:, :6], out2[:, :6])
  assert not np.allclose(out1[:, 6:], out2[:, 6:])


@pytest.mark.parametrize("overrides", [dict(qkv_bias=True), dict(tie_embeddings=False),
                                       dict(remat=True)])
def test_variants_run_and_cache_matches(overrides):
  cfg = llama.tiny_config(**overrides)
  params = llama.init_params(cfg, jax.random.key(4))
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  toks = _tokens(cfg, 2, 6)
  full, _ = llama.apply(params, cfg, toks)
  cache = llama.init_cache(cfg, 2, 8)
  a, cache = llama.apply(params, cfg, toks[:, :3], cache=cache)
  b, _ = llama.apply(params, cfg, toks[:, 3:], cache=cache)
  np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, atol=2e-5, rtol=2e-5)


def test_per_layer_params_and_cache_equal_the_stacked_model():
  """The unrolled path (unstacked params, per-layer cache) gives the stacked model's logits and cache.

  LoRA's B factors are made non-zero so that the adapter contributes.
  """
  cfg = llama.tiny_config(qkv_bias=True)
  params = llama.init_params(cfg, jax.random.key(7))
  spec = lora.TrainableSpec(kind="lora", lora_rank=4)
  lp = lora.init_lora(cfg, spec, jax.random.key(8))
  lp = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(9), x.shape), lp)
  toks = _tokens(cfg, 2, 9)
  kw = dict(lora=lp, lora_scale=spec.lora_scale)
  full, _ = llama.apply(params, cfg, toks, **kw)
  unstacked = {**params, "layers": llama.unstack_layers(params["layers"])}
  assert len(unstacked["layers"]) == cfg.n_layers
  ukw = dict(lora={"layers": llama.unstack_layers(lp["layers"])}, lora_scale=spec.lora_scale)
  np.testing.assert_allclose(llama.apply(unstacked, cfg, toks, **ukw)[0], full, atol=2e-5,
                             rtol=2e-5)
  stacked_cache = llama.init_cache(cfg, 2, 12)
  cache = llama.init_cache(cfg, 2, 12, per_layer=True)
  assert isinstance(cache.k, tuple) and len(cache.k) == cfg.n_layers
  outs = []
  for start, stop in ((0, 4), (4, 5), (5, 9)):
    out, cache = llama.apply(unstacked, cfg, toks[:, start:stop], cache=cache, **ukw)
    _, stacked_cache = llama.apply(params, cfg, toks[:, start:stop], cache=stacked_cache, **kw)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
  assert int(cache.index) == 9
  for i in range(cfg.n_layers):
    np.testing.assert_allclose(cache.k[i], stacked_cache.k[i], atol=1e-6)
    np.testing.assert_allclose(cache.v[i], stacked_cache.v[i], atol=1e-6)


def test_cache_layout_must_match_the_params_layout(model):
  cfg, params = model
  toks = _tokens(cfg, 2, 3)
  unstacked = {**params, "layers": llama.unstack_layers(params["layers"])}
  with pytest.raises(ValueError, match="per-layer cache"):
    llama.apply(unstacked, cfg, toks, cache=llama.init_cache(cfg, 2, 8))
  with pytest.raises(ValueError, match="per-layer params"):
    llama.apply(params, cfg, toks, cache=llama.init_cache(cfg, 2, 8, per_layer=True))
  assert llama.unstack_layers(None) is None


def test_bf16_compute_is_close_to_f32(model):
  cfg, params = model
  toks = _tokens(cfg, 2, 8)
  f32, _ = llama.apply(params, cfg, toks)
  bf16, _ = llama.apply(params, cfg.replace(dtype="bfloat16"), toks)
  assert bf16.dtype == jnp.float32  # logits stay f32 for the loss
  assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.1 * float(jnp.max(jnp.abs(f32)))


@pytest.mark.parametrize("kind,per_layer", [("full", False), ("lora", False),
                                            ("last_n_layers", False), ("full", True),
                                            ("lora", True), ("last_n_layers", True)])
def test_trainable_split_gives_the_full_model_and_merges_back(model, kind, per_layer):
  cfg, params = model
  spec = lora.TrainableSpec(kind=kind, n_layers=1, lora_rank=4, per_layer=per_layer)
  lora_params = lora.init_lora(cfg, spec, jax.random.key(5)) if kind == "lora" else None
  trainable, frozen = lora.split(spec, cfg, params, lora_params)
  if per_layer:  # a tuple of per-layer dicts whose leaves lack the layer axis
    n = 1 if kind == "last_n_layers" else cfg.n_layers
    assert isinstance(trainable["layers"], tuple) and len(trainable["layers"]) == n
    leaf = (lambda x: x["wq"]["a"]) if kind == "lora" else (lambda x: x["wq"])
    stacked = lora_params if kind == "lora" else params
    assert leaf(trainable["layers"][-1]).shape == leaf(stacked["layers"]).shape[1:]
    if kind == "lora":  # the frozen base runs unrolled with the adapters
      assert isinstance(frozen["layers"], tuple) and len(frozen["layers"]) == cfg.n_layers
  toks = _tokens(cfg, 2, 6)
  batch = {"tokens": toks, "positions": jnp.broadcast_to(jnp.arange(6), (2, 6)),
           "segment_ids": jnp.ones((2, 6), jnp.int32)}
  logits_fn = lora.make_logits_fn(spec, cfg)
  want, _ = llama.apply(params, cfg, toks)
  np.testing.assert_allclose(logits_fn(trainable, frozen, batch), want, atol=1e-5, rtol=1e-5)
  pre = lora.precompute_prefix(spec, cfg, frozen, batch)
  np.testing.assert_allclose(logits_fn(trainable, frozen, pre), want, atol=1e-5, rtol=1e-5)
  merged, merged_lora = lora.merge(spec, trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  assert (merged_lora is None) == (kind != "lora")
  if kind == "lora":
    assert jax.tree.structure(merged_lora) == jax.tree.structure(lora_params)
    for x, y in zip(jax.tree.leaves(merged_lora), jax.tree.leaves(lora_params)):
      np.testing.assert_array_equal(x, y)


def test_stack_layers_inverts_unstack(model):
  cfg, params = model
  layers = params["layers"]
  assert llama.stack_layers(layers) is layers  # stacked params pass through
  restacked = llama.stack_layers(llama.unstack_layers(layers))
  assert jax.tree.structure(restacked) == jax.tree.structure(layers)
  for x, y in zip(jax.tree.leaves(restacked), jax.tree.leaves(layers)):
    np.testing.assert_array_equal(x, y)


def test_lora_update_changes_the_model_only_through_b(model):
  cfg, params = model
  spec = lora.TrainableSpec(kind="lora", lora_rank=2, lora_targets=("wq", "w_down"))
  lp = lora.init_lora(cfg, spec, jax.random.key(6))
  toks = _tokens(cfg, 1, 5)
  base, _ = llama.apply(params, cfg, toks)
  out, _ = llama.apply(params, cfg, toks, lora=lp, lora_scale=spec.lora_scale)
  np.testing.assert_allclose(out, base, atol=1e-6)  # b starts at zero
  lp2 = jax.tree.map(lambda x: x + 0.1, lp)
  out2, _ = llama.apply(params, cfg, toks, lora=lp2, lora_scale=spec.lora_scale)
  assert float(jnp.max(jnp.abs(out2 - base))) > 1e-3
