"""Multi-host runs: JAX's multi-controller runtime, per-process data, agreed preemption stops.

Every host runs the same program (SPMD). :func:`initialize` starts ``jax.distributed`` when the
run is configured for it; afterwards ``jax.devices()`` lists every host's devices and the mesh of
:func:`bilevel_jax.sharding.make_mesh` spans them all. Each process loads only the rows of a
global batch that live on its own devices (:func:`local_rows`) and assembles the global array
with :func:`global_batch`; grain pipelines get the matching split from :func:`grain_shard_options`.

Preemption (:class:`PreemptionGuard`): a SIGTERM reaches one host (a TPU maintenance event, a
scheduler). Its handler only sets a flag; at the next check every process all-gathers the flags, so
all of them see the same answer at the same step and write the last checkpoint together (an orbax
save is collective: a host that left early would hang the others).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


def initialize(config: Any = None, *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Any = None, cpu_collectives: str = "gloo") -> bool:
  """Starts JAX's multi-controller runtime when configured; call once, before any JAX work.

  Args:
    config: ``cfg.mesh`` of a run config (or any object/mapping) with ``distributed`` (bool) and
      optionally ``coordinator_address``, ``num_processes``, ``process_id``. Keyword arguments
      override it. On Cloud TPU, GKE, SLURM and Open MPI everything is detected, so
      ``distributed=True`` alone is enough there.
    coordinator_address: ``host:port`` of process 0 (elsewhere, e.g. bare GPU hosts or tests).
    num_processes, process_id, local_device_ids: as for ``jax.distributed.initialize``.
    cpu_collectives: collectives implementation for CPU devices across processes (``gloo``;
      tests and CPU clusters). Ignored when the option does not exist.
  Returns:
    True when the runtime was started (or already running), False when not configured.
  """
  get = (config.get if isinstance(config, Mapping) or hasattr(config, "get")
         else lambda k, d=None: getattr(config, k, d)) if config is not None else (lambda k, d=None: d)
  enabled = bool(get("distributed", False)) or coordinator_address is not None
  if not enabled:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {"coordinator_address": coordinator_address or get("coordinator_address", None) or None,
            "num_processes": num_processes or get("num_processes", None) or None,
            "process_id": process_id if process_id is not None else _opt_int(get("process_id", None)),
            "local_device_ids": local_device_ids}
  if cpu_collectives:
    try:
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except (AttributeError, ValueError):  # option absent in this JAX
      pass
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _opt_int(v):
  return None if v is None or (isinstance(v, int) and v < 0) else int(v)


def is_chief() -> bool:
  """Process 0 writes metrics and reports; every process takes part in checkpoints."""
  return jax.process_index() == 0


# ----------------------------------------------------------------------------- per-process data


def local_rows(sharding: jax.sharding.Sharding, global_rows: int, row_axis: int = 0) -> np.ndarray:
  """Indices of the global batch rows that this process's devices hold, in ascending order.

  This is the order :func:`global_batch` expects the local rows in. With the batch split over
  data x fsdp every row lives on exactly one host (replicated along ``tensor``).
  """
  shape = [1] * (row_axis + 1)
  shape[row_axis] = global_rows
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    rows.update(range(*index[row_axis].indices(global_rows)))
  return np.array(sorted(rows), np.int64)


def global_batch(local: Any, shardings: Any, global_rows: int, row_axis: int = 0) -> Any:
  """Assembles global arrays from each process's rows (``jax.make_array_from_process_local_data``).

  Args:
    local: pytree of host arrays holding the rows :func:`local_rows` names, in that order.
    shardings: matching pytree of shardings (e.g. ``layout.batch(...)``).
    global_rows: rows of the global batch.
    row_axis: axis of the rows (1 for stacked train batches).
  """

  def one(x, s):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[row_axis] = global_rows
    return jax.make_array_from_process_local_data(s, x, tuple(shape))

  return jax.tree.map(one, local, shardings)


def batch_row_axis(sharding: jax.sharding.Sharding) -> int:
  """The axis a batch leaf is split on (its only non-``None`` spec entry); 0 when replicated."""
  spec = getattr(sharding, "spec", ())
  return next((i for i, s in enumerate(spec) if s is not None), 0)


def put_rows(host: Any, shardings: Any) -> Any:
  """Global batch arrays from full host batches: each process keeps only its own rows.

  Every process holds the whole (small, tokenized) batch on the host; this slices the rows
  :func:`local_rows` names for its devices and assembles the global arrays with
  :func:`global_batch`, so no process copies rows that live on another host's devices. Leaves whose
  rows are replicated (a batch that ``data x fsdp`` does not divide) take every row.
  """

  def one(x, s):
    x = np.asarray(x)
    axis = batch_row_axis(s)
    rows = local_rows(s, x.shape[axis], axis)
    return global_batch(np.take(x, rows, axis=axis), s, x.shape[axis], axis)

  return jax.tree.map(one, host, shardings)


def put(tree: Any, shardings: Any) -> Any:
  """Global arrays with ``shardings`` from values every process holds in full (params, keys).

  Each process fills only the shards its own devices hold (``jax.make_array_from_callback``), so it
  works the same with one process or many. Arrays already carrying the target sharding are passed
  through; PRNG key arrays are moved as their raw key data and wrapped again.
  """

  def one(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # Already global: reshard.
      return jax.jit(lambda a: a, out_shardings=s)(x)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = one(jax.random.key_data(x), s)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
  """NumPy copies of a pytree of (possibly multi-host) arrays, the same on every process.

  Arrays this process can read whole are copied; arrays spread over several hosts are all-gathered
  (a collective: every process must call this at the same point).
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def grain_shard_options(drop_remainder: bool = True):
  """grain's per-process split of a data source: process ``i`` of ``n`` reads shard ``i``."""
  import grain

  return grain.sharding.ShardOptions(shard_index=jax.process_index(),
                                     shard_count=jax.process_count(),
                                     drop_remainder=drop_remainder)


# ----------------------------------------------------------------------------- preemption


class Preempted(SystemExit):
  """Raised after the agreed preemption checkpoint is written; exits with 128 + SIGTERM (143).

  A ``SystemExit`` so that the command line ends with the conventional status of a SIGTERM-ed
  process and no traceback; the next run with the same config resumes from the checkpoint.
  """

  def __init__(self, message: str):
    super().__init__(128 + signal.SIGTERM)
    self.message = message

  def __str__(self) -> str:
    return self.message


class PreemptionGuard:
  """Turns a SIGTERM on any host into a stop that every host takes at the same step.

  Usage::

      with PreemptionGuard() as guard:
        for step in range(start, num_steps):
          state = train_step(state, ...)
          if guard.should_stop(step):      # collective: every process calls it at each step
            checkpointer.save(step + 1, state, force=True)
            break

  Args:
    signals: the signals to catch (SIGTERM by default).
    every: all-gather the flags only every ``every`` calls (each check is a small collective);
      ``should_stop`` returns False between checks, on every process alike.
  """

  def __init__(self, signals=(signal.SIGTERM,), every: int = 1):
    self.signals, self.every = tuple(signals), max(int(every), 1)
    self._flag = threading.Event()
    self._previous: dict = {}
    self._calls = 0

  def _handler(self, signum, frame):
    del frame
    log.warning("process %d received signal %d; stopping at the next agreed step",
                jax.process_index(), signum)
    self._flag.set()

  def __enter__(self) -> "PreemptionGuard":
    # Python installs signal handlers from the main thread only; elsewhere (a loop driven from a
    # worker thread) the guard stays passive and the process keeps its default SIGTERM behaviour.
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionGuard: not on the main thread; SIGTERM is not caught")
      return self
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()

  @property
  def local_request(self) -> bool:
    """This process received a signal (not yet agreed with the others)."""
    return self._flag.is_set()

  def should_stop(self, step: int | None = None) -> bool:
    """True on every process once any process received a signal (checked every ``every`` calls).

    Must be called by every process the same number of times (it is a collective when several
    processes run).
    """
    del step
    self._calls += 1
    if self._calls % self.every:
      return False
    if jax.process_count() == 1:
      return self._flag.is_set()
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self._flag.is_set()], np.int32))
    return bool(np.any(flags))
