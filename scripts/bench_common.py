"""Shared helpers for the benchmark suite (``scripts/bench.py``).

Everything a sub-benchmark needs to produce numbers that can be compared honestly:

* :func:`machine_description` - what the numbers were measured on (CPU, cores, memory, load,
  library versions), written next to every table.
* :func:`median_time` - median of N timed calls after warm-up calls.
* :func:`matmul_peak_jax` / :func:`matmul_peak_torch` - the f32 matmul throughput of this machine,
  measured in the same run, for plain (``a @ b``) and transposed-operand (``a.T @ b``, ``a @ b.T``)
  products; achieved FLOP/s are reported against the best plain figure.
* :class:`Worker` and :func:`serve` - a benchmark side (JAX or PyTorch) runs in its own process (its
  own virtualenv for PyTorch) and answers JSON-line commands, so that the orchestrator can *alternate*
  single runs of the two sides and each side's peak memory is its own.
* :func:`alternate` - round-robin timing of several workers; load from other processes then hits
  both sides alike instead of whichever ran during a busy minute.
* :func:`update_markdown_section` - rewrites one marked section of ``docs/benchmarks.md`` and leaves
  the other sub-benchmarks' sections alone.
* :func:`reset_peak_rss` / :func:`peak_rss_bytes` - the process's peak resident memory over a window
  (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``).

This module imports neither JAX nor PyTorch at import time: it is used from both virtualenvs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
JAX_PYTHON = REPO / ".venv" / "bin" / "python"
TORCH_PYTHON = REPO / ".venv-torch" / "bin" / "python"
REPLY_PREFIX = "@@BENCH "  # marks protocol lines among whatever else a library prints to stdout


# ----------------------------------------------------------------------------- machine


def _read(path: str) -> str:
  try:
    return Path(path).read_text()
  except OSError:
    return ""


def load_average() -> tuple[float, float, float]:
  return os.getloadavg()


def machine_description(extra: dict[str, str] | None = None) -> dict[str, str]:
  """CPU model, core count, memory, OS, Python and load average, as strings."""
  cpuinfo = _read("/proc/cpuinfo")
  model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
  flags = re.search(r"flags\s*:\s*(.+)", cpuinfo)
  simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if flags and f in flags.group(1).split()]
  mem = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))
  desc = {
      "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
      "cores": str(os.cpu_count()),
      "simd": " ".join(simd) or "unknown",
      "memory": f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "unknown",
      "os": f"{platform.system()} {platform.release()}",
      "python": platform.python_version(),
      "load average (1/5/15 min) at start": "%.2f %.2f %.2f" % load_average(),
      "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
      "worker allocator": _allocator_description(),
  }
  desc.update(extra or {})
  return desc


def machine_markdown(desc: dict[str, str]) -> str:
  return "\n".join(f"- {k}: {v}" for k, v in desc.items())


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  """Seconds of each timed call; ``median`` is what tables report, ``spread`` shows the noise."""

  seconds: list[float]
  # CPU seconds of the worker process in the same calls (user + system, all its threads), where the
  # worker reports them: on a shared machine wall time also counts the time a side waited for a core.
  cpu_seconds: list[float] = dataclasses.field(default_factory=list)

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def cpu_median(self) -> float | None:
    return statistics.median(self.cpu_seconds) if self.cpu_seconds else None

  @property
  def spread(self) -> str:
    return f"{min(self.seconds):.3f}-{max(self.seconds):.3f}"


def median_time(fn: Callable[[], Any], n: int = 5, warmup: int = 1,
                block: Callable[[Any], Any] = lambda x: x) -> Timing:
  """Times ``block(fn())`` ``n`` times after ``warmup`` untimed calls."""
  for _ in range(warmup):
    block(fn())
  seconds = []
  for _ in range(n):
    start = time.perf_counter()
    block(fn())
    seconds.append(time.perf_counter() - start)
  return Timing(seconds)


# ----------------------------------------------------------------------------- matmul peak

# Square products reach the machine's practical peak; the model-shaped ones show what the SFT step's
# own matmuls can get ([tokens, d_model] x [d_model, d_ff] for a 135M Llama at B*T = 512).
MATMUL_SHAPES = ((2048, 2048, 2048), (512, 576, 1536), (512, 1536, 576))


def matmul_peak_jax(shapes=MATMUL_SHAPES, n: int = 5) -> dict[str, float]:
  """Best f32 GFLOP/s over ``shapes`` for ``a@b`` (plain), ``a.T@b`` and ``a@b.T`` under jax.jit."""
  import jax
  import jax.numpy as jnp

  variants = {"plain": lambda a, b: a @ b, "lhs_transposed": lambda a, b: a.T @ b,
              "rhs_transposed": lambda a, b: a @ b.T}
  best: dict[str, float] = {}
  for m, k, n_ in shapes:
    key_a, key_b = jax.random.split(jax.random.key(0))
    for name, fn in variants.items():
      a_shape = (k, m) if name == "lhs_transposed" else (m, k)
      b_shape = (n_, k) if name == "rhs_transposed" else (k, n_)
      a = jax.random.normal(key_a, a_shape, jnp.float32)
      b = jax.random.normal(key_b, b_shape, jnp.float32)
      f = jax.jit(fn)
      t = median_time(lambda: f(a, b), n=n, warmup=2, block=jax.block_until_ready).median
      best[name] = max(best.get(name, 0.0), 2 * m * k * n_ / t / 1e9)
  return best


def matmul_peak_torch(shapes=MATMUL_SHAPES, n: int = 5) -> dict[str, float]:
  """As :func:`matmul_peak_jax`, with PyTorch (transposes are views, as in autograd)."""
  import torch

  best: dict[str, float] = {}
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m, k, n_ in shapes:
      for name in ("plain", "lhs_transposed", "rhs_transposed"):
        a = torch.randn((k, m) if name == "lhs_transposed" else (m, k), generator=gen)
        b = torch.randn((n_, k) if name == "rhs_transposed" else (k, n_), generator=gen)
        aa = a.T if name == "lhs_transposed" else a
        bb = b.T if name == "rhs_transposed" else b
        t = median_time(lambda: aa @ bb, n=n, warmup=2).median
        best[name] = max(best.get(name, 0.0), 2 * m * k * n_ / t / 1e9)
  return best


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
  """Resets this process's peak RSS (Linux ``VmHWM``); False where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _status_kb(field: str) -> int:
  match = re.search(rf"{field}:\s+(\d+) kB", _read("/proc/self/status"))
  return int(match.group(1)) * 1024 if match else 0


def peak_rss_bytes() -> int:
  return _status_kb("VmHWM")


def rss_bytes() -> int:
  return _status_kb("VmRSS")


# ----------------------------------------------------------------------------- worker processes


def serve(handlers: dict[str, Callable[..., dict]], ready: dict) -> None:
  """Worker side: announces ``ready``, then answers ``{"cmd": name, **kwargs}`` lines until EOF.

  Each handler's dict goes back on one line after :data:`REPLY_PREFIX`; an exception goes back as
  ``{"error": ...}`` and ends the worker.
  """
  out = sys.stdout
  out.write(REPLY_PREFIX + json.dumps(ready) + "\n")
  out.flush()
  for line in sys.stdin:
    if not line.strip():
      continue
    request = json.loads(line)
    cmd = request.pop("cmd")
    if cmd == "quit":
      break
    try:
      reply = handlers[cmd](**request)
    except Exception as e:  # reported to the orchestrator, which stops the run
      out.write(REPLY_PREFIX + json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
      out.flush()
      raise
    out.write(REPLY_PREFIX + json.dumps(reply) + "\n")
    out.flush()


class WorkerError(RuntimeError):
  pass


def allocator_env() -> dict[str, str]:
  """``GLIBC_TUNABLES`` of ``bilevel_jax.allocator`` for every worker, JAX and PyTorch alike.

  The library's CLI keeps freed step memory in the process (no ``mmap``/``munmap`` of each step's
  temporaries); both sides of a benchmark get the same allocator so that the comparison stays one of
  the frameworks. ``BILEVEL_JAX_MALLOC=default`` (or a ``GLIBC_TUNABLES`` already set) leaves the
  environment as it is.
  """
  if os.environ.get("BILEVEL_JAX_MALLOC") == "default" or "GLIBC_TUNABLES" in os.environ:
    return {}
  sys.path.insert(0, str(REPO))
  try:
    from bilevel_jax import allocator
  finally:
    sys.path.pop(0)
  return {"GLIBC_TUNABLES": allocator.GLIBC_TUNABLES}


def _allocator_description() -> str:
  env = allocator_env()
  if env:
    return (f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (both sides); JAX computations run inline "
            "(allocator.run_cpu_computations_inline, as the CLI)")
  return f"as the environment sets it (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')})"


class Worker:
  """Orchestrator side of :func:`serve`: a benchmark side in its own process.

  Args:
    name: label used in errors.
    argv: the command (e.g. ``[TORCH_PYTHON, script, "--worker", "torch"]``).
    env: extra environment variables (thread counts).
  """

  def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
    self.name = name
    self.proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1, cwd=REPO,
                                 env={**os.environ, **allocator_env(), **(env or {})})
    self.info = self._reply()

  def _reply(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise WorkerError(f"worker {self.name} exited with {self.proc.wait()} (see its stderr above)")
      if line.startswith(REPLY_PREFIX):
        reply = json.loads(line[len(REPLY_PREFIX):])
        if "error" in reply:
          raise WorkerError(f"worker {self.name}: {reply['error']}")
        return reply

  def call(self, cmd: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
    self.proc.stdin.flush()
    return self._reply()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def alternate(workers: dict[str, Worker], rounds: int, cmd: str = "step", pause_s: float = 0.3,
              **kwargs) -> dict[str, Timing]:
  """Round-robin: each round every worker runs ``cmd`` once and reports ``{"seconds": s}``.

  A reply may also carry ``cpu_seconds`` (the worker's process CPU time in the call), kept in
  :attr:`Timing.cpu_seconds`.

  The order within a round flips every round so that neither side always follows the other. The
  pause lets the previous side's thread pool go idle (OpenMP threads spin for a while after a
  parallel region) before the next side starts.
  """
  timings = {name: Timing([]) for name in workers}
  names = list(workers)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(pause_s)
      reply = workers[name].call(cmd, **kwargs)
      timings[name].seconds.append(reply["seconds"])
      if "cpu_seconds" in reply:
        timings[name].cpu_seconds.append(reply["cpu_seconds"])
  return timings


# ----------------------------------------------------------------------------- docs/benchmarks.md

_HEADER = """# Benchmarks

Measured by `scripts/bench.py` (one section per sub-benchmark; each section is rewritten by its own
sub-benchmark and names the machine it ran on). Times are medians over alternating runs in one
process tree; ratios compare sides measured in the same run.
"""


def update_markdown_section(name: str, body: str, path: Path = DOCS) -> None:
  """Replaces (or appends) the section between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``."""
  start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
  text = path.read_text() if path.exists() else _HEADER
  block = f"{start}\n{body.strip()}\n{end}"
  pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: block, text)
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def gib(n_bytes: float) -> str:
  return f"{n_bytes / 2**30:.2f} GiB"
