"""Device meshes and explicit shardings for params, optimizer state, weight logits and batches.

One place builds the mesh (:func:`make_mesh`); everything else asks a :class:`Layout` (mesh plus
logical axis rules) for ``NamedSharding`` pytrees and wraps pure steps with :func:`shard_jit`.

Mesh axes are ``data`` (pure data parallelism: params replicated), ``fsdp`` (data parallelism with
params, gradients and optimizer state sharded, gathered layer by layer by XLA) and ``tensor``
(attention heads, MLP hidden units and the vocabulary split across devices). Batches are split
over ``data`` x ``fsdp``.

Every param of :mod:`bilevel_jax.model.llama` and every LoRA factor has *logical* axis names
(:data:`PARAM_LOGICAL_AXES`); rules map logical names to mesh axes (:data:`FSDP_RULES`, the
default). A dimension that a mesh axis does not divide is sharded over the longest prefix of its
mesh axes that does divide it, or replicated (e.g. the tiny test vocabulary of 97, or the KV cache's
3 KV heads of SmolLM2 over 2 tensor devices), so any model runs on any mesh. Projection weights
hold their heads flattened (``n_heads * head_dim`` columns), so the divisibility test sees that
flattened size: SmolLM2's ``wk`` (192 = 3 x 64 columns) IS split over 2 tensor devices, 96 columns
each, cutting a head in half. That is still exact, but XLA then reshards around attention; pick a
``tensor`` size that divides the number of KV heads.

The mesh axes are ``AxisType.Auto``: with JAX's new default (Explicit axes) the model's embedding
gather raises ``ShardingTypeError`` (DESIGN.md section 7), and Auto lets XLA's partitioner place
the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axes of each param kind (weights stored (in, out); layers stacked on a leading axis).
PARAM_LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    "attn_norm": ("layers", "norm"),
    "mlp_norm": ("layers", "norm"),
    "wq": ("layers", "embed", "q_heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "q_heads", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "bq": ("layers", "q_heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
}
# KV cache leaves (see llama.KVCache): k, v [L, B, S, KV, hd], segment_ids [B, S], index [].
CACHE_LOGICAL_AXES = {"k": ("layers", "batch", "length", "cache_heads", "head_dim"),
                      "v": ("layers", "batch", "length", "cache_heads", "head_dim"),
                      "segment_ids": ("batch", "length"), "index": ()}

Rules = tuple[tuple[str, Any], ...]
# FSDP by default: the model dimension is split over fsdp, heads/MLP/vocab over tensor. LoRA
# factors follow their base weight on the shared dimension; the rank is small and replicated.
FSDP_RULES: Rules = (
    ("batch", BATCH_AXES), ("vocab", "tensor"), ("embed", "fsdp"), ("q_heads", "tensor"),
    ("kv_heads", "tensor"), ("mlp", "tensor"), ("cache_heads", "tensor"), ("layers", None),
    ("norm", None), ("lora_rank", None), ("length", None), ("head_dim", None),
)
# Plain data parallelism (params replicated); for models that fit one device many times over.
DP_RULES: Rules = tuple((name, BATCH_AXES if name == "batch" else None) for name, _ in FSDP_RULES)
RULE_SETS = {"fsdp": FSDP_RULES, "dp": DP_RULES}


# ----------------------------------------------------------------------------- mesh


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor) with at most one ``-1`` filled so the product is ``n_devices``."""
  unknown = [k for k in shape if k not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"mesh: {n_devices} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))} (product {known})")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{n_devices} are present")
  return tuple(sizes)


def _mesh_shape_from(config: Any) -> dict[str, int]:
  if config is None:
    return {"data": 1, "fsdp": -1, "tensor": 1}
  if isinstance(config, Mapping):
    return dict(config)
  if isinstance(config, Sequence):
    return dict(zip(MESH_AXES, config))
  return {a: getattr(config, a) for a in MESH_AXES if hasattr(config, a)}


def make_mesh(config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh with Auto axes.

  Args:
    config: mesh sizes as a mapping or config object with fields ``data``, ``fsdp``, ``tensor``
      (missing ones are 1), or a 3-tuple; one size may be ``-1`` to take the remaining devices.
      ``None`` puts every device on ``fsdp``.
    devices: devices to use; defaults to all global devices (every host's, on multi-host runs).
  Returns:
    A ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "tensor")``, all ``AxisType.Auto``.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(_mesh_shape_from(config), len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ----------------------------------------------------------------------------- logical axes


def _fitting_axes(dim: int, axes: Any, mesh: Mesh, used: set[str]) -> Any:
  """The longest prefix of ``axes`` (not used elsewhere in the spec) whose size divides ``dim``."""
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  chosen = []
  for a in axes:
    if a in used or dim % (math.prod(mesh.shape[x] for x in chosen) * mesh.shape[a]):
      break
    chosen.append(a)
  chosen = [a for a in chosen if mesh.shape[a] > 1]  # size-1 axes add nothing; keeps specs short
  used.update(chosen)
  if not chosen:
    return None
  return chosen[0] if len(chosen) == 1 else tuple(chosen)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = FSDP_RULES) -> P:
  """A PartitionSpec for an array with the given logical axes (non-dividing axes are dropped)."""
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
  table = dict(rules)
  used: set[str] = set()
  return P(*(_fitting_axes(d, table.get(name) if name else None, mesh, used)
             for name, d in zip(logical, shape)))


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_logical_axes(names: Sequence[str], ndim: int) -> tuple[str | None, ...]:
  """Logical axes of a model or LoRA leaf from its dict-key path (e.g. ``("layers", "wq", "a")``).

  Raises:
    ValueError: for a leaf that is neither a llama param nor a LoRA factor.
  """
  where = "/".join(names) or "<root>"
  if len(names) >= 2 and names[-1] in ("a", "b") and names[-2] in PARAM_LOGICAL_AXES:
    base = PARAM_LOGICAL_AXES[names[-2]]  # LoRA factor of a (layers, in, out) weight
    axes = (base[0], base[1], "lora_rank") if names[-1] == "a" else (base[0], "lora_rank", base[2])
  elif names and names[-1] in PARAM_LOGICAL_AXES:
    axes = PARAM_LOGICAL_AXES[names[-1]]
  else:
    raise ValueError(f"sharding: no logical axes for param {where!r}; add it to "
                     "PARAM_LOGICAL_AXES")
  if ndim == len(axes) - 1 and axes[0] == "layers":  # a single, unstacked layer
    axes = axes[1:]
  if ndim != len(axes):
    raise ValueError(f"sharding: param {where!r} has {ndim} dims, expected {len(axes)} {axes}")
  return axes


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus the rules that place every kind of array on it.

  Attributes:
    mesh: the device mesh (see :func:`make_mesh`).
    rules: logical-axis rules (:data:`FSDP_RULES` or :data:`DP_RULES` or your own).
    weights: ``"replicated"`` or ``"data"``: where the weight-logit vector omega lives.
  """

  mesh: Mesh
  rules: Rules = FSDP_RULES
  weights: str = "replicated"

  def __post_init__(self):
    if self.weights not in ("replicated", "data"):
      raise ValueError(f"layout: weights must be 'replicated' or 'data', got {self.weights!r}")

  def sharding(self, spec: P = P()) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def params(self, tree: Any) -> Any:
    """NamedShardings for a model, trainable/frozen part or LoRA pytree (arrays or shape structs)."""

    def one(path, x):
      shape = _shape(x)
      return self.sharding(logical_to_spec(param_logical_axes(_dict_keys(path), len(shape)),
                                           shape, self.mesh, self.rules))

    return jax.tree_util.tree_map_with_path(one, tree)

  def opt_state(self, opt_state: Any, params: Any, param_shardings: Any | None = None) -> Any:
    """Optimizer-state shardings that follow the params.

    A state leaf whose dict-key path ends with a param's path and has that param's shape (Adam's
    ``mu``/``nu``, momentum, ...) gets the param's sharding; anything else (step counts, scalars)
    is replicated.
    """
    if param_shardings is None:
      param_shardings = self.params(params)
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(param_shardings)):
      by_path[_dict_keys(path)] = (_shape(p), s)

    def one(path, x):
      names, shape = _dict_keys(path), _shape(x)
      for start in range(len(names) + 1):
        hit = by_path.get(names[start:])
        if hit is not None and hit[0] == shape:
          return hit[1]
      return self.replicated()

    return jax.tree_util.tree_map_with_path(one, opt_state)

  def follow(self, tree: Any, params: Any, param_shardings: Any | None = None) -> Any:
    """Shardings for any state that carries copies of ``params`` (an estimator's warm-started
    inner model, auxiliary copies, their optimizer states): leaves matching a param by path suffix
    and shape follow it, everything else is replicated. Same rule as :meth:`opt_state`."""
    return self.opt_state(tree, params, param_shardings)

  def batch(self, tree: Any, row_axis: int = 0) -> Any:
    """Every batch leaf split on its row axis over ``data`` x ``fsdp``.

    Args:
      tree: a batch (arrays or shape structs).
      row_axis: which axis holds the rows (1 for batches stacked on a leading step axis).
    Raises:
      ValueError: when a leaf's rows are not divisible by ``data * fsdp`` devices.
    """
    n = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
    axes = tuple(a for a in BATCH_AXES if self.mesh.shape[a] > 1)
    lead = axes[0] if len(axes) == 1 else (axes or None)

    def one(path, x):
      shape = _shape(x)
      if len(shape) <= row_axis or shape[row_axis] % n:
        raise ValueError(f"sharding: batch field {jax.tree_util.keystr(path)} has shape {shape}; "
                         f"its row axis {row_axis} must be divisible by data*fsdp = {n}")
      spec = [None] * len(shape)
      spec[row_axis] = lead
      return self.sharding(P(*spec))

    return jax.tree_util.tree_map_with_path(one, tree)

  def omega(self, n: int) -> NamedSharding:
    """Sharding of the weight-logit vector of length ``n`` (and of its optimizer state).

    Raises:
      ValueError: in ``"data"`` mode when ``n`` is not divisible by the ``data`` axis.
    """
    if self.weights == "replicated" or self.mesh.shape["data"] == 1:
      return self.replicated()
    if n % self.mesh.shape["data"]:
      raise ValueError(f"sharding: weight logits of length {n} cannot be split over data="
                       f"{self.mesh.shape['data']}; pad the pool or use weights='replicated'")
    return self.sharding(P("data"))

  def omega_tree(self, tree: Any) -> Any:
    """Shardings for omega's optimizer state: vectors like omega follow it, scalars replicate."""
    return jax.tree.map(lambda x: self.omega(_shape(x)[0]) if len(_shape(x)) == 1
                        else self.replicated(), tree)

  def cache(self, cache: Any) -> Any:
    """Shardings for a ``llama.KVCache`` (rows over data x fsdp where they divide, KV heads over
    tensor where they divide); a per-layer cache gets one sharding per layer."""
    def one(name, x):
      axes = CACHE_LOGICAL_AXES[name]
      if isinstance(x, (tuple, list)):  # per-layer k/v: each array lacks the "layers" axis
        return tuple(self.sharding(logical_to_spec(axes[1:], _shape(a), self.mesh, self.rules))
                     for a in x)
      return self.sharding(logical_to_spec(axes, _shape(x), self.mesh, self.rules))
    return type(cache)(**{name: one(name, x) for name, x in cache._asdict().items()})

  def rows(self, tree: Any) -> Any:
    """Leading-axis sharding over data x fsdp where it divides, else replicated (e.g. prompts)."""
    def one(x):
      shape = _shape(x)
      logical = ("batch",) + (None,) * (len(shape) - 1) if shape else ()
      return self.sharding(logical_to_spec(logical, shape, self.mesh, self.rules))
    return jax.tree.map(one, tree)


def make_layout(mesh_config: Any = None, *, rules: str | Rules = "fsdp", weights: str = "replicated",
                devices: Sequence[jax.Device] | None = None) -> Layout:
  """Mesh and layout from config values (``rules`` is ``"fsdp"``, ``"dp"`` or a rules tuple)."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f"sharding rules must be one of {sorted(RULE_SETS)}, got {rules!r}")
    rules = RULE_SETS[rules]
  return Layout(make_mesh(mesh_config, devices), rules, weights)


# ----------------------------------------------------------------------------- placing and jitting


def place(tree: Any, shardings: Any) -> Any:
  """``jax.device_put`` a pytree onto matching shardings (host arrays are split, not copied whole)."""
  return jax.device_put(tree, shardings)


def abstract(tree: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings when given) of a pytree of arrays or shape structs."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(_shape(x), x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=s),
                      tree, shardings)


class ShardedFunction:
  """A ``jax.jit`` function with explicit shardings, traced and run with its mesh in context.

  The mesh context lets the wrapped code use bare ``jax.P`` specs in
  ``jax.lax.with_sharding_constraint``. ``in_shardings``/``out_shardings`` are kept so callers can
  place their arguments (:func:`place`) and build abstract arguments for :func:`memory_plan`.
  """

  def __init__(self, fn: Callable, mesh: Mesh, in_shardings: Any, out_shardings: Any,
               donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = ()):
    self.mesh, self.in_shardings, self.out_shardings = mesh, in_shardings, out_shardings
    self.donate_argnums = tuple(donate_argnums)
    self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                          donate_argnums=self.donate_argnums, static_argnums=tuple(static_argnums))
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def _to_shardings(mesh: Mesh, specs: Any) -> Any:
  def one(s):
    return NamedSharding(mesh, s) if isinstance(s, P) else s
  return jax.tree.map(one, specs, is_leaf=lambda s: isinstance(s, (P, NamedSharding)))


def shard_jit(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any, *,
              donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = ()
              ) -> ShardedFunction:
  """``jax.jit(fn)`` with explicit in/out shardings and donation, for any pure step.

  Args:
    fn: the pure function (an SFT step, a hypergradient estimator, a sampler).
    mesh: the mesh the specs refer to.
    in_specs: a pytree prefix of ``fn``'s positional arguments with ``PartitionSpec`` or
      ``NamedSharding`` leaves (e.g. from :class:`Layout` methods).
    out_specs: the same for the outputs.
    donate_argnums: arguments whose buffers the step may reuse (state the caller drops).
    static_argnums: hashable, non-array arguments.
  Returns:
    A :class:`ShardedFunction`.
  """
  return ShardedFunction(fn, mesh, _to_shardings(mesh, in_specs), _to_shardings(mesh, out_specs),
                         donate_argnums, static_argnums)


def init_sharded(init_fn: Callable[..., Any], shardings_of: Callable[[Any], Any], *args) -> Any:
  """Runs ``init_fn(*args)`` jitted with ``out_shardings`` so every leaf is born sharded.

  Args:
    init_fn: a pure initializer (``llama.init_params`` with its config bound, ``optimizer.init``).
    shardings_of: maps the abstract output (from ``jax.eval_shape``) to its shardings, e.g.
      ``layout.params``.
    *args: arrays the initializer takes (keys, params).
  """
  out = shardings_of(jax.eval_shape(init_fn, *args))
  return jax.jit(init_fn, out_shardings=out)(*args)


def init_params(cfg, key: jax.Array, layout: Layout, dtype=jnp.float32) -> Any:
  """``llama.init_params`` born sharded on ``layout`` (never materialized on one device)."""
  from bilevel_jax.model import llama
  return init_sharded(lambda k: llama.init_params(cfg, k, dtype), layout.params, key)


def init_lora(cfg, spec, key: jax.Array, layout: Layout, dtype=jnp.float32) -> Any:
  """``lora.init_lora`` born sharded on ``layout``."""
  from bilevel_jax.model import lora
  return init_sharded(lambda k: lora.init_lora(cfg, spec, k, dtype), layout.params, key)


def init_opt_state(optimizer, params: Any, layout: Layout) -> Any:
  """``optimizer.init(params)`` born with shardings that follow ``params`` (see Layout.opt_state)."""
  param_sh = layout.params(params)
  return init_sharded(optimizer.init, lambda st: layout.opt_state(st, params, param_sh), params)


def plan_from_config(cfg, print_fn=print):
  """``bilevel-jax plan``: compiles the run's steps and prints their per-device memory (see
  :func:`bilevel_jax.parallel.plan_from_config`)."""
  from bilevel_jax import parallel
  return parallel.plan_from_config(cfg, print_fn=print_fn)
