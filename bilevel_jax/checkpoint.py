"""Checkpoints that let any run resume exactly: an orbax ``CheckpointManager`` wrapper.

One checkpoint (one step directory) holds two items:

* ``state``: a pytree of arrays saved with orbax's standard (tensorstore/OCDBT) handler: the
  trainable params, their optimizer state, the weight logits and their optimizer state, and any
  other arrays a loop carries (estimator state, counters as arrays).
* ``meta``: JSON: the step, the resolved config, the dataset fingerprint, the grain iterator state
  (JSON-encoded, bytes as base64) and small loop bookkeeping (``extra``).

Saves are atomic (orbax writes into a ``*.orbax-checkpoint-tmp`` directory and renames it when the
write is complete) and asynchronous (the device-to-host copy happens before :meth:`save` returns, so
the caller may donate its buffers right after; the disk write runs in a background thread). A
process killed mid-save leaves only a temporary directory, which a new manager ignores.

:meth:`Checkpointer.restore_latest` walks the finished steps from the newest down and returns the
first that restores cleanly, so a corrupt latest checkpoint falls back to the one before; a
checkpoint written for a different dataset (fingerprint mismatch) is refused with
:class:`FingerprintMismatch` instead. Nothing here uses pickle.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

_BYTES_TAG = "__bytes_b64__"


class FingerprintMismatch(RuntimeError):
  """A checkpoint was written for other data than the run that tries to resume from it."""


class NoUsableCheckpoint(RuntimeError):
  """Checkpoints exist but none of them could be restored."""


def dataset_fingerprint(parts: Iterable[Any]) -> str:
  """A stable sha256 fingerprint of a dataset description.

  Args:
    parts: JSON-serializable items that define the data a run trains on, e.g. for every pool record
      ``(example_id, question, response)`` plus the pipeline settings (max_len, seed). Order matters.
  Returns:
    ``"sha256:<hex>"``.
  """
  h = hashlib.sha256()
  for part in parts:
    h.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    h.update(b"\n")
  return "sha256:" + h.hexdigest()


def to_json_safe(obj: Any) -> Any:
  """Encodes a grain iterator state (dicts, lists, numbers, strings, bytes) as plain JSON."""
  if isinstance(obj, (bytes, bytearray)):
    return {_BYTES_TAG: base64.b64encode(bytes(obj)).decode("ascii")}
  if isinstance(obj, dict):
    return {str(k): to_json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json_safe(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def from_json_safe(obj: Any) -> Any:
  """Inverse of :func:`to_json_safe`."""
  if isinstance(obj, dict):
    if set(obj) == {_BYTES_TAG}:
      return base64.b64decode(obj[_BYTES_TAG])
    return {k: from_json_safe(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [from_json_safe(v) for v in obj]
  return obj


@dataclasses.dataclass
class Restored:
  """What :meth:`Checkpointer.restore_latest` returns.

  Attributes:
    step: the step the checkpoint was written at (the number of completed steps).
    state: the array pytree, with the structure, dtypes and shardings of the template.
    data_state: the data iterator state as saved (decoded from JSON), or None.
    extra: loop bookkeeping saved alongside (JSON).
    config: the resolved config of the run that wrote the checkpoint.
    skipped: steps newer than ``step`` that could not be restored (corrupt or partial).
  """

  step: int
  state: Any
  data_state: Any
  extra: dict
  config: dict
  skipped: list[int]


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding template of a pytree of arrays, for restoring onto the same layout."""

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):  # already a template (e.g. carrying a new sharding)
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

  return jax.tree.map(one, tree)


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
  """``directory`` as an ``etils.epath.Path`` (what orbax takes), URLs kept intact.

  ``pathlib.Path("gs://bucket/run")`` collapses the double slash into ``gs:/bucket/run``, a local
  directory named ``gs:``; ``epath`` keeps the scheme. Local paths are made absolute, as before.
  """
  text = os.fspath(directory)
  return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
  """Saves and restores run checkpoints in ``directory`` (one subdirectory per step).

  Args:
    directory: where the step directories go (created if missing); local path or a URL orbax
      understands (``gs://...``).
    fingerprint: the dataset fingerprint of this run (see :func:`dataset_fingerprint`).
    config: the resolved config (JSON-serializable dict); saved in every checkpoint.
    max_to_keep: how many recent checkpoints to keep (at least 2, so a corrupt latest one has a
      predecessor to fall back to).
    async_save: write in a background thread (orbax async checkpointing).
  """

  def __init__(self, directory: str | os.PathLike, *, fingerprint: str, config: dict | None = None,
               max_to_keep: int = 3, async_save: bool = True):
    if max_to_keep < 2:
      raise ValueError(f"max_to_keep must be >= 2 (fallback needs a predecessor), got {max_to_keep}")
    self.directory = checkpoint_path(directory)
    self.fingerprint = fingerprint
    self.config = config or {}
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  # ------------------------------------------------------------------ saving

  def save(self, step: int, state: Any, *, data_state: Any = None, extra: dict | None = None,
           force: bool = False) -> bool:
    """Starts writing a checkpoint for ``step``; returns whether a save was started.

    Args:
      step: number of completed steps (the loop resumes at this step).
      state: pytree of arrays.
      data_state: the data iterator state (grain ``get_state()``), JSON-encodable apart from bytes.
      extra: small JSON bookkeeping (counters, selection so far).
      force: save even if orbax's save policy would skip this step.
    """
    meta = {"step": int(step), "fingerprint": self.fingerprint, "config": self.config,
            "data_state": to_json_safe(data_state), "extra": to_json_safe(extra or {})}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return bool(self._manager.save(int(step), args=args, force=force))

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------ restoring

  def all_steps(self) -> list[int]:
    """Finished checkpoint steps, oldest first (temporary, unfinished directories excluded)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def read_meta(self, step: int) -> dict:
    """The JSON item of one checkpoint."""
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = out["meta"]
    if not isinstance(meta, dict) or "fingerprint" not in meta or "step" not in meta:
      raise ValueError(f"checkpoint {self.directory / str(step)}: meta is missing fields")
    return meta

  def restore_latest(self, template: Any) -> Restored | None:
    """Restores the newest usable checkpoint onto ``template``'s structure and shardings.

    Args:
      template: a pytree like the saved ``state`` (real arrays or ``jax.ShapeDtypeStruct``s).
    Returns:
      The restored checkpoint, or None when the directory holds no finished checkpoint.
    Raises:
      FingerprintMismatch: the newest readable checkpoint was written for other data.
      NoUsableCheckpoint: checkpoints exist but none restores.
    """
    steps = self.all_steps()
    if not steps:
      return None
    abstract = _abstract(template)
    skipped, errors = [], []
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # A corrupt or partial step: fall back to the one before.
        log.warning("checkpoint step %d unreadable (%s: %s); trying the previous one",
                    step, type(e).__name__, e)
        skipped.append(step)
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        continue
      if meta["fingerprint"] != self.fingerprint:
        raise FingerprintMismatch(
            f"checkpoint {self.directory / str(step)} was written for dataset fingerprint "
            f"{meta['fingerprint']}, but this run's data has fingerprint {self.fingerprint}. "
            "The pool, its order or the pipeline settings changed; resuming would mix two datasets. "
            "Use a new output directory (or delete the old checkpoints) to start afresh.")
      try:
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        state = out["state"]
        jax.block_until_ready(state)
      except Exception as e:
        log.warning("checkpoint step %d state unreadable (%s: %s); trying the previous one",
                    step, type(e).__name__, e)
        skipped.append(step)
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        continue
      if skipped:
        log.warning("resumed from step %d; skipped unusable newer checkpoints %s", step, skipped)
      return Restored(step=int(meta["step"]), state=state,
                      data_state=from_json_safe(meta.get("data_state")),
                      extra=from_json_safe(meta.get("extra") or {}),
                      config=meta.get("config") or {}, skipped=skipped)
    raise NoUsableCheckpoint(f"no checkpoint in {self.directory} could be restored:\n  "
                             + "\n  ".join(errors))
