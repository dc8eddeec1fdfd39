"""Metrics out of a run: ``metrics.jsonl``, TensorBoard event files, progress bars, NaN guard.

* :class:`MetricsLogger` appends one JSON line per logged step to ``<dir>/metrics.jsonl`` and the same
  scalars to a TensorBoard event file in ``<dir>/tb/``, on process 0 only. On resume it first drops
  the lines newer than the restored step, so a killed and resumed run has the same file as one that
  never stopped.
* The event files are written here without TensorFlow or tensorboardX: TFRecord framing (length,
  masked CRC-32C, payload, masked CRC-32C) around hand-encoded ``tensorflow.Event`` protobufs with
  ``simple_value`` summaries, the format TensorBoard reads.
* :func:`progress` is a ``tqdm`` bar with ETA on a terminal and a periodic log line otherwise.
* :class:`NonFiniteGuard` counts steps whose loss was NaN or Inf (the loop skips them) and stops the
  run with a clear message after a configured number.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

# ----------------------------------------------------------------------------- TFRecord + protobuf


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
  """One TFRecord: u64 length, masked CRC of the length, payload, masked CRC of the payload."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # Negative int64 values are encoded as 10-byte two's complement.
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
  """A serialized ``tensorflow.Event`` (fields: 1 wall_time, 2 step, 3 file_version, 5 summary)."""
  out = bytearray(_varint((1 << 3) | 1) + struct.pack("<d", wall_time))
  if step is not None:
    out += _varint((2 << 3) | 0) + _varint(int(step))
  if file_version is not None:
    out += _field_bytes(3, file_version.encode("utf-8"))
  if scalars:
    summary = bytearray()
    for tag, value in scalars.items():
      # Summary.Value: 1 tag (string), 2 simple_value (float, fixed32).
      v = _field_bytes(1, tag.encode("utf-8")) + _varint((2 << 3) | 5) + struct.pack("<f", value)
      summary += _field_bytes(1, v)
    out += _field_bytes(5, bytes(summary))
  return bytes(out)


def read_tfrecords(path: str | Path) -> list[bytes]:
  """Payloads of a TFRecord file, checking both CRCs of every record."""
  data = Path(path).read_bytes()
  out, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if hcrc != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    payload = data[pos + 12:pos + 12 + length]
    (pcrc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    if pcrc != masked_crc32c(payload):
      raise ValueError(f"{path}: bad payload CRC at byte {pos}")
    out.append(payload)
    pos += 16 + length
  return out


class EventFileWriter:
  """Appends scalar summaries to a TensorBoard ``events.out.tfevents.*`` file."""

  def __init__(self, logdir: str | Path):
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self.path = logdir / name
    self._f = open(self.path, "ab")
    self._f.write(tfrecord(encode_event(now, 0, file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    values = {k: float(v) for k, v in values.items()}
    if values:
      self._f.write(tfrecord(encode_event(time.time(), step, scalars=values)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


# ----------------------------------------------------------------------------- metrics.jsonl


def _scalar(v: Any) -> Any:
  if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "dtype"):
    a = np.asarray(v)
    if a.size == 1:
      return a.item()
    return a.tolist()
  return v


def read_jsonl(path: str | Path) -> list[dict]:
  """Records of a ``metrics.jsonl`` (an unterminated last line, from a kill mid-write, is dropped)."""
  path = Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


class MetricsLogger:
  """Writes a phase's metrics to ``<directory>/metrics.jsonl`` and ``<directory>/tb/``.

  Args:
    directory: the phase's output directory.
    resume_step: when resuming from a checkpoint at this step, records with ``step > resume_step``
      (written after that checkpoint by the killed process) are dropped first.
    enabled: write anything at all (False on every process but 0).
    tensorboard: also write TensorBoard event files.
  """

  def __init__(self, directory: str | Path, *, resume_step: int | None = None, enabled: bool = True,
               tensorboard: bool = True):
    self.directory = Path(directory)
    self.enabled = enabled
    self.path = self.directory / "metrics.jsonl"
    self._tb = None
    if not enabled:
      return
    self.directory.mkdir(parents=True, exist_ok=True)
    records = read_jsonl(self.path)
    if resume_step is not None:
      records = [r for r in records if r.get("step", -1) <= resume_step]
    else:
      records = []
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, self.path)
    self._f = open(self.path, "a")
    if tensorboard:
      self._tb = EventFileWriter(self.directory / "tb")

  def log(self, step: int, metrics: dict[str, Any]) -> None:
    """Appends one record ``{"step": step, **metrics}``; non-finite floats are written as null."""
    if not self.enabled:
      return
    rec: dict[str, Any] = {"step": int(step)}
    scalars = {}
    for k, v in metrics.items():
      v = _scalar(v)
      if isinstance(v, float) and not math.isfinite(v):
        rec[k] = None
        continue
      rec[k] = v
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        scalars[k] = v
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()
    if self._tb is not None:
      self._tb.scalars(step, scalars)

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      if self._tb is not None:
        self._tb.close()

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------- NaN/Inf guard


class TooManyNonFinite(RuntimeError):
  """More steps had a NaN or Inf loss than the config allows."""


class NonFiniteGuard:
  """Counts skipped non-finite steps and stops the run after ``max_count`` of them.

  The skipping itself happens inside the jitted step (the new state is replaced by the old one
  where the loss is not finite, see ``bilevel_jax.loops``), since donated buffers cannot be reused.
  """

  def __init__(self, max_count: int, what: str = "step", count: int = 0):
    self.max_count = max_count
    self.what = what
    self.count = count

  def update(self, step: int, finite: bool) -> bool:
    """Records one step; returns ``finite``. Raises :class:`TooManyNonFinite` past the limit."""
    if finite:
      return True
    self.count += 1
    print(f"warning: {self.what} {step}: loss is NaN or Inf; the step was skipped "
          f"({self.count}/{self.max_count} allowed)", file=sys.stderr)
    if self.count > self.max_count:
      raise TooManyNonFinite(
          f"{self.what}: {self.count} steps had a NaN or Inf loss (limit "
          f"metrics.max_nonfinite={self.max_count}); stopping. Lower the learning rate, check the "
          "data for empty responses, or raise the limit.")
    return False


# ----------------------------------------------------------------------------- progress


class _LogProgress:
  """Periodic progress lines for logs (no terminal): ``desc: i/n (p%) elapsed, ETA``."""

  def __init__(self, total: int | None, desc: str, initial: int, interval: float):
    self.total, self.desc, self.n, self.interval = total, desc, initial, interval
    self.start = time.monotonic()
    self.start_n = initial
    self.last = 0.0

  def update(self, k: int = 1) -> None:
    self.n += k
    now = time.monotonic()
    if now - self.last >= self.interval or (self.total is not None and self.n >= self.total):
      self.last = now
      elapsed = now - self.start
      done = self.n - self.start_n
      msg = f"{self.desc}: {self.n}"
      if self.total:
        msg += f"/{self.total} ({100.0 * self.n / self.total:.0f}%)"
        if done > 0:
          msg += f" ETA {(self.total - self.n) * elapsed / done:.0f}s"
      print(msg + f" elapsed {elapsed:.0f}s", file=sys.stderr, flush=True)

  def set_postfix(self, **kw) -> None:
    pass

  def close(self) -> None:
    pass


def progress(total: int | None, desc: str, *, initial: int = 0, interval: float = 30.0,
             enabled: bool = True):
  """A progress bar with ETA: ``tqdm`` on a terminal, periodic log lines otherwise.

  Returns an object with ``update(k)``, ``set_postfix(**kw)`` and ``close()``.
  """
  if enabled and sys.stderr.isatty():
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True)
  if not enabled:
    return _LogProgress(total, desc, initial, interval=float("inf"))
  return _LogProgress(total, desc, initial, interval)


def track(items: Iterable, total: int | None, desc: str) -> Iterator:
  """Iterates ``items`` with a :func:`progress` bar."""
  bar = progress(total, desc)
  try:
    for x in items:
      yield x
      bar.update(1)
  finally:
    bar.close()
