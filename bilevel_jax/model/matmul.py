"""The model's projection matmul ``x @ w`` and the derivative rules that keep it fast on XLA:CPU.

Two paths, chosen by dtype in :func:`matmul`:

* **f32 (and f64, which the gradient checks use)**: :func:`matmul_wide`, a ``custom_jvp`` whose
  weight term makes the weight-gradient dot a plain one (its docstring has the measurement).
* **bf16 compute** (``LlamaConfig(dtype="bfloat16")``): :func:`lowp_dot`, a primitive that
  multiplies bf16 operands with f32 accumulation and whose transposes keep *both* operands bf16.

Why a primitive for bf16. XLA:CPU runs a bf16 x bf16 -> f32 dot on the CPU's bf16 units (YNNPACK;
AMX on this machine: 700-1000 GFLOP/s against 200-330 in f32 on the SFT step's shapes), but every
other bf16 dot it converts to f32 first: a bf16 result (``x @ w`` in bf16), an f32 cotangent
against a bf16 operand (what JAX's transpose of a ``preferred_element_type=f32`` dot produces),
and a left operand contracted on its first axis (the weight gradient ``x^T @ dy``). With plain
``jnp`` ops every backward dot of a bf16 step therefore ran in f32 on converted copies, and the bf16
step was slower than the f32 one (docs/benchmarks.md). The transposes below round the cotangent to
bf16 (as PyTorch's autocast does) and write ``x^T`` out before the weight-gradient dot.

Writing ``x^T`` out: behind an ``optimization_barrier`` (as the f32 path does) XLA:CPU again
converts the dot to f32, so on CPU the copy is a row gather of ``x^T`` by ``arange``, which XLA
keeps as a copy; other platforms take the plain transpose (:func:`_transposed_copy`).

One difference to a plain dot: remat policies that pick dots by primitive (``dots_saveable``,
``checkpoint_dots``) do not see ``lowp_dot``, so under them a bf16 model saves no projection
output. Selection runs in f32 (docs/gpu.md), where the projections are ordinary dots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, Float

# Compute dtypes that take the low-precision path.
LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def matmul(x: Float[Array, "... k"], w: Float[Array, "k n"]) -> Float[Array, "... n"]:
  """``x @ w`` in ``x``'s dtype: the bf16 primitive for low-precision ``x``, else the f32 rule."""
  if x.dtype in LOW_PRECISION:
    return lowp_dot(x, w.astype(x.dtype)).astype(x.dtype)
  return matmul_wide(x, w)


# ----------------------------------------------------------------------------- f32 / f64


@jax.custom_jvp
def matmul_wide(x: Float[Array, "... k"], w: Float[Array, "k n"]) -> Float[Array, "... n"]:
  """``x @ w`` whose derivative rule makes XLA:CPU's weight-gradient dot a plain one.

  The weight gradient ``x^T @ dy`` contracts the token axis of both operands. Left to itself,
  XLA:CPU feeds that dot by writing the (wide) output cotangent ``dy`` transposed, in a strided
  copy fused into the op that produces it (the SiLU backward of every MLP alone was 17% of the SFT
  step's op time). The JVP below writes the weight term as ``(x^T)^T @ dw`` with ``x^T``
  materialized behind an ``optimization_barrier``, so its transpose is ``x^T @ dy``, a dot in the
  natural layout whose one transposed operand is ``x``, copied once in the forward pass. Measured on
  SmolLM2-135M (B=4, T=128, 2-core CPU): the LoRA SFT step 0.70 x its time, the full one 0.82 x.
  A ``custom_jvp`` (not a ``custom_vjp``) keeps the function differentiable in forward mode, which
  the hypergradient estimators need.
  """
  return x @ w


@functools.partial(matmul_wide.defjvp, symbolic_zeros=True)
def _matmul_wide_jvp(primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = x @ w
  dy = None
  if not isinstance(dx, SymbolicZero):
    dy = dx @ w
  if not isinstance(dw, SymbolicZero):
    xt = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    dw_term = (xt.T @ dw).reshape(y.shape)
    dy = dw_term if dy is None else dy + dw_term
  return y, jnp.zeros_like(y) if dy is None else dy


# ----------------------------------------------------------------------------- bf16


def _dot_f32(x, w, w_contract: int = 0):
  """``x [..., k]`` times ``w`` (``[k, n]``, or ``[n, k]`` with ``w_contract=1``), f32 result."""
  return lax.dot_general(x, w, (((x.ndim - 1,), (w_contract,)), ((), ())),
                         preferred_element_type=jnp.float32)


lowp_dot_p = Primitive("bilevel_jax_lowp_dot")
lowp_dot_p.def_impl(_dot_f32)
lowp_dot_p.def_abstract_eval(
    lambda x, w: jax.core.ShapedArray(x.shape[:-1] + w.shape[1:], jnp.float32))
mlir.register_lowering(lowp_dot_p, mlir.lower_fun(_dot_f32, multiple_results=False))


def lowp_dot(x: Float[Array, "... k"], w: Float[Array, "k n"]) -> Float[Array, "... n"]:
  """``x @ w`` for low-precision ``x`` and ``w`` of one dtype, accumulated and returned in f32.

  Linear in each operand; its transposes (reverse mode) take the cotangent rounded to the operands'
  dtype, so every dot of the backward pass stays a low-precision one (module docstring).
  """
  if x.dtype != w.dtype or x.dtype not in LOW_PRECISION or w.ndim != 2:
    raise TypeError(f"lowp_dot takes two {'/'.join(map(str, LOW_PRECISION))} operands of one dtype "
                    f"and a 2-D w, got {x.dtype}{x.shape} and {w.dtype}{w.shape}")
  return lowp_dot_p.bind(x, w)


def _transposed_copy(x2: Float[Array, "m k"]) -> Float[Array, "k m"]:
  """``x2.T`` written out in memory, in the form XLA:CPU keeps a bf16 dot on (module docstring)."""
  def gather(a):
    return jnp.take(a.T, jnp.arange(a.shape[1]), axis=0)
  return lax.platform_dependent(x2, cpu=gather, default=lambda a: a.T)


def _transpose_x(ct, x, w):
  """Cotangent of ``x``: ``ct @ w^T`` (``w`` contracted on its last axis, which the kernel takes)."""
  return _dot_f32(ct.astype(w.dtype), w, w_contract=1).astype(x.aval.dtype)


def _transpose_w(ct, x, w):
  """Cotangent of ``w``: ``x^T @ ct`` over every leading axis, with ``x^T`` written out."""
  x2 = x.reshape(-1, x.shape[-1])
  ct2 = ct.reshape(-1, ct.shape[-1]).astype(x.dtype)
  return lowp_dot(_transposed_copy(x2), ct2).astype(w.aval.dtype)


ad.defbilinear(lowp_dot_p, _transpose_x, _transpose_w)


def _lowp_dot_batch(args, dims):
  """vmap: a batched ``x`` is one more leading axis; a batched ``w`` falls back to an einsum."""
  x, w = args
  bx, bw = dims
  if bw is None:
    return lowp_dot(jnp.moveaxis(x, bx, 0), w), 0
  size = w.shape[bw]
  x = jnp.broadcast_to(x, (size,) + x.shape) if bx is None else jnp.moveaxis(x, bx, 0)
  out = jnp.einsum("b...k,bkn->b...n", x, jnp.moveaxis(w, bw, 0),
                   preferred_element_type=jnp.float32)
  return out, 0


batching.primitive_batchers[lowp_dot_p] = _lowp_dot_batch
