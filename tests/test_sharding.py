"""Meshes, logical axis rules and sharded steps on 8 fake CPU devices (see conftest.py).

Mesh equivalence tolerance (f32): a sharded program sums partial products in another order than
the single-device one (FSDP and tensor splits end in all-reduces), so results agree to f32 rounding
accumulated over the steps, not bit for bit. After three SFT steps on the tiny model we require a
per-leaf relative (Frobenius) error of at most ``PARAM_RTOL = 5e-5`` and losses within
``LOSS_RTOL = 1e-5``. Measured: 1.5e-7 for full fine-tuning, 1.1e-5 for LoRA (large steps through
the low-rank product amplify rounding); the same LoRA runs in float64 agree to 3e-15, which shows
that the f32 gap is rounding and not a different program (tested below at 1e-12). Estimators: see
``EST_RTOL``. Integer outputs (sampled tokens) must be equal.

The optimizer in the SFT comparisons is SGD with momentum, which is linear in the gradient: Adam
divides by ``sqrt(v) + eps`` and so turns f32 rounding noise in a near-zero gradient entry (an
embedding row of a token seen once) into an O(lr) change of the update; that is a property of Adam,
not of the sharding, and the core tests compare Adam steps in float64 for the same reason.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from bilevel_jax import parallel, sharding
from bilevel_jax.core import sft
from bilevel_jax.model import llama, lora

PARAM_RTOL, LOSS_RTOL = 5e-5, 1e-5
MESHES = [(2, 2, 2), (8, 1, 1), (1, 8, 1)]
CPUS = jax.devices("cpu")


def layout_for(shape, **kw):
  return sharding.make_layout(shape, devices=CPUS, **kw)


def make_batch(cfg, b=8, t=12, seed=1):
  toks = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, cfg.vocab_size)
  ar = jnp.arange(t)
  prompt = 2 + jnp.arange(b) % 4
  return {"tokens": toks[:, :-1], "targets": toks[:, 1:],
          "loss_mask": (ar[None] + 1 >= prompt[:, None]).astype(jnp.float32),
          "positions": jnp.broadcast_to(ar, (b, t)).astype(jnp.int32),
          "segment_ids": jnp.ones((b, t), jnp.int32), "index": jnp.arange(b, dtype=jnp.int32)}


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
  assert sharding.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2)
  assert sharding.resolve_mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.resolve_mesh_shape({"model": 2}, 8)


def test_make_mesh_from_config_tuple_and_mapping_has_auto_axes():
  mesh = sharding.make_mesh((2, -1, 2), devices=CPUS)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert dict(sharding.make_mesh({"tensor": 8}, devices=CPUS).shape)["tensor"] == 8


def test_param_specs_follow_logical_rules():
  cfg = llama.tiny_config()  # vocab 97 (prime), d 32, 4 heads x 8, 2 kv heads, ff 64
  lay = layout_for((2, 2, 2))
  shapes = jax.eval_shape(lambda k: llama.init_params(cfg, k), jax.random.key(0))
  specs = jax.tree.map(lambda s: s.spec, lay.params(shapes))
  assert specs["layers"]["wq"] == P(None, "fsdp", "tensor")
  assert specs["layers"]["wo"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["w_down"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["attn_norm"] == P(None, None)
  assert specs["embed"] == P(None, "fsdp")  # 97 rows do not split over tensor=2: replicated
  spec = lora.TrainableSpec("lora", lora_rank=4)
  lshapes = jax.eval_shape(lambda k: lora.init_lora(cfg, spec, k), jax.random.key(0))
  lspecs = jax.tree.map(lambda s: s.spec, lay.params(lshapes))
  assert lspecs["layers"]["wq"]["a"] == P(None, "fsdp", None)
  assert lspecs["layers"]["wq"]["b"] == P(None, None, "tensor")
  assert lspecs["layers"]["w_down"]["a"] == P(None, "tensor", None)
  # Data parallelism only: everything replicated.
  dp = layout_for((8, 1, 1), rules="dp")
  assert all(s.spec == P(*([None] * len(s.spec))) or s.spec == P()
             for s in jax.tree.leaves(dp.params(shapes)))
  with pytest.raises(ValueError, match="no logical axes for param 'layers/mystery'"):
    lay.params({"layers": {"mystery": jnp.zeros((2, 3))}})
  # Per-layer params (TrainableSpec(per_layer=True)): each layer's leaves lack the layer axis.
  per_layer = jax.eval_shape(
      lambda p: lora.split(lora.TrainableSpec("full", per_layer=True), cfg, p)[0], shapes)
  pspecs = jax.tree.map(lambda s: s.spec, lay.params(per_layer))
  assert len(pspecs["layers"]) == cfg.n_layers
  assert pspecs["layers"][1]["wq"] == P("fsdp", "tensor")
  assert pspecs["layers"][1]["w_down"] == P("tensor", "fsdp")
  assert pspecs["layers"][0]["attn_norm"] == P(None)
  # LoRA per layer: the adapters and the frozen base layers both lose the layer axis.
  lora_pl = lora.TrainableSpec("lora", lora_rank=4, per_layer=True)
  tr, fr = jax.eval_shape(lambda p, a: lora.split(lora_pl, cfg, p, a), shapes, lshapes)
  tspecs, fspecs = (jax.tree.map(lambda s: s.spec, lay.params(t)) for t in (tr, fr))
  assert len(tspecs["layers"]) == len(fspecs["layers"]) == cfg.n_layers
  assert tspecs["layers"][1]["wq"]["a"] == P("fsdp", None)
  assert fspecs["layers"][1]["wq"] == P("fsdp", "tensor")


def test_params_are_born_sharded_and_equal_the_unsharded_init():
  cfg = llama.tiny_config()
  lay = layout_for((1, 8, 1))
  params = sharding.init_params(cfg, jax.random.key(0), lay)
  want = jax.jit(lambda k: llama.init_params(cfg, k))(jax.random.key(0))
  for got, ref, sh in zip(jax.tree.leaves(params), jax.tree.leaves(want),
                          jax.tree.leaves(lay.params(params))):
    assert got.sharding == sh
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # wq [L, 32, 32] over fsdp=8: each device holds 1/8 of it.
  wq = params["layers"]["wq"]
  assert wq.addressable_shards[0].data.shape == (cfg.n_layers, 4, 32)


def test_optimizer_state_follows_params_and_scalars_replicate():
  cfg = llama.tiny_config()
  lay = layout_for((2, 2, 2))
  params = sharding.init_params(cfg, jax.random.key(0), lay)
  state = sharding.init_opt_state(optax.adam(1e-3), params, lay)
  adam = state[0]
  for tree in (adam.mu, adam.nu):
    for got, p in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
      assert got.sharding == p.sharding
  assert adam.count.sharding.spec == P()


def test_batch_and_weight_logit_shardings():
  lay = layout_for((2, 2, 2), weights="data")
  cfg = llama.tiny_config()
  b_sh = lay.batch(make_batch(cfg, b=8))
  assert b_sh["tokens"].spec == P(("data", "fsdp"), None)
  assert b_sh["index"].spec == P(("data", "fsdp"))
  with pytest.raises(ValueError, match=r"batch field \['\w+'\].*divisible by data\*fsdp = 4"):
    lay.batch(make_batch(cfg, b=6))
  assert lay.omega(10).spec == P("data")
  with pytest.raises(ValueError, match="length 11"):
    lay.omega(11)
  assert layout_for((2, 2, 2)).omega(11).spec == P()


def test_cache_shardings_stacked_and_per_layer():
  """KV heads split over tensor, rows over data x fsdp; a per-layer cache gets one spec per layer."""
  lay = layout_for((2, 2, 2))
  cfg = llama.tiny_config()  # 2 KV heads
  stacked = lay.cache(jax.eval_shape(lambda: llama.init_cache(cfg, 4, 8)))
  assert stacked.k.spec == P(None, ("data", "fsdp"), None, "tensor", None)
  per_layer = lay.cache(jax.eval_shape(lambda: llama.init_cache(cfg, 4, 8, per_layer=True)))
  assert len(per_layer.k) == cfg.n_layers
  assert all(sh.spec == P(("data", "fsdp"), None, "tensor", None) for sh in per_layer.v)
  assert per_layer.segment_ids.spec == P(("data", "fsdp"), None)


def _run_sft(layout, cfg, kind, steps=3, dtype=jnp.float32, compute_dtype=None):
  spec = lora.TrainableSpec(kind, lora_rank=4)
  cfg = cfg.replace(dtype=jnp.dtype(compute_dtype or dtype).name)
  params = llama.init_params(cfg, jax.random.key(0), dtype)
  lora_params = lora.init_lora(cfg, spec, jax.random.key(1), dtype) if kind == "lora" else None
  if lora_params is not None:  # non-zero B so that A gets gradients from the first step
    lora_params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape),
                               lora_params)
  trainable, frozen = lora.split(spec, cfg, params, lora_params)
  optimizer = optax.sgd(0.1, momentum=0.9)
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(spec, cfg))
  weights = jnp.linspace(0.5, 1.5, 8, dtype=dtype)
  batch = make_batch(cfg)
  opt_state = optimizer.init(trainable)
  if layout is None:
    step = sft.make_inner_step(loss_fn, optimizer, donate=False)
  else:
    step = parallel.sharded_inner_step(loss_fn, optimizer, layout, trainable, frozen, opt_state,
                                        batch)
    trainable = sharding.place(trainable, step.in_shardings[0])
    frozen = sharding.place(frozen, step.in_shardings[1])
    opt_state = sharding.place(opt_state, step.in_shardings[2])
    batch = sharding.place(batch, step.in_shardings[3])
    weights = sharding.place(weights, step.in_shardings[4])
  history = []
  for _ in range(steps):
    before = trainable
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, weights)
    history.append(float(metrics["loss"]))
    if layout is not None:  # donated: the old buffers are gone
      assert all(x.is_deleted() for x in jax.tree.leaves(before))
  return trainable, history


def _assert_trees_close(got, want, rtol, shardings=None):
  """Per-leaf relative Frobenius error; elementwise checks would flag tiny entries of big leaves."""
  shardings = jax.tree.leaves(shardings) if shardings is not None else [None] * len(
      jax.tree.leaves(got))
  for (path, g), w, sh in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                              shardings):
    if sh is not None:
      assert g.sharding == sh, jax.tree_util.keystr(path)
    g, w = np.asarray(g), np.asarray(w)
    err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
    assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.3g} > {rtol}"


@functools.lru_cache(maxsize=None)
def _sft_reference(kind):
  return _run_sft(None, llama.tiny_config(), kind)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_sft_step_equals_single_device(mesh_shape):
  cfg = llama.tiny_config()
  want, want_losses = _sft_reference("full")
  assert want_losses[-1] < want_losses[0]  # the steps do train
  lay = layout_for(mesh_shape)
  got, losses = _run_sft(lay, cfg, "full")
  np.testing.assert_allclose(losses, want_losses, rtol=LOSS_RTOL)
  _assert_trees_close(got, want, PARAM_RTOL, lay.params(got))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_bf16_compute_step_equals_single_device(mesh_shape):
  """bf16 matmuls with f32 params (``model.compute_dtype``; the ``lowp_dot`` primitive of
  model/matmul.py) under the mesh's shardings. The sharded sums are rounded to bf16 in another
  order, so the bound is one bf16 rounding (2^-8); measured at most 1.5e-3 (losses) and 1.4e-3
  (params), the size of the same run's bf16-against-f32 difference (1.9e-3, 3.1e-3)."""
  cfg = llama.tiny_config()
  want, want_losses = _run_sft(None, cfg, "full", compute_dtype=jnp.bfloat16)
  assert want_losses[-1] < want_losses[0]
  lay = layout_for(mesh_shape)
  got, losses = _run_sft(lay, cfg, "full", compute_dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
  np.testing.assert_allclose(losses, want_losses, rtol=2.0**-8)
  _assert_trees_close(got, want, 2.0**-8, lay.params(got))


@pytest.mark.slow  # LoRA's sharding is covered by the default float64 test below
def test_sharded_lora_step_equals_single_device():
  cfg = llama.tiny_config()
  want, want_losses = _sft_reference("lora")
  lay = layout_for((2, 2, 2))
  got, losses = _run_sft(lay, cfg, "lora")
  np.testing.assert_allclose(losses, want_losses, rtol=LOSS_RTOL)
  _assert_trees_close(got, want, PARAM_RTOL, lay.params(got))


def test_sharded_step_is_exact_in_float64():
  # The f32 differences above are rounding, not a wrong program: in f64 they vanish.
  cfg = llama.tiny_config()
  with jax.enable_x64(True):
    want, want_losses = _run_sft(None, cfg, "lora", dtype=jnp.float64)
    got, losses = _run_sft(layout_for((2, 2, 2)), cfg, "lora", dtype=jnp.float64)
    assert jax.tree.leaves(got)[0].dtype == jnp.float64
  np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
  _assert_trees_close(got, want, 1e-12)


# ----------------------------------------------------------------------------- estimators

# Measured relative errors of the logits after two outer steps on the tiny model (f32): <= 4e-7
# for unroll, penalty, penalty_vf, one_step; 1.2e-6 for likelihood_ratio (its logits are scores
# / temperature, about 4 apart); 1.7e-5 for implicit (conjugate gradient amplifies rounding).
EST_RTOL = 5e-5
ESTIMATORS = {"unroll": {"k": 2}, "penalty": {}, "penalty_vf": {}, "implicit": {"iters": 5},
              "one_step": {}, "likelihood_ratio": {"fit_steps": 1}}
# The default run checks three estimators, one per mesh; `-m slow` runs every pair (about 10
# minutes on a loaded 2-core machine: each pair compiles a second-order program twice).
DEFAULT_PAIRS = {("unroll", (2, 2, 2)), ("penalty", (8, 1, 1)), ("one_step", (1, 8, 1))}
ESTIMATOR_CASES = [
    pytest.param(name, shape, marks=() if (name, shape) in DEFAULT_PAIRS else pytest.mark.slow,
                 id=f"{name}-{'x'.join(map(str, shape))}")
    for name in ESTIMATORS for shape in MESHES]


def _run_select(layout, name, steps=2):
  from bilevel_jax.core import hypergrad, select

  cfg = llama.tiny_config(n_layers=1)
  spec = lora.TrainableSpec("full")
  params = llama.init_params(cfg, jax.random.key(0))
  problem = hypergrad.Problem(sft.make_loss_fn(lora.make_logits_fn(spec, cfg)),
                              sft.sgd_or_adam("sgd", 0.1))
  est = hypergrad.make_estimator(name, **ESTIMATORS[name])
  logit_opt = select.make_logit_optimizer(est)
  n = 16
  state = select.init_state(problem, est, params, n, logit_opt)
  pool, val = make_batch(cfg, b=n, seed=3), make_batch(cfg, b=8, seed=4)

  def batches(t):  # two halves of the pool, alternating
    rows = [np.arange(8) + 8 * ((t * est.train_batches + j) % 2) for j in range(est.train_batches)]
    train = select.stack_batches([jax.tree.map(lambda x: np.asarray(x)[r], pool) for r in rows])
    return {"train": train, "val": val}

  if layout is None:
    step = select.make_outer_step(problem, est, logit_opt, donate=False)
  else:
    step = parallel.sharded_outer_step(problem, est, logit_opt, layout, state, {}, batches(0))
    state = sharding.place(state, step.in_shardings[0])
    assert state.logits.sharding == layout.omega(n)
  metrics = []
  for t in range(steps):
    b = batches(t) if layout is None else sharding.place(batches(t), step.in_shardings[2])
    state, m = step(state, {}, b, jax.random.key(t))
    metrics.append(float(m["val_loss"]))
  return state, metrics


@pytest.mark.parametrize("name,mesh_shape", ESTIMATOR_CASES)
def test_sharded_estimator_equals_single_device(name, mesh_shape):
  want, want_m = _run_select(None, name)
  lay = layout_for(mesh_shape, weights="data")
  got, got_m = _run_select(lay, name)
  assert np.ptp(np.asarray(want.logits)) > 0  # the logits moved
  np.testing.assert_allclose(got_m, want_m, rtol=LOSS_RTOL)
  _assert_trees_close(got.logits, want.logits, EST_RTOL)
  _assert_trees_close(got.est.params, want.est.params, EST_RTOL, lay.params(got.est.params))


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("mesh_shape", [
    (2, 2, 2), pytest.param((8, 1, 1), marks=pytest.mark.slow),
    pytest.param((1, 8, 1), marks=pytest.mark.slow)])
def test_sharded_sampler_equals_single_device(mesh_shape):
  from bilevel_jax import sampling

  cfg = llama.tiny_config()
  params = llama.init_params(cfg, jax.random.key(0))
  scfg = sampling.SamplerConfig(max_new_tokens=6, temperature=1.0, top_k=20, stop_ids=(3,))
  prompts = [list(range(5 + i, 7 + i + i % 4)) for i in range(8)]
  tokens, lengths = sampling.left_pad(prompts, 8, 8, scfg.pad_id)
  tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
  key = jax.random.key(5)
  want = sampling.sample_padded(params, None, tokens, lengths, key, cfg=cfg, scfg=scfg,
                                lora_scale=1.0)
  lay = layout_for(mesh_shape)
  sample = parallel.sharded_sampler(lay, cfg, scfg, params, None, tokens)
  got = sample(sharding.place(params, lay.params(params)), None, tokens, lengths, key)
  assert got.tokens.sharding == lay.rows(got.tokens)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  np.testing.assert_allclose(np.asarray(got.log_probs), np.asarray(want.log_probs), rtol=LOSS_RTOL,
                             atol=1e-5)


# ----------------------------------------------------------------------------- memory plan


def test_memory_plan_is_per_device_and_shrinks_with_fsdp():
  cfg = llama.tiny_config(d_model=64, d_ff=256, vocab_size=256)
  spec = lora.TrainableSpec("full")
  opt = optax.adam(1e-3)
  plans = parallel.plan(
      [parallel.plan_sft(cfg, spec, opt, layout_for(shape), 8, 16, name=str(shape))
       for shape in ((8, 1, 1), (1, 8, 1))], print_fn=None)
  dp, fsdp = plans
  # Params + Adam's two moments, f32: replicated under pure data parallelism ...
  state_bytes = 3 * 4 * cfg.num_params()
  assert dp.arguments >= state_bytes
  # ... and split 8 ways under FSDP (plus the small batch and the replicated step count).
  assert fsdp.arguments < state_bytes / 8 * 1.2
  assert dp.aliased > 0  # params and optimizer state are donated and updated in place
  table = parallel.format_plans(plans)
  assert "8/1/1" in table and "1/8/1" in table and "total" in table


def test_plan_from_run_config_prints_the_table():
  from bilevel_jax import config as config_lib

  cfg = config_lib.base_config()  # the tiny model
  cfg.mesh.shape = (2, -1, 1)
  cfg.data.max_len = 16
  lines = []
  plans = sharding.plan_from_config(cfg, print_fn=lines.append)
  assert [p.mesh for p in plans] == [{"data": 2, "fsdp": 4, "tensor": 1}] * 2
  assert plans[1].name == f"select_{cfg.select.estimator}"
  assert all(p.arguments > 0 and p.total >= p.arguments for p in plans)
  assert "finetune_step" in lines[-1] and "2/4/1" in lines[-1]


def test_fitting_batch_splits_rows_where_they_divide_and_replicates_otherwise():
  cfg = llama.tiny_config()
  lay = layout_for((2, 2, 2))
  assert parallel.fitting_batch(lay, make_batch(cfg, b=8))["tokens"] == lay.batch(
      make_batch(cfg, b=8))["tokens"]
  assert parallel.fitting_batch(lay, make_batch(cfg, b=6))["tokens"].spec == P("data", None)
  stacked = jax.tree.map(lambda x: x[None], make_batch(cfg, b=8))
  assert parallel.fitting_batch(lay, stacked, row_axis=1)["tokens"].spec == P(
      None, ("data", "fsdp"), None)
  # 4 rows over fsdp=8: every device computes the whole batch (the CLI's 1-device configs).
  assert parallel.fitting_batch(layout_for((1, 8, 1)), make_batch(cfg, b=4))[
      "tokens"].spec == P(None, None)


@pytest.mark.skipif(jax.device_count() != 8, reason="run_layout uses the default backend's devices")
def test_run_layout_from_config():
  from bilevel_jax import config as C
  cfg = C.base_config()
  assert cfg.mesh.shape == (1, -1, 1)  # FSDP over every device by default
  assert dict(parallel.run_layout(cfg).mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  cfg.mesh.shape = (1, 1, 1)  # one device: no mesh, the plain single-device programs
  assert parallel.run_layout(cfg) is None
  cfg.mesh.shape = (2, -1, 2)
  assert dict(parallel.run_layout(cfg).mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  cfg.mesh.shape = (2, 2, 1)
  with pytest.raises(ValueError, match="needs 4 devices, 8 are present"):
    parallel.run_layout(cfg)
