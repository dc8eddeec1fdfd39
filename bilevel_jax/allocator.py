"""Keep freed memory in the process (glibc's malloc), so that a training step does not page-fault
its temporaries in again at every step.

XLA:CPU allocates the temporaries of one executed step as a single block (1.7 GiB for the full
SmolLM2-135M SFT step at batch 4 x 128 tokens). glibc serves a block that large with a fresh
``mmap`` and gives it back with ``munmap`` when the step ends, so the next step touches brand-new
pages: on the project's 2-core VM that was 458k page faults and 0.85 s of system time in a 3.05 s
step, and about 1.7 s when the step followed an idle pause (as it does when a benchmark alternates
with PyTorch). With large blocks taken from the heap instead (no ``mmap``), at most two arenas and no
trimming, the freed block is reused: a few thousand page faults instead and 2.46 s (2.52 s after a
pause). One arena gave 2.65 s and slowed the sampler's decode loop by 12% (lock contention among
XLA's threads); two did not slow it (4.98 vs 5.29 s at batch 8). Transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``) gave 2.38 s back to back but 4.17 s after a pause, so
they are not used.

The settings are process-wide and must be made before the first large allocations of JAX's
threads: :func:`keep_freed_memory` is the first thing the CLI does, before importing JAX.
Research code calls it first, or starts Python with :data:`GLIBC_TUNABLES` in its environment (the
benchmarks do that for both the JAX and the PyTorch worker, so both sides get the same allocator).
The cost: memory freed by a step is not returned to the OS, and the heap can fragment: with the
full model's ``unroll`` K=1 (4.2 GiB compiled memory) the resident set grew in two steps of the
first eight (each page-faulting about 2.7 GiB in) and settled at 10.2 GiB, against a 5.4 GiB peak
with glibc's defaults. ``BILEVEL_JAX_MALLOC=default`` leaves glibc's defaults.

Which thread allocates the step's block matters too (measured 2026-12-01, glibc 2.36): with two
arenas some processes page-faulted about 310k pages (1.2 GiB) in every step, others none. A block
too large for a thread arena's 64 MiB heap is mmapped whatever ``mmap_max`` says (sysmalloc's
fallback), so it depended on which arena the thread that runs the computation had got: with JAX's
asynchronous CPU dispatch that is one of XLA's threads. :func:`run_cpu_computations_inline` runs each
computation on the calling (main) thread, whose arena is the main heap. Same script, 2 s pauses
between steps, separate processes: the LoRA SFT step (f32) faulted 310k pages per step in 3 of 3
asynchronous processes (1.94-2.00 s) and in none of 3 inline ones (1.79-1.86 s); the full model in
bf16 with per-layer storage faulted in 1 of 2 asynchronous processes (1.07 / 1.30 s) and in none of
4 inline ones (1.04-1.05 s). One arena also never faulted, but it is slower than a good two-arena
process and slowed the sampler by 12%.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# Trimming off. mallopt takes an int, and -1 is documented to disable trimming (glibc stores it as
# a size_t, i.e. SIZE_MAX); the tunable takes the size_t itself. The largest int, 2**31 - 1, is not
# enough: a step whose temporaries exceed 2 GiB (``unroll`` on the full model) left a free top of
# heap above it, which glibc trimmed at the end of every step, so the next step page-faulted it in
# again (700k faults and 1.5 s of system time in a 6.6 s step).
TRIM_THRESHOLD_MALLOPT = -1
TRIM_THRESHOLD = 2 ** 64 - 1
ARENA_MAX = 2

# The same policy as environment settings, read by glibc at process start.
GLIBC_TUNABLES = (f"glibc.malloc.arena_max={ARENA_MAX}:glibc.malloc.mmap_max=0:"
                  f"glibc.malloc.trim_threshold={TRIM_THRESHOLD}")


def keep_freed_memory() -> bool:
  """Applies the policy above with ``mallopt``; returns whether it was applied.

  A no-op (False) off Linux, without glibc (e.g. musl has no ``mallopt``), or when the environment
  variable ``BILEVEL_JAX_MALLOC`` is ``default``.
  """
  if not sys.platform.startswith("linux") or os.environ.get("BILEVEL_JAX_MALLOC") == "default":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  results = [mallopt(M_ARENA_MAX, ARENA_MAX), mallopt(M_MMAP_MAX, 0),
             mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MALLOPT)]
  return all(r == 1 for r in results)


def run_cpu_computations_inline() -> None:
  """Runs each XLA:CPU computation on the thread that calls it (``jax_cpu_enable_async_dispatch``
  off), so that the step's temporaries come from the main heap (module docstring).

  Call it before JAX creates its CPU client (before the first computation); afterwards the setting
  does not reach the client. The cost is JAX's dispatch running ahead of the CPU: Python waits for
  each computation, which on this project's loops (one jitted step at a time, metrics read back)
  it does anyway. ``BILEVEL_JAX_MALLOC=default`` leaves JAX's default.
  """
  if os.environ.get("BILEVEL_JAX_MALLOC") == "default":
    return
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)
