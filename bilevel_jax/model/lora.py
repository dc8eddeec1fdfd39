"""LoRA adapters and the choice of what trains: ``full``, ``lora`` or ``last_n_layers``.

The differentiated code never sees the whole model: it sees ``trainable`` (a pytree that gets
gradients) and ``frozen`` (a pytree passed alongside as an argument, not closed over, so that jit does
not bake hundreds of MB of constants into the program). ``make_logits_fn`` returns the pure function
``logits(trainable, frozen, batch)`` for a given :class:`TrainableSpec`.

With ``last_n_layers`` the frozen prefix of the network gives the same hidden states on every inner
step, so :func:`precompute_prefix` runs it once per batch and stores ``prefix_hidden`` in the batch;
the logits function then only runs the last ``n`` layers.

``per_layer=True`` stores the trainable decoder layers as a tuple of per-layer dicts
(:func:`bilevel_jax.model.llama.unstack_layers`) instead of arrays stacked on a leading layer
axis, so the model runs them unrolled rather than under ``lax.scan``. The scan reads each layer's
weights out of the stack and writes its gradient back into a stacked buffer at every step;
per-layer arrays avoid both copies. On XLA:CPU the full-model SFT step takes 0.74-0.87 x the
stacked step's time and less temporary memory, at about 2 x the compile time (SmolLM2-135M,
docs/benchmarks.md). With ``lora`` both the adapters and the frozen base layers are unstacked (the
scan would otherwise slice every base weight out of the stack in the forward and the backward); its
LoRA SFT step was not measurably faster (1.51 x PyTorch against 1.48 x stacked, same run).
:func:`merge` restacks, so saved models and the sampler see the usual layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bilevel_jax.model import llama

Params = dict[str, Any]
LORA_TARGETS_DEFAULT = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class TrainableSpec:
  """What gets gradients.

  Attributes:
    kind: ``full`` (every param), ``lora`` (LoRA factors on ``lora_targets`` of every layer) or
      ``last_n_layers`` (the last ``n_layers`` decoder layers and the final norm).
    n_layers: number of trailing layers for ``last_n_layers``.
    lora_rank, lora_alpha, lora_targets: LoRA settings (scale = alpha / rank).
    per_layer: store the decoder layers that run under the trained code per layer rather than
      stacked (see the module docstring).
  """

  kind: str = "full"
  n_layers: int = 2
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS_DEFAULT
  per_layer: bool = False

  def __post_init__(self):
    if self.kind not in ("full", "lora", "last_n_layers"):
      raise ValueError(f"trainable kind must be full, lora or last_n_layers, got {self.kind!r}")

  @classmethod
  def from_config(cls, t) -> "TrainableSpec":
    """The spec of a run config's ``model.trainable`` block (the CLI and ``plan`` share it)."""
    return cls(kind=t.kind, n_layers=t.n_layers, lora_rank=t.lora_rank, lora_alpha=t.lora_alpha,
               per_layer=t.per_layer)

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank


def init_lora(cfg: llama.LlamaConfig, spec: TrainableSpec, key, dtype=jnp.float32) -> Params:
  """LoRA factors: ``a`` random (fan-in scaled), ``b`` zero, so the adapted model starts equal."""
  shapes = {"wq": (cfg.d_model, cfg.n_heads * cfg.head_dim),
            "wk": (cfg.d_model, cfg.n_kv_heads * cfg.head_dim),
            "wv": (cfg.d_model, cfg.n_kv_heads * cfg.head_dim),
            "wo": (cfg.n_heads * cfg.head_dim, cfg.d_model),
            "w_gate": (cfg.d_model, cfg.d_ff), "w_up": (cfg.d_model, cfg.d_ff),
            "w_down": (cfg.d_ff, cfg.d_model)}
  layers = {}
  for name, k in zip(spec.lora_targets, jax.random.split(key, len(spec.lora_targets))):
    d_in, d_out = shapes[name]
    a = jax.random.normal(k, (cfg.n_layers, d_in, spec.lora_rank), jnp.float32) / jnp.sqrt(d_in)
    layers[name] = {"a": a.astype(dtype), "b": jnp.zeros((cfg.n_layers, spec.lora_rank, d_out), dtype)}
  return {"layers": layers}


def _slice_layers(layers: Params, start: int, stop: int | None) -> Params:
  return jax.tree.map(lambda x: x[start:stop], layers)


def split(spec: TrainableSpec, cfg: llama.LlamaConfig, params: Params,
          lora: Params | None = None) -> tuple[Params, Params]:
  """Splits a model into ``(trainable, frozen)`` pytrees for ``spec``."""
  if spec.kind == "full":
    if spec.per_layer:
      return {**params, "layers": llama.unstack_layers(params["layers"])}, {}
    return params, {}
  if spec.kind == "lora":
    if lora is None:
      raise ValueError("trainable kind 'lora' needs LoRA params (see init_lora)")
    if spec.per_layer:
      return ({**lora, "layers": llama.unstack_layers(lora["layers"])},
              {**params, "layers": llama.unstack_layers(params["layers"])})
    return lora, params
  n = spec.n_layers
  if not 0 < n <= cfg.n_layers:
    raise ValueError(f"last_n_layers: n_layers={n} must be in 1..{cfg.n_layers}")
  cut = cfg.n_layers - n
  trainable_layers = _slice_layers(params["layers"], cut, None)
  if spec.per_layer:
    trainable_layers = llama.unstack_layers(trainable_layers)
  trainable = {"layers": trainable_layers, "final_norm": params["final_norm"]}
  frozen = {k: v for k, v in params.items() if k not in ("layers", "final_norm")}
  frozen["layers"] = _slice_layers(params["layers"], 0, cut)
  return trainable, frozen


def merge(spec: TrainableSpec, trainable: Params, frozen: Params) -> tuple[Params, Params | None]:
  """Inverse of :func:`split`: returns ``(params, lora_or_None)``."""
  if spec.kind == "full":
    return {**trainable, "layers": llama.stack_layers(trainable["layers"])}, None
  if spec.kind == "lora":
    return ({**frozen, "layers": llama.stack_layers(frozen["layers"])},
            {**trainable, "layers": llama.stack_layers(trainable["layers"])})
  params = {k: v for k, v in frozen.items() if k != "layers"}
  params["final_norm"] = trainable["final_norm"]
  params["layers"] = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0),
                                  frozen["layers"], llama.stack_layers(trainable["layers"]))
  return params, None


def precompute_prefix(spec: TrainableSpec, cfg: llama.LlamaConfig, frozen: Params,
                      batch: dict) -> dict:
  """For ``last_n_layers``: adds ``prefix_hidden`` (output of the frozen layers) to the batch."""
  if spec.kind != "last_n_layers":
    return batch
  h = llama.embed(frozen, cfg, batch["tokens"])
  h, _ = llama.run_layers(frozen["layers"], cfg, h, batch["positions"], batch["segment_ids"])
  return {**batch, "prefix_hidden": h}


def make_logits_fn(spec: TrainableSpec, cfg: llama.LlamaConfig
                   ) -> Callable[[Params, Params, dict], jax.Array]:
  """Returns the pure ``logits(trainable, frozen, batch) -> [B, T, V]`` for ``spec``.

  The batch needs ``tokens``, ``positions`` and ``segment_ids``; for ``last_n_layers`` a
  ``prefix_hidden`` entry (see :func:`precompute_prefix`) skips the frozen layers.
  """

  def logits_fn(trainable, frozen, batch):
    if spec.kind == "full":
      out, _ = llama.apply(trainable, cfg, batch["tokens"], batch["positions"], batch["segment_ids"])
      return out
    if spec.kind == "lora":
      out, _ = llama.apply(frozen, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                           lora=trainable, lora_scale=spec.lora_scale)
      return out
    if "prefix_hidden" in batch:
      h = batch["prefix_hidden"]
    else:
      h = llama.embed(frozen, cfg, batch["tokens"])
      h, _ = llama.run_layers(frozen["layers"], cfg, h, batch["positions"], batch["segment_ids"])
    h, _ = llama.run_layers(trainable["layers"], cfg, h, batch["positions"], batch["segment_ids"])
    head = {"final_norm": trainable["final_norm"], **{k: frozen[k] for k in ("embed", "lm_head") if k in frozen}}
    return llama.unembed(head, cfg, h)

  return logits_fn
