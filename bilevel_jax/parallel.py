"""Sharded versions of the pure steps, and the memory plan that is printed before a long run.

Each builder takes a :class:`~bilevel_jax.sharding.Layout` and example trees (arrays or
``jax.ShapeDtypeStruct``) and returns a :class:`~bilevel_jax.sharding.ShardedFunction`: the step
``jax.jit``-ed with explicit ``in_shardings``/``out_shardings`` and its state donated.

* :func:`sharded_inner_step`: ``core.sft.inner_step`` (fine-tuning, baselines).
* :func:`sharded_outer_step`: one outer step of bilevel selection with any estimator of
  ``core.hypergrad`` (``core.select.make_outer_step``).
* :func:`sharded_sampler`: the sampler's prefill + decode loop for one padded batch.

The CLI's training loops (``bilevel_jax.loops``) ask :func:`run_layout` for the run's layout and
place their state with the same shardings (:func:`select_state_shardings`, ``Layout.params`` /
``Layout.opt_state``, :func:`fitting_batch`).

:func:`memory_plan` lowers and compiles a step on abstract arguments (no device memory is used) and
reads ``compiled.memory_analysis()``, which reports the bytes of ONE device's program: with SPMD
every device runs the same partitioned program, so the numbers are per device.
:func:`plan_from_config` does this for a run config (``bilevel-jax plan --config ...``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from bilevel_jax.sharding import Layout, ShardedFunction, abstract, shard_jit

Params = Any
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sharded steps


def fitting_batch(layout: Layout, tree: Any, row_axis: int = 0) -> Any:
  """Batch shardings like ``Layout.batch``, for any row count.

  Rows are split over ``data`` x ``fsdp`` when that divides them, else over the longest prefix of
  those axes that does, else replicated (every device then computes the whole batch: correct, but
  without the data-parallel speed-up; ``Layout.batch`` raises instead). The CLI uses this so a
  config written for one device (say batch 4) still runs on 8.
  """
  from bilevel_jax import sharding

  want = math.prod(layout.mesh.shape[a] for a in sharding.BATCH_AXES)

  def one(x):
    shape = tuple(x.shape)
    logical = [None] * len(shape)
    logical[row_axis] = "batch"
    spec = sharding.logical_to_spec(logical, shape, layout.mesh, layout.rules)
    axes = spec[row_axis] or ()
    split = math.prod(layout.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    short.add((shape[row_axis], split))
    return layout.sharding(spec)

  short: set = set()
  out = jax.tree.map(one, tree)
  for rows, split in sorted(short):
    if split < want:  # Said once per batch, not per field.
      log.warning("batch of %d rows is not divisible by data x fsdp = %d: its rows are split %d "
                  "way(s) only (%d rows per device group); use a multiple of %d",
                  rows, want, split, rows // split, want)
  return out


def sharded_inner_step(loss_fn, optimizer, layout: Layout, trainable: Params, frozen: Params,
                       opt_state: Any, batch: dict, *, donate: bool = True) -> ShardedFunction:
  """``core.sft.inner_step`` on ``layout``: params by the logical rules, optimizer state following
  them, batch rows and per-row weights over data x fsdp, metrics replicated.

  Returns:
    ``step(trainable, frozen, opt_state, batch, weights) -> (trainable, opt_state, metrics)`` with
    ``trainable`` and ``opt_state`` donated.
  """
  from bilevel_jax.core import sft

  t_sh, f_sh = layout.params(trainable), layout.params(frozen)
  o_sh = layout.opt_state(opt_state, trainable, t_sh)
  b_sh = layout.batch(batch)
  rows = jax.tree.leaves(batch)[0].shape[0]
  w_sh = layout.batch(jax.ShapeDtypeStruct((rows,), jnp.float32))

  def step(trainable, frozen, opt_state, batch, weights):
    return sft.inner_step(loss_fn, optimizer, trainable, frozen, opt_state, batch, weights)

  return shard_jit(step, layout.mesh, (t_sh, f_sh, o_sh, b_sh, w_sh),
                   (t_sh, o_sh, layout.replicated()), donate_argnums=(0, 2) if donate else ())


def select_state_shardings(layout: Layout, state: Any) -> Any:
  """Shardings of a ``core.select.SelectState``: the estimator's params and every params-shaped
  copy (optimizer state, auxiliary or fitted models) follow the params; the logits and their
  optimizer state go where ``layout.weights`` says; counters are replicated."""
  params = state.est.params
  p_sh = layout.params(params)
  est = layout.follow(state.est, params, p_sh)
  est = est._replace(params=p_sh)
  return type(state)(est=est, logits=layout.omega(state.logits.shape[0]),
                     logit_opt_state=layout.omega_tree(state.logit_opt_state),
                     step=layout.replicated())


def sharded_outer_step(problem, estimator, logit_optimizer, layout: Layout, state: Any,
                       frozen: Params, batches: dict, *, donate: bool = True) -> ShardedFunction:
  """One outer step of bilevel selection (any estimator) on ``layout``.

  Args:
    problem, estimator, logit_optimizer: as for ``core.select.make_outer_step``.
    layout: mesh and rules.
    state: an example ``SelectState`` (``core.select.init_state``), arrays or shape structs.
    frozen: the frozen params.
    batches: ``{"train": [S, B, ...] stacked batches, "val": [B', ...]}``.
  Returns:
    ``outer_step(state, frozen, batches, key) -> (state, metrics)`` with ``state`` donated.
  """
  from bilevel_jax.core import select

  s_sh = select_state_shardings(layout, state)
  b_sh = {"train": layout.batch(batches["train"], row_axis=1), "val": layout.batch(batches["val"])}
  step = select.make_outer_step(problem, estimator, logit_optimizer, jit=False)
  return shard_jit(step, layout.mesh, (s_sh, layout.params(frozen), b_sh, layout.replicated()),
                   (s_sh, layout.replicated()), donate_argnums=(0,) if donate else ())


def sharded_sampler(layout: Layout, cfg, scfg, params: Params, lora: Params | None,
                    tokens: Any, lora_scale: float = 1.0) -> ShardedFunction:
  """The sampler (``sampling.sample_padded``) for one padded batch shape on ``layout``.

  Prompt rows are split over data x fsdp when they divide (replicated otherwise); the KV cache
  the sampler builds inside follows them. Nothing is donated (params are reused).

  Returns:
    ``sample(params, lora, tokens, prompt_lengths, key) -> SampleOutput``.
  """
  from bilevel_jax import sampling

  fn = functools.partial(sampling._sample_padded, cfg=cfg, scfg=scfg, lora_scale=lora_scale)
  rows = abstract(tokens)
  lengths = jax.ShapeDtypeStruct(rows.shape[:1], jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  out = jax.eval_shape(fn, abstract(params), None if lora is None else abstract(lora), rows,
                       lengths, key)
  in_sh = (layout.params(params), None if lora is None else layout.params(lora),
           layout.rows(rows), layout.rows(lengths), layout.replicated())
  return shard_jit(fn, layout.mesh, in_sh, layout.rows(out))


# ----------------------------------------------------------------------------- memory plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device memory of one compiled step (bytes; from ``compiled.memory_analysis()``).

  Attributes:
    name: what was compiled.
    mesh: mesh axis sizes.
    arguments, outputs, temps, code: bytes of arguments, outputs, temporaries and generated code.
    aliased: output bytes that reuse donated argument buffers (counted once).
    capacity: bytes one device has (``memory_stats()["bytes_limit"]``); None when unknown (CPU).
  """

  name: str
  mesh: dict
  arguments: int
  outputs: int
  temps: int
  code: int
  aliased: int
  capacity: int | None

  @property
  def total(self) -> int:
    """Peak estimate: live arguments + new outputs + temporaries + code."""
    return self.arguments + self.outputs - self.aliased + self.temps + self.code

  @property
  def fits(self) -> bool | None:
    return None if self.capacity is None else self.total <= self.capacity


def first_local_device(mesh) -> jax.Device:
  """The first device of ``mesh`` that this process owns (the mesh's first device belongs to
  process 0; on other hosts it is not addressable and its memory cannot be queried)."""
  me = jax.process_index()
  return next((d for d in mesh.devices.flat if d.process_index == me), mesh.devices.flat[0])


def device_capacity(device: jax.Device | None = None) -> int | None:
  """Bytes of memory of ``device`` (GPU/TPU), or None where the runtime does not say (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement it
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def memory_plan(fn: ShardedFunction, *args, name: str | None = None) -> MemoryPlan:
  """Lowers and compiles ``fn`` for ``args`` (arrays or ``ShapeDtypeStruct`` with shardings; no
  device memory is allocated for them) and returns its per-device memory."""
  compiled = fn.lower(*args).compile()
  stats = compiled.memory_analysis()
  mesh = dict(fn.mesh.shape)
  return MemoryPlan(name=name or getattr(fn, "__name__", "step"), mesh=mesh,
                    arguments=int(stats.argument_size_in_bytes),
                    outputs=int(stats.output_size_in_bytes), temps=int(stats.temp_size_in_bytes),
                    code=int(stats.generated_code_size_in_bytes),
                    aliased=int(stats.alias_size_in_bytes),
                    capacity=device_capacity(first_local_device(fn.mesh)))


def _gib(n: int | None) -> str:
  return "?" if n is None else f"{n / 2**30:.3f}"


def format_plans(plans: Sequence[MemoryPlan]) -> str:
  """A fixed-width table (GiB per device)."""
  head = ("step", "mesh d/f/t", "args", "outputs", "aliased", "temps", "total", "device", "fits")
  rows = [head]
  for p in plans:
    fits = "?" if p.fits is None else ("yes" if p.fits else "NO")
    rows.append((p.name, "/".join(str(p.mesh.get(a, 1)) for a in ("data", "fsdp", "tensor")),
                 _gib(p.arguments), _gib(p.outputs), _gib(p.aliased), _gib(p.temps),
                 _gib(p.total), _gib(p.capacity), fits))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines + ["(GiB per device; total = args + outputs - aliased + temps + code)"])


def plan(entries: Sequence[tuple[str, ShardedFunction, Sequence[Any]]],
         print_fn: Callable[[str], None] | None = print) -> list[MemoryPlan]:
  """Compiles each ``(name, fn, args)`` and prints the table (``print_fn=None`` to stay quiet)."""
  plans = [memory_plan(fn, *args, name=name) for name, fn, args in entries]
  if print_fn is not None:
    print_fn(format_plans(plans))
  return plans


def abstract_batch(cfg, rows: int, seq_len: int, prefix_hidden: bool = False,
                   steps: int | None = None) -> dict:
  """Shape structs of a training batch (see ``core/sft.py``), optionally stacked ``steps`` deep."""
  lead = (rows,) if steps is None else (steps, rows)
  i32 = lambda *s: jax.ShapeDtypeStruct(lead + s, jnp.int32)
  batch = {"tokens": i32(seq_len), "targets": i32(seq_len), "positions": i32(seq_len),
           "segment_ids": i32(seq_len), "index": i32(),
           "loss_mask": jax.ShapeDtypeStruct(lead + (seq_len,), jnp.float32)}
  if prefix_hidden:
    batch["prefix_hidden"] = jax.ShapeDtypeStruct(lead + (seq_len, cfg.d_model), cfg.compute_dtype)
  return batch


def _abstract_model(cfg, spec, dtype) -> tuple[Params, Params]:
  from bilevel_jax.model import llama, lora

  def build(key):
    params = llama.init_params(cfg, key, dtype)
    adapters = lora.init_lora(cfg, spec, key, dtype) if spec.kind == "lora" else None
    return lora.split(spec, cfg, params, adapters)

  return jax.eval_shape(build, jax.random.key(0))


def _placed(layout: Layout, fn: ShardedFunction, *trees) -> list:
  return [abstract(t, s) for t, s in zip(trees, fn.in_shardings)]


def plan_sft(cfg, spec, optimizer, layout: Layout, batch_size: int, seq_len: int,
             dtype=jnp.float32, name: str = "sft_step") -> tuple[str, ShardedFunction, list]:
  """A ``plan`` entry for the SFT step of ``cfg`` (built from shapes only)."""
  from bilevel_jax.core import sft
  from bilevel_jax.model import lora

  trainable, frozen = _abstract_model(cfg, spec, dtype)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  batch = abstract_batch(cfg, batch_size, seq_len, prefix_hidden=spec.kind == "last_n_layers")
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(spec, cfg))
  fn = sharded_inner_step(loss_fn, optimizer, layout, trainable, frozen, opt_state, batch)
  weights = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  return name, fn, _placed(layout, fn, trainable, frozen, opt_state, batch, weights)


def plan_outer(cfg, spec, problem, estimator, logit_optimizer, layout: Layout, num_examples: int,
               batch_size: int, val_batch_size: int, seq_len: int, dtype=jnp.float32,
               name: str | None = None) -> tuple[str, ShardedFunction, list]:
  """A ``plan`` entry for one outer selection step with ``estimator`` (shapes only)."""
  from bilevel_jax.core import select

  trainable, frozen = _abstract_model(cfg, spec, dtype)
  state = jax.eval_shape(
      lambda t: select.init_state(problem, estimator, t, num_examples, logit_optimizer), trainable)
  prefix = spec.kind == "last_n_layers"
  batches = {"train": abstract_batch(cfg, batch_size, seq_len, prefix, estimator.train_batches),
             "val": abstract_batch(cfg, val_batch_size, seq_len, prefix)}
  fn = sharded_outer_step(problem, estimator, logit_optimizer, layout, state, frozen, batches)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return (name or f"select_{estimator.name}", fn,
          _placed(layout, fn, state, frozen, batches, key))


def with_run_settings(mcfg, model):
  """``mcfg`` with the run's remat and compute dtype (``model.compute_dtype``; "" means
  ``model.dtype``): one rule for the loaded model and for the memory plan."""
  return mcfg.replace(remat=model.remat, dtype=model.compute_dtype or model.dtype)


def model_config_from_run_config(cfg):
  """The ``LlamaConfig`` a run config describes, read without loading any weights."""
  from bilevel_jax.model import llama, load

  m = cfg.model
  if m.source == "tiny":
    from bilevel_jax.model.tokenizer import ByteTokenizer
    mcfg = llama.tiny_config(vocab_size=ByteTokenizer().vocab_size, d_model=m.tiny_d_model,
                             n_layers=m.tiny_n_layers)
  elif m.source == "smollm2":
    mcfg = llama.SMOLLM2_135M
  elif m.source == "safetensors":
    path = Path(m.path) / "config.json"
    mcfg = load.config_from_hf(json.loads(path.read_text()), str(path))
  else:
    import gguf
    reader = gguf.GGUFReader(str(m.path))
    mcfg = load.config_from_gguf(load.read_gguf_metadata(m.path, reader),
                                 [t.name for t in reader.tensors], str(m.path))
  return with_run_settings(mcfg, m)


def layout_from_config(cfg) -> Layout:
  """The layout of ``cfg.mesh``: ``shape`` (data, fsdp, tensor), optional ``rules`` and ``weights``."""
  from bilevel_jax import sharding
  mesh = cfg.mesh
  return sharding.make_layout(tuple(mesh.shape), rules=mesh.get("rules", "fsdp"),
                              weights=mesh.get("weights", "replicated"))


def run_layout(cfg) -> Layout | None:
  """The layout a run of ``cfg`` trains on, or None for the plain single-device path.

  A mesh is used when ``cfg.mesh.shape`` resolves to more than one device or ``mesh.distributed``
  is set. ``(1, 1, 1)`` (or a ``-1`` shape on a one-device machine) keeps the plain single-device
  programs, bit for bit, on the default device even when more devices are present.

  Raises:
    ValueError: when a shape of more than one device does not match the devices present.
  """
  from bilevel_jax import sharding
  shape = tuple(int(s) for s in cfg.mesh.shape)
  sizes = (sharding.resolve_mesh_shape(sharding._mesh_shape_from(shape), jax.device_count())
           if -1 in shape else shape)
  if math.prod(sizes) == 1 and not cfg.mesh.distributed:
    return None
  return layout_from_config(cfg)


def plan_from_config(cfg, print_fn: Callable[[str], None] | None = print) -> list[MemoryPlan]:
  """Memory plan of a run config: the fine-tuning step and the selection outer step.

  Compiles both on the configured mesh from shapes alone (no weights are loaded, nothing is
  allocated) and prints the per-device table.
  """
  from bilevel_jax.core import hypergrad, select, sft
  from bilevel_jax.model import lora

  mcfg = model_config_from_run_config(cfg)
  layout = layout_from_config(cfg)
  spec = lora.TrainableSpec.from_config(cfg.model.trainable)
  dtype, seq = jnp.dtype(cfg.model.dtype), cfg.data.max_len
  ft = sft.sgd_or_adam(cfg.finetune.optimizer, cfg.finetune.lr,
                       weight_decay=cfg.finetune.weight_decay)
  s = cfg.select
  est = hypergrad.make_estimator(s.estimator, **s.estimator_kwargs.to_dict())
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(spec, mcfg))
  problem = hypergrad.Problem(loss_fn, sft.sgd_or_adam(s.inner_optimizer, s.inner_lr),
                              s.parametrization)
  logit_opt = select.make_logit_optimizer(est, s.logits_optimizer, s.logits_lr)
  n = cfg.data.pool_size or 1024  # the logit vector's length barely matters for memory
  n = int(math.ceil(n / layout.mesh.shape["data"]) * layout.mesh.shape["data"])
  entries = [plan_sft(mcfg, spec, ft, layout, cfg.finetune.batch_size, seq, dtype,
                      name=f"finetune_step ({cfg.finetune.optimizer})"),
             plan_outer(mcfg, spec, problem, est, logit_opt, layout, n, cfg.data.batch_size,
                        cfg.data.val_batch_size, seq, dtype)]
  if print_fn is not None:
    print_fn(f"memory plan: model {cfg.model.source} ({mcfg.num_params() / 1e6:.1f}M params, "
             f"{cfg.model.dtype}), trainable {spec.kind}, seq {seq}, "
             f"{len(layout.mesh.devices.flat)} x {layout.mesh.devices.flat[0].platform}")
  return plan(entries, print_fn)
