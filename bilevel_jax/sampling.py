"""A jit-compiled sampler for the Llama-family decoder: prefill, then KV-cache decode in a while loop.

The structure follows the gemma ``gm/text`` sampler: the sampler's settings live in a frozen, hashable
:class:`SamplerConfig` that ``jax.jit`` takes as a static argument; the loop state is a pytree
(:class:`SamplerState`); the prompt is prefilled in one forward pass and the answer decoded one token
at a time in ``lax.while_loop``, which exits early once every row has stopped.

Prompts of different lengths are *left*-padded into one ``[B, P]`` block: pad slots get segment id 0
(nothing attends to them), the first real token of each row gets RoPE position 0, and the model's
:class:`~bilevel_jax.model.llama.KVCache` shares one write index across rows, so every row's next token
lands in the same cache slot. ``P`` and ``B`` are rounded up to *buckets* (powers of two, or a configured
list), so a run compiles a handful of shapes instead of one per call.

Randomness: step ``t`` of a call samples with ``jax.random.fold_in(key, t)``, so a call is a pure
function of its key. Outputs per row: the generated tokens (the stop token or stop sequence included,
``pad_id`` after it), the per-token log-probabilities, the number of generated tokens and whether the
row stopped on a stop token/sequence (rather than on ``max_new_tokens``). Nothing after a row's stop
counts: its tokens are ``pad_id`` and its log-probs 0.

Two log-probs are returned for each sampled token ``y_t``:

* ``log_probs``: ``log softmax(logits)[y_t]``, the *untempered* model ``log pi_theta(y_t | ...)``.
  This is what the BMO importance ratio compares with the current model (``bilevel_jax.core.bmo``):
  when the current params equal the generator's, the ratio is exactly 1.
* ``sample_log_probs``: the log-probability under the distribution the token was actually drawn from
  (after temperature, top-k and top-p; 0 for greedy decoding, which is deterministic).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from bilevel_jax.model import llama
from bilevel_jax.model import lora as lora_lib

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings (hashable: a ``jax.jit`` static argument).

  Attributes:
    max_new_tokens: most tokens generated per row.
    temperature: softmax temperature (> 0) for sampling; ignored when ``greedy``.
    top_k: keep only the ``top_k`` most likely tokens (0 turns it off).
    top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p`` (1.0 = off).
    greedy: take the argmax instead of sampling.
    stop_ids: tokens that end a row (e.g. the tokenizer's ``stop_ids``, ``<|im_end|>`` for ChatML).
    stop_sequences: token sequences that end a row when the generated text ends with one of them.
    pad_id: token written to prompt padding and to every slot after a row stopped.
    prompt_buckets: allowed padded prompt lengths, ascending; empty means powers of two.
    batch_buckets: allowed padded batch sizes, ascending; empty means powers of two.
    min_prompt_bucket: smallest power-of-two prompt length (when ``prompt_buckets`` is empty).
    max_batch: largest batch run in one call; :func:`generate` splits bigger requests in chunks.
  """

  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  stop_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  pad_id: int = 0
  prompt_buckets: tuple[int, ...] = ()
  batch_buckets: tuple[int, ...] = ()
  min_prompt_bucket: int = 16
  max_batch: int = 64

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplerConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"SamplerConfig.temperature must be > 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplerConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p}")
    for seq in self.stop_sequences:
      if not isinstance(seq, tuple) or not seq:
        raise ValueError(f"SamplerConfig.stop_sequences entries must be non-empty tuples, got {seq!r}")
    for name in ("prompt_buckets", "batch_buckets"):
      b = getattr(self, name)
      if any(x < 1 for x in b) or list(b) != sorted(b):
        raise ValueError(f"SamplerConfig.{name} must be ascending positive ints, got {b}")

  def replace(self, **kw) -> "SamplerConfig":
    return dataclasses.replace(self, **kw)


class SampleOutput(NamedTuple):
  """What a sampling call returns (arrays of ``[B, max_new_tokens]`` or ``[B]``)."""

  tokens: Any
  log_probs: Any
  sample_log_probs: Any
  lengths: Any
  stopped: Any


class SamplerState(NamedTuple):
  """Loop state of the decode ``lax.while_loop`` (a pytree).

  Attributes:
    step: number of tokens generated so far.
    cache: the KV cache (prompt plus the tokens fed back so far).
    logits: [B, V] next-token logits.
    history: [B, M + N] generated tokens after an ``M``-slot margin of -1 (``M`` = longest stop
      sequence minus one), so that a stop sequence ending at any step can be sliced out.
    log_probs, sample_log_probs: [B, N] per-token log-probs (see module docstring).
    positions: [B] RoPE position of the next token.
    done: [B] the row has stopped.
    stopped: [B] the row stopped on a stop token or sequence.
    lengths: [B] tokens generated per row, the stop token included.
  """

  step: Array
  cache: llama.KVCache
  logits: Array
  history: Array
  log_probs: Array
  sample_log_probs: Array
  positions: Array
  done: Array
  stopped: Array
  lengths: Array


# ----------------------------------------------------------------------------- pure helpers


def bucket_size(n: int, buckets: Sequence[int] = (), minimum: int = 1) -> int:
  """Smallest bucket that holds ``n``: from ``buckets``, or the next power of two >= ``minimum``.

  Raises:
    ValueError: if ``n`` is larger than the largest configured bucket.
  """
  if buckets:
    for b in buckets:
      if b >= n:
        return b
    raise ValueError(f"size {n} exceeds the largest configured bucket {buckets[-1]}")
  size = max(1, minimum)
  while size < n:
    size *= 2
  return size


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts into ``[batch, length]`` token ids plus their true lengths.

  Rows beyond ``len(prompts)`` are all padding (length 0); their outputs are discarded.
  """
  tokens = np.full((batch, length), pad_id, np.int32)
  lengths = np.zeros((batch,), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the padded length {length}")
    if len(p):
      tokens[i, length - len(p):] = np.asarray(p, np.int32)
    lengths[i] = len(p)
  return tokens, lengths


def prompt_layout(prompt_lengths: Int[Array, "b"], length: int
                  ) -> tuple[Int[Array, "b p"], Int[Array, "b p"]]:
  """Segment ids (0 on left padding, 1 on prompt) and positions (0 at each first real token)."""
  slots = jnp.arange(length, dtype=jnp.int32)[None, :]
  pad = (length - prompt_lengths)[:, None]
  segment_ids = (slots >= pad).astype(jnp.int32)
  positions = jnp.maximum(slots - pad, 0).astype(jnp.int32)
  return segment_ids, positions


def top_k_filter(logits: Float[Array, "b v"], k: int) -> Float[Array, "b v"]:
  """Sets every logit below the ``k``-th largest of its row to -inf (ties at the cut are kept)."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: Float[Array, "b v"], p: float) -> Float[Array, "b v"]:
  """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches ``p``.

  A token is kept when the mass of the tokens strictly more likely than it is below ``p``, so the most
  likely token always survives. Ties at the cut are kept.
  """
  if p >= 1.0:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  cut = jnp.min(jnp.where(mass_before < p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cut, logits, -jnp.inf)


def sampling_logits(logits: Float[Array, "b v"], scfg: SamplerConfig) -> Float[Array, "b v"]:
  """The logits actually sampled from: temperature, then top-k, then top-p (the usual order)."""
  out = logits.astype(jnp.float32) / scfg.temperature
  out = top_k_filter(out, scfg.top_k)
  return top_p_filter(out, scfg.top_p)


def choose_tokens(logits: Float[Array, "b v"], key: Array, scfg: SamplerConfig
                  ) -> tuple[Int[Array, "b"], Float[Array, "b"], Float[Array, "b"]]:
  """Picks one token per row; returns it, its untempered log-prob and its sampling log-prob."""
  logits = logits.astype(jnp.float32)
  model_logp = jax.nn.log_softmax(logits, axis=-1)
  if scfg.greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample_lp = jnp.zeros(tok.shape, jnp.float32)
  else:
    filtered = sampling_logits(logits, scfg)
    tok = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    sample_lp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tok[:, None], -1)[:, 0]
  lp = jnp.take_along_axis(model_logp, tok[:, None], axis=-1)[:, 0]
  return tok, lp, sample_lp


def stop_hit(history: Int[Array, "b h"], last: Array, tokens: Int[Array, "b"],
             scfg: SamplerConfig) -> Bool[Array, "b"]:
  """Whether each row's newest token (at ``history[:, last]``) ends a stop token or stop sequence."""
  hit = jnp.zeros(tokens.shape, bool)
  for sid in scfg.stop_ids:
    hit = hit | (tokens == sid)
  for seq in scfg.stop_sequences:
    m = len(seq)
    window = jax.lax.dynamic_slice_in_dim(history, last - m + 1, m, axis=1)
    hit = hit | jnp.all(window == jnp.asarray(seq, jnp.int32)[None, :], axis=1)
  return hit


def stop_margin(scfg: SamplerConfig) -> int:
  return max([len(s) for s in scfg.stop_sequences], default=1) - 1


# ----------------------------------------------------------------------------- the jitted sampler


def forward_last(params: Params, lora: Params | None, cfg: llama.LlamaConfig, lora_scale: float,
                 tokens: Int[Array, "b t"], positions: Int[Array, "b t"],
                 segment_ids: Int[Array, "b t"], cache: llama.KVCache
                 ) -> tuple[Float[Array, "b v"], llama.KVCache]:
  """Forward over new tokens through the cache; returns the logits of the last position only.

  ``params["layers"]`` (and LoRA's) may be stacked or per-layer (``llama.unstack_layers``); the cache
  must match (``llama.init_cache(..., per_layer=...)``).

  Unembedding only the last position avoids a ``[B, P, V]`` logits block at prefill (800 MB at
  B=32, P=128 for SmolLM2's 49k vocabulary).
  """
  h = llama.embed(params, cfg, tokens)
  lora_layers = None if lora is None else lora["layers"]
  h, cache = llama.run_layers(params["layers"], cfg, h, positions, segment_ids, cache, lora_layers,
                              lora_scale)
  return llama.unembed(params, cfg, h[:, -1:])[:, 0], cache


def _sample_padded(params: Params, lora: Params | None, tokens: Int[Array, "b p"],
                   prompt_lengths: Int[Array, "b"], key: Array, cfg: llama.LlamaConfig,
                   scfg: SamplerConfig, lora_scale: float) -> SampleOutput:
  """Prefill then decode one left-padded, bucketed batch (traced under jit)."""
  b, p = tokens.shape
  n = scfg.max_new_tokens
  margin = stop_margin(scfg)
  segment_ids, positions = prompt_layout(prompt_lengths, p)
  cache = llama.init_cache(cfg, b, p + n)
  logits, cache = forward_last(params, lora, cfg, lora_scale, tokens, positions, segment_ids, cache)
  # The decode loop runs the layers unrolled from per-layer params and a per-layer cache: a scan over
  # the stacked layers inside the loop would copy each layer's weights and the whole cache at every
  # step. The prefill (once per call) keeps the scan, which compiles faster.
  params = {**params, "layers": llama.unstack_layers(params["layers"])}
  if lora is not None:
    lora = {**lora, "layers": llama.unstack_layers(lora["layers"])}
  cache = cache._replace(k=tuple(cache.k), v=tuple(cache.v))
  state = SamplerState(
      step=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
      history=jnp.full((b, margin + n), -1, jnp.int32),
      log_probs=jnp.zeros((b, n), jnp.float32), sample_log_probs=jnp.zeros((b, n), jnp.float32),
      positions=prompt_lengths.astype(jnp.int32),
      # Bucket padding rows (no prompt) start done, so they cannot keep the loop running.
      done=prompt_lengths == 0, stopped=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32))

  def cond(s: SamplerState):
    return (s.step < n) & ~jnp.all(s.done)

  def body(s: SamplerState):
    tok, lp, slp = choose_tokens(s.logits, jax.random.fold_in(key, s.step), scfg)
    active = ~s.done
    tok = jnp.where(active, tok, scfg.pad_id)
    history = jax.lax.dynamic_update_slice_in_dim(s.history, tok[:, None], margin + s.step, axis=1)
    hit = active & stop_hit(history, margin + s.step, tok, scfg)
    log_probs = jax.lax.dynamic_update_slice_in_dim(
        s.log_probs, jnp.where(active, lp, 0.0)[:, None], s.step, axis=1)
    sample_log_probs = jax.lax.dynamic_update_slice_in_dim(
        s.sample_log_probs, jnp.where(active, slp, 0.0)[:, None], s.step, axis=1)
    logits, cache = forward_last(params, lora, cfg, lora_scale, tok[:, None], s.positions[:, None],
                             jnp.ones((b, 1), jnp.int32), s.cache)
    return SamplerState(step=s.step + 1, cache=cache, logits=logits, history=history,
                        log_probs=log_probs, sample_log_probs=sample_log_probs,
                        positions=s.positions + 1, done=s.done | hit, stopped=s.stopped | hit,
                        lengths=s.lengths + active.astype(jnp.int32))

  state = jax.lax.while_loop(cond, body, state)
  # Slots never reached (the loop ended early because every row stopped) still hold the -1 margin
  # value; they are padding.
  out_tokens = state.history[:, margin:]
  out_tokens = jnp.where(jnp.arange(n)[None, :] < state.lengths[:, None], out_tokens, scfg.pad_id)
  return SampleOutput(tokens=out_tokens, log_probs=state.log_probs,
                      sample_log_probs=state.sample_log_probs, lengths=state.lengths,
                      stopped=state.stopped)


sample_padded = jax.jit(_sample_padded, static_argnames=("cfg", "scfg", "lora_scale"))
sample_padded.__doc__ = """Jitted sampler over a left-padded batch.

Args:
  params: model params (``bilevel_jax.model.llama`` layout).
  lora: LoRA factors or None.
  tokens: [B, P] left-padded prompt ids (see :func:`left_pad`).
  prompt_lengths: [B] real prompt lengths (0 marks an unused bucket row).
  key: PRNG key; step ``t`` uses ``fold_in(key, t)``.
  cfg: static model config.
  scfg: static sampler config.
  lora_scale: static LoRA scale.
Returns:
  :class:`SampleOutput` of device arrays.
"""


def generate(params: Params, cfg: llama.LlamaConfig, scfg: SamplerConfig,
             prompts: Sequence[Sequence[int]], key: Array, lora: Params | None = None,
             lora_scale: float = 1.0) -> SampleOutput:
  """Samples continuations of token-id prompts; pads and buckets on the host, decodes under jit.

  Requests larger than ``scfg.max_batch`` run in chunks; chunk ``c`` uses ``fold_in(key, c)``.

  Args:
    params: model params.
    cfg: model config.
    scfg: sampler config.
    prompts: token ids of each prompt (e.g. ``tokenizer.encode_chat(question)[0]``); non-empty.
    key: PRNG key.
    lora: optional LoRA factors; ``lora_scale`` is ``alpha / rank``.
  Returns:
    :class:`SampleOutput` of NumPy arrays with ``len(prompts)`` rows.
  """
  if not prompts:
    raise ValueError("generate: no prompts given")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"generate: prompt {i} is empty")
  chunks = []
  n_chunks = (len(prompts) + scfg.max_batch - 1) // scfg.max_batch
  for c in range(n_chunks):
    part = prompts[c * scfg.max_batch:(c + 1) * scfg.max_batch]
    length = bucket_size(max(len(p) for p in part), scfg.prompt_buckets, scfg.min_prompt_bucket)
    if length + scfg.max_new_tokens > cfg.max_seq_len:
      raise ValueError(f"generate: padded prompt length {length} + max_new_tokens "
                       f"{scfg.max_new_tokens} exceeds the model's max_seq_len {cfg.max_seq_len}")
    batch = bucket_size(len(part), scfg.batch_buckets)
    tokens, lengths = left_pad(part, length, batch, scfg.pad_id)
    chunk_key = key if n_chunks == 1 else jax.random.fold_in(key, c)
    out = sample_padded(params, lora, jnp.asarray(tokens), jnp.asarray(lengths), chunk_key,
                        cfg=cfg, scfg=scfg, lora_scale=float(lora_scale))
    chunks.append(jax.tree.map(lambda x: np.asarray(x)[:len(part)], out))
  return SampleOutput(*[np.concatenate(xs, axis=0) for xs in zip(*chunks)])


def generate_trainable(spec: lora_lib.TrainableSpec, trainable: Params, frozen: Params,
                       cfg: llama.LlamaConfig, scfg: SamplerConfig,
                       prompts: Sequence[Sequence[int]], key: Array) -> SampleOutput:
  """:func:`generate` for a model split by a :class:`~bilevel_jax.model.lora.TrainableSpec`."""
  params, lora = lora_lib.merge(spec, trainable, frozen)
  scale = spec.lora_scale if lora is not None else 1.0
  return generate(params, cfg, scfg, prompts, key, lora=lora, lora_scale=scale)


def response_tokens(out: SampleOutput, row: int) -> list[int]:
  """The generated ids of one row, up to and including its stop token or sequence."""
  return [int(t) for t in out.tokens[row, :int(out.lengths[row])]]
