"""Meshes, logical axis rules and sharded steps on 8 fake CPU devices (see conftest.py).

Mesh equivalence tolerance (f32): a sharded program sums partial products in another order than
the single-device one (FSDP and tensor splits end in all-reduces), so results agree to f32 rounding
accumulated over a step. After three SFT steps on the tiny model we require a per-leaf relative
(Frobenius) error of at most ``PARAM_RTOL = 5e-5`` and losses within ``LOSS_RTOL = 1e-5``. Measured:
1.5e-7 for full fine-tuning, 1.1e-5 for LoRA (large steps through the low-rank product amplify
rounding); the same LoRA runs in float64 agree to 3e-15, which shows the f32 gap is rounding and
not a different program (tested below with 1e-12). Integer outputs (sampled tokens) must be equal. The optimizer in these comparisons is SGD with
momentum, which is linear in the gradient: Adam divides by ``sqrt(v) + eps`` and so turns f32
rounding noise in a near-zero gradient entry (an embedding row of a token seen once) into an O(lr)
change of the update; that is a property of Adam, not of the sharding, and the core tests compare
Adam steps in float64 for the same reason.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from bilevel_jax import sharding
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


def _run_sft(layout, cfg, kind, steps=3, dtype=jnp.float32):
  spec = lora.TrainableSpec(kind, lora_rank=4)
  cfg = cfg.replace(dtype=jnp.dtype(dtype).name)
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
    step = sharding.sharded_inner_step(loss_fn, optimizer, layout, trainable, frozen, opt_state,
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


@pytest.fixture(scope="module")
def sft_reference():
  cfg = llama.tiny_config()
  return cfg, {kind: _run_sft(None, cfg, kind) for kind in ("full", "lora")}


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_sft_step_equals_single_device(sft_reference, mesh_shape):
  cfg, refs = sft_reference
  want, want_losses = refs["full"]
  assert want_losses[-1] < want_losses[0]  # the steps do train
  lay = layout_for(mesh_shape)
  got, losses = _run_sft(lay, cfg, "full")
  np.testing.assert_allclose(losses, want_losses, rtol=LOSS_RTOL)
  _assert_trees_close(got, want, PARAM_RTOL, lay.params(got))


def test_sharded_lora_step_equals_single_device(sft_reference):
  cfg, refs = sft_reference
  want, want_losses = refs["lora"]
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
