"""bilevel_jax.allocator: freed large blocks are reused instead of page-faulted in again.

Each case runs in a fresh interpreter, since the malloc policy is process-wide and must be set
before the allocations it should govern.
"""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import os, resource, sys
    from bilevel_jax import allocator
    applied = allocator.keep_freed_memory()
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = int(sys.argv[1])
    def touch():  # what a step does with its temporaries: allocate, write, free
      p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


MIB = 2**20
# 256 MiB: far above glibc's largest mmap threshold (32 MiB). 2.5 GiB: above the largest trim
# threshold mallopt's int could set (2**31 - 1), the size of the full model's `unroll` temporaries.
SIZES = (256 * MIB, 2560 * MIB)


def _probe(env_extra, size=SIZES[0]):
  import os
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", PROBE, str(size)], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")
@pytest.mark.parametrize("size", SIZES)
def test_freed_block_is_reused_without_page_faults(size):
  applied, faults = _probe({}, size)
  assert applied
  default_applied, default_faults = _probe({"BILEVEL_JAX_MALLOC": "default"}, size)
  assert not default_applied
  # Each block is size / 4 KiB pages: glibc's default maps a fresh block and touches every page.
  assert default_faults > size // 4096 // 2
  assert faults < 1000


def test_glibc_tunables_spell_the_same_policy():
  from bilevel_jax import allocator
  assert allocator.GLIBC_TUNABLES == (f"glibc.malloc.arena_max={allocator.ARENA_MAX}:"
                                      "glibc.malloc.mmap_max=0:"
                                      f"glibc.malloc.trim_threshold={allocator.TRIM_THRESHOLD}")
  for size in SIZES:
    tunables_applied, faults = _probe({"GLIBC_TUNABLES": allocator.GLIBC_TUNABLES,
                                       "BILEVEL_JAX_MALLOC": "default"}, size)
    if sys.platform.startswith("linux"):
      assert not tunables_applied and faults < 1000


INLINE_PROBE = textwrap.dedent("""
    from bilevel_jax import allocator
    allocator.run_cpu_computations_inline()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w), axis=0))
    x, w = jnp.ones((4096, 512)), jnp.ones((512, 4096))
    f(x, w).block_until_ready()
    y = f(x, w)  # about 17 GFLOP: asynchronous dispatch returns long before it is done
    print(jax.config.values["jax_cpu_enable_async_dispatch"], y.is_ready())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU client of the CI machine")
def test_computations_run_inline_on_the_calling_thread():
  """The step's temporaries are then allocated by the main thread (allocator docstring)."""
  import os

  def probe(env_extra):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", INLINE_PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[-2:]

  assert probe({}) == ["False", "True"]  # returned done
  assert probe({"BILEVEL_JAX_MALLOC": "default"}) == ["True", "False"]  # JAX's default: async
