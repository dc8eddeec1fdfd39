"""A Llama-family decoder as pure functions of a params pytree.

Covers Llama, SmolLM2, Mistral-style and Qwen2-style checkpoints: RMSNorm, rotary position
embeddings in the Hugging Face "rotate_half" layout, grouped-query attention, SwiGLU MLP, tied or
untied embeddings and optional q/k/v biases.

The params pytree (weights stored as (in, out) so that a layer is ``x @ w``)::

    {"embed": [V, D],
     "layers": {"attn_norm": [L, D], "wq": [L, D, H*hd], "wk": [L, D, KV*hd],
                "wv": [L, D, KV*hd], "wo": [L, H*hd, D], "mlp_norm": [L, D],
                "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D],
                # only with qkv_bias: "bq": [L, H*hd], "bk": [L, KV*hd], "bv": [L, KV*hd]
               },
     "final_norm": [D],
     # only without tied embeddings: "lm_head": [D, V]
    }

Layers are stacked on a leading axis and run with ``lax.scan`` so that compile time does not grow
with depth. Decoding runs them unrolled instead, from per-layer params (:func:`unstack_layers`) and a
per-layer cache (``init_cache(..., per_layer=True)``): inside a decode ``while_loop``, a scan over
stacked layers copies every layer's weights out of the stack at every step and rewrites the whole
stacked cache as its output, which made decoding at batch 32 about 1.35 x slower on a 2-core CPU.
Attention masks come from ``segment_ids`` (0 = padding, equal ids attend to each other) and causal
order of the *slots* (sequence index, or cache slot while decoding), so the same code serves
right-padded training batches, packed rows and left-padded sampling prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from bilevel_jax.model.matmul import LOW_PRECISION, lowp_dot, matmul

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static (hashable) model structure."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  max_seq_len: int = 2048
  # Compute dtype ("float32" or "bfloat16"); params are cast to it inside apply, logits are f32.
  # "float64" (under jax.enable_x64) keeps every op in f64, for finite-difference checks.
  dtype: str = "float32"
  # Per-layer rematerialization: recompute each layer's activations in the backward pass.
  remat: bool = False

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, hd = self.d_model, self.d_ff, self.head_dim
    per_layer = 2 * d + d * hd * (self.n_heads * 2 + self.n_kv_heads * 2) + 3 * d * f
    if self.qkv_bias:
      per_layer += hd * (self.n_heads + 2 * self.n_kv_heads)
    n = self.vocab_size * d + self.n_layers * per_layer + d
    if not self.tie_embeddings:
      n += self.vocab_size * d
    return n


def tiny_config(**overrides) -> LlamaConfig:
  """A tiny random model of the SmolLM2 architecture, for tests (runs in milliseconds)."""
  base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
              d_ff=64, rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=True, max_seq_len=128)
  base.update(overrides)
  return LlamaConfig(**base)


SMOLLM2_135M = LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                           head_dim=64, d_ff=1536, rope_theta=100000.0, rms_eps=1e-5,
                           tie_embeddings=True, max_seq_len=8192)


class KVCache(NamedTuple):
  """Key/value cache for incremental decoding (a pytree).

  Attributes:
    k, v: [L, B, S, KV, hd] cached keys and values, or (``per_layer``) tuples of L arrays
      [B, S, KV, hd], for per-layer params (see :func:`unstack_layers`).
    segment_ids: [B, S] segment of each cached slot; 0 marks an empty or padding slot.
    index: scalar int32, the next slot to write (shared by all rows: prompts are left-padded).
  """

  k: Array
  v: Array
  segment_ids: Array
  index: Array


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None,
               per_layer: bool = False) -> KVCache:
  """An empty cache: stacked [L, B, S, KV, hd] arrays, or per-layer tuples (``per_layer``)."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  if per_layer:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  else:
    k = jnp.zeros((cfg.n_layers,) + shape, dtype)
    v = jnp.zeros((cfg.n_layers,) + shape, dtype)
  return KVCache(k=k, v=v, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                 index=jnp.zeros((), jnp.int32))


def unstack_layers(layers: Params | None) -> tuple[Params, ...] | None:
  """Per-layer params (a tuple of L dicts) from stacked ones, for :func:`run_layers`' unrolled path.

  Works for LoRA factors stacked the same way; None stays None.
  """
  if layers is None:
    return None
  leaves, treedef = jax.tree.flatten(layers)
  # One unstack per leaf, not n slices: under autodiff it transposes to one stack, while each slice
  # would transpose to a zero-padded full-size array (n of them per leaf).
  parts = [jnp.unstack(x) for x in leaves]
  return tuple(treedef.unflatten(layer) for layer in zip(*parts))


def stack_layers(layers: Params | tuple[Params, ...] | None) -> Params | None:
  """Stacked params from per-layer ones (the inverse of :func:`unstack_layers`).

  Stacked params pass through unchanged, so callers need not know which layout they hold.
  """
  if not isinstance(layers, (tuple, list)):
    return layers
  return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def init_params(cfg: LlamaConfig, key: Array, dtype=jnp.float32) -> Params:
  """Random params with the layout of a real checkpoint (normal init, scaled by fan-in)."""
  d, f, hd, L = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_layers
  keys = iter(jax.random.split(key, 16))

  def dense(shape, fan_in):
    return (jax.random.normal(next(keys), shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

  layers = {
      "attn_norm": jnp.ones((L, d), dtype),
      "wq": dense((L, d, cfg.n_heads * hd), d),
      "wk": dense((L, d, cfg.n_kv_heads * hd), d),
      "wv": dense((L, d, cfg.n_kv_heads * hd), d),
      "wo": dense((L, cfg.n_heads * hd, d), cfg.n_heads * hd),
      "mlp_norm": jnp.ones((L, d), dtype),
      "w_gate": dense((L, d, f), d),
      "w_up": dense((L, d, f), d),
      "w_down": dense((L, f, d), f),
  }
  if cfg.qkv_bias:
    layers["bq"] = dense((L, cfg.n_heads * hd), 1.0) * 0.02
    layers["bk"] = dense((L, cfg.n_kv_heads * hd), 1.0) * 0.02
    layers["bv"] = dense((L, cfg.n_kv_heads * hd), 1.0) * 0.02
  params = {"embed": dense((cfg.vocab_size, d), 1.0), "layers": layers,
            "final_norm": jnp.ones((d,), dtype)}
  if not cfg.tie_embeddings:
    params["lm_head"] = dense((d, cfg.vocab_size), d)
  return params


# ----------------------------------------------------------------------------- building blocks


def _wide(dtype):
  """f32, or the dtype itself when it is wider (f64 models, used to check gradients, stay f64)."""
  return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: Float[Array, "... d"], w: Float[Array, "d"], eps: float) -> Float[Array, "... d"]:
  """RMSNorm computed in f32 whatever the compute dtype, as the reference implementations do."""
  x32 = x.astype(_wide(x.dtype))
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(x32.dtype)).astype(x.dtype)


def rope(x: Float[Array, "b t h hd"], positions: Int[Array, "b t"], theta: float):
  """Rotary embeddings, Hugging Face layout: the two halves of each head are the (re, im) parts."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [b, t, 1, hd]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(_wide(x.dtype))
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _proj(x, layer, lora_layer, name, scale):
  """``x @ W`` plus the LoRA update ``(x @ A) @ B * scale`` when an adapter exists for ``name``."""
  y = matmul(x, layer[name])
  if lora_layer is not None and name in lora_layer:
    ab = lora_layer[name]
    y = y + matmul(matmul(x, ab["a"].astype(x.dtype)), ab["b"].astype(x.dtype)) * scale
  return y


def attention_mask(q_slots, q_seg, k_slots, k_seg):
  """[B, 1, Tq, Tk] boolean: causal in slot order, same non-zero segment."""
  causal = k_slots[None, None, :] <= q_slots[:, :, None]  # [1|B, Tq, Tk]
  same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  return (causal & same)[:, None, :, :]


def _attend(q, k, v, mask, cfg: LlamaConfig):
  """Grouped-query attention. q: [B,Tq,H,hd]; k, v: [B,Tk,KV,hd]; mask: [B,1,Tq,Tk]."""
  b, tq, h, hd = q.shape
  g = h // cfg.n_kv_heads
  q = q.reshape(b, tq, cfg.n_kv_heads, g, hd)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k)
  scores = scores.astype(_wide(scores.dtype)) / jnp.sqrt(hd).astype(jnp.float32)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, tq, h * hd)


def _layer(cfg: LlamaConfig, lora_scale: float, h, layer, lora_layer, positions, mask, cache_kv,
           cache_index):
  """One decoder block. Returns the new hidden state and this layer's (k, v) cache entries."""
  b, t, _ = h.shape
  x = rms_norm(h, layer["attn_norm"], cfg.rms_eps)
  q = _proj(x, layer, lora_layer, "wq", lora_scale)
  k = _proj(x, layer, lora_layer, "wk", lora_scale)
  v = _proj(x, layer, lora_layer, "wv", lora_scale)
  if cfg.qkv_bias:
    q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
  q = rope(q.reshape(b, t, cfg.n_heads, cfg.head_dim), positions, cfg.rope_theta)
  k = rope(k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
  v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  if cache_kv is not None:
    ck, cv = cache_kv
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
    k_all, v_all, new_kv = ck.astype(q.dtype), cv.astype(q.dtype), (ck, cv)
  else:
    k_all, v_all, new_kv = k, v, None
  attn = _attend(q, k_all, v_all, mask, cfg)
  h = h + _proj(attn, layer, lora_layer, "wo", lora_scale)
  x = rms_norm(h, layer["mlp_norm"], cfg.rms_eps)
  gate = _proj(x, layer, lora_layer, "w_gate", lora_scale)
  up = _proj(x, layer, lora_layer, "w_up", lora_scale)
  h = h + _proj(jax.nn.silu(gate) * up, layer, lora_layer, "w_down", lora_scale)
  return h, new_kv


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ----------------------------------------------------------------------------- public API


def embed(params: Params, cfg: LlamaConfig, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
  return jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype)


def run_layers(layers: Params, cfg: LlamaConfig, h: Float[Array, "b t d"],
               positions: Int[Array, "b t"], segment_ids: Int[Array, "b t"],
               cache: KVCache | None = None, lora_layers: Params | None = None,
               lora_scale: float = 1.0) -> tuple[Float[Array, "b t d"], KVCache | None]:
  """Runs a stack of decoder layers (any leading length, e.g. only the last n).

  Stacked params run under ``lax.scan``; a tuple of per-layer params (:func:`unstack_layers`) runs
  unrolled, with a per-layer cache (the decoding layout, see the module docstring).

  Args:
    layers: stacked layer params, leading axis = number of layers to run; or a tuple of per-layer
      params.
    h: input hidden states.
    positions: RoPE positions of the new tokens.
    segment_ids: segment of each new token, 0 for padding.
    cache: optional KV cache whose layers match ``layers`` (stacked, or per-layer tuples for
      per-layer params); new keys/values are written at ``cache.index`` and the new tokens attend to
      every filled slot.
    lora_layers: optional LoRA factors stacked (or unstacked) like ``layers``.
  Returns:
    The output hidden states and the updated cache (index advanced by ``t``), or None.
  """
  t = h.shape[1]
  layers = _cast(layers, cfg.compute_dtype)
  if cache is None:
    slots = jnp.arange(t)
    mask = attention_mask(slots[None], segment_ids, slots, segment_ids)
    cache_index = None
  else:
    cache_index = cache.index
    kv_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                          (0, cache_index))
    q_slots = (cache_index + jnp.arange(t))[None]
    mask = attention_mask(q_slots, segment_ids, jnp.arange(kv_seg.shape[1]), kv_seg)

  def body(carry, xs):
    layer, lora_layer, kv = xs
    out, new_kv = _layer(cfg, lora_scale, carry, layer, lora_layer, positions, mask, kv,
                         cache_index)
    return out, new_kv

  if cfg.remat:
    body = jax.checkpoint(body, prevent_cse=False)
  if isinstance(layers, (tuple, list)):
    h, new_kv = _run_unrolled(body, h, layers, lora_layers, cache)
  else:
    if cache is not None and isinstance(cache.k, (tuple, list)):
      raise ValueError("run_layers: a per-layer cache needs per-layer params (unstack_layers)")
    kv_in = None if cache is None else (cache.k, cache.v)
    h, new_kv = jax.lax.scan(body, h, (layers, lora_layers, kv_in))
  if cache is None:
    return h, None
  return h, KVCache(k=new_kv[0], v=new_kv[1], segment_ids=kv_seg, index=cache_index + t)


def _run_unrolled(body, h, layers, lora_layers, cache):
  """The per-layer (Python loop) counterpart of the scan in :func:`run_layers`."""
  n = len(layers)
  if cache is not None and not (isinstance(cache.k, (tuple, list)) and len(cache.k) == n):
    raise ValueError(f"run_layers: per-layer params need a per-layer cache of {n} layers "
                     "(init_cache(..., per_layer=True))")
  if lora_layers is not None and len(lora_layers) != n:
    raise ValueError(f"run_layers: {len(lora_layers)} per-layer LoRA factors for {n} layers")
  ks, vs = [], []
  for i in range(n):
    kv = None if cache is None else (cache.k[i], cache.v[i])
    h, new_kv = body(h, (layers[i], None if lora_layers is None else lora_layers[i], kv))
    if new_kv is not None:
      ks.append(new_kv[0])
      vs.append(new_kv[1])
  return h, (tuple(ks), tuple(vs))


def unembed(params: Params, cfg: LlamaConfig, h: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
  """Final norm and output projection; logits in f32."""
  x = rms_norm(h, params["final_norm"], cfg.rms_eps)
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  if x.dtype in LOW_PRECISION:  # bf16 operands, f32 logits (and a bf16 backward: matmul.py)
    return lowp_dot(x, w.astype(x.dtype))
  return (x @ w.astype(x.dtype)).astype(_wide(x.dtype))


def apply(params: Params, cfg: LlamaConfig, tokens: Int[Array, "b t"],
          positions: Int[Array, "b t"] | None = None,
          segment_ids: Int[Array, "b t"] | None = None, cache: KVCache | None = None,
          lora: Params | None = None, lora_scale: float = 1.0
          ) -> tuple[Float[Array, "b t v"], KVCache | None]:
  """Full forward pass.

  Args:
    params: model params (see module docstring).
    cfg: static model config.
    tokens: input ids.
    positions: RoPE positions; defaults to 0..t-1 (plus ``cache.index`` when decoding).
    segment_ids: 0 for padding, otherwise tokens attend to earlier tokens of the same id;
      defaults to all ones.
    cache: optional KV cache to read and extend.
    lora: optional LoRA pytree ``{"layers": {name: {"a": [L, in, r], "b": [L, r, out]}}}``.
    lora_scale: LoRA's ``alpha / rank``.
  Returns:
    f32 logits and the updated cache (None without a cache).
  """
  b, t = tokens.shape
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  if positions is None:
    start = 0 if cache is None else cache.index
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
  h = embed(params, cfg, tokens)
  lora_layers = None if lora is None else lora["layers"]
  h, cache = run_layers(params["layers"], cfg, h, positions, segment_ids, cache, lora_layers,
                        lora_scale)
  return unembed(params, cfg, h), cache
