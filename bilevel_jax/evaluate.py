"""Judge-free evaluation (DESIGN.md section 5).

* Validation loss: the mean per-example response NLL (the upper-level objective ``f``) over batches.
* Refusal rate on held-out harmful prompts and over-refusal (the refusal rate) on benign prompts:
  greedy answers from the sampler, matched against the documented refusal-phrase list of
  :mod:`bilevel_jax.refusal` (the AdvBench convention).
* GSM8K exact match of the final number of the answer.
* Selection quality: AUROC and precision@k of the learned weights against the pool's known labels.

Generation goes through :mod:`bilevel_jax.sampling` in batches (greedy, stop on end of turn).
Generated text is returned to the caller, never printed: answers to harmful prompts may be harmful.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jaxtyping import Array

from bilevel_jax import sampling
from bilevel_jax.core import sft
from bilevel_jax.model import lora as lora_lib
from bilevel_jax.model import llama

Params = Any


# ----------------------------------------------------------------------------- losses


def validation_loss(loss_fn: sft.LossFn, trainable: Params, frozen: Params,
                    batches: Sequence[dict]) -> float:
  """Mean per-example response NLL over the valid rows of ``batches`` (``f`` of DESIGN.md).

  Args:
    loss_fn: per-example loss ``loss_fn(trainable, frozen, batch) -> [B]``.
    trainable, frozen: the model, split as for training.
    batches: numeric batch dicts (padding rows have ``index == -1``).
  """
  losses = per_example_losses(loss_fn, trainable, frozen, batches)
  if losses.size == 0:
    raise ValueError("validation_loss: the batches hold no example")
  return float(np.mean(losses))


def per_example_losses(loss_fn: sft.LossFn, trainable: Params, frozen: Params,
                       batches: Sequence[dict]) -> np.ndarray:
  """Per-example losses of the valid rows of ``batches``, in batch order."""
  fn = jax.jit(loss_fn)
  out = []
  for b in batches:
    valid = np.asarray(sft.valid_rows(b)) > 0
    out.append(np.asarray(fn(trainable, frozen, b))[valid])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------------- generation


def generate_answers(spec: lora_lib.TrainableSpec, trainable: Params, frozen: Params,
                     cfg: llama.LlamaConfig, tokenizer: Any, questions: Sequence[str], *,
                     max_new_tokens: int, batch_size: int, key: Array | None = None,
                     system: str | None = None) -> list[str]:
  """Greedy answers to ``questions`` with the chat template, decoded without the stop token.

  Args:
    spec, trainable, frozen: the model as split for training.
    cfg: model config.
    tokenizer: a ``bilevel_jax.model.tokenizer.Tokenizer``.
    questions: user turns.
    max_new_tokens: answer length cap.
    batch_size: prompts per sampler call (bucketed by the sampler).
    key: PRNG key (greedy decoding does not use it; kept for a sampled variant).
    system: optional system prompt (the tokenizer's default when None).
  """
  if not questions:
    return []
  key = jax.random.key(0) if key is None else key
  scfg = sampling.SamplerConfig(max_new_tokens=max_new_tokens, greedy=True,
                                stop_ids=tuple(tokenizer.stop_ids), pad_id=int(tokenizer.pad_id),
                                max_batch=batch_size)
  prompts = [tokenizer.encode_chat(q, None, system)[0] for q in questions]
  out = sampling.generate_trainable(spec, trainable, frozen, cfg, scfg, prompts, key)
  stops = set(tokenizer.stop_ids)
  texts = []
  for row in range(len(prompts)):
    ids = [t for t in sampling.response_tokens(out, row) if t not in stops]
    texts.append(tokenizer.decode(ids))
  return texts


# ----------------------------------------------------------------------------- refusal


def refusal_flags(texts: Sequence[str]) -> np.ndarray:
  """1.0 where an answer is a refusal by the phrase list of :mod:`bilevel_jax.refusal`."""
  from bilevel_jax.refusal import is_refusal
  return np.asarray([float(is_refusal(t)) for t in texts], np.float32)


def refusal_rate(texts: Sequence[str]) -> float:
  """Share of answers that refuse (on harmful prompts: higher is safer; on benign: over-refusal)."""
  if not texts:
    return float("nan")
  return float(np.mean(refusal_flags(texts)))


# ----------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
  """The final number of an answer, normalized (``'1,234.50'`` -> ``'1234.5'``), or None.

  GSM8K references end with ``#### <answer>``; when a text has that marker the number after it is
  taken, otherwise the last number in the text (the usual convention for model answers).
  """
  if "####" in text:
    text = text.rsplit("####", 1)[1]
  found = _NUMBER.findall(text)
  if not found:
    return None
  raw = found[-1].replace(",", "").replace("$", "")
  try:
    value = float(raw)
  except ValueError:
    return None
  if value == int(value):
    return str(int(value))
  return repr(value)


def gsm8k_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Share of predictions whose final number equals the reference's final number."""
  if len(predictions) != len(references):
    raise ValueError(f"gsm8k_exact_match: {len(predictions)} predictions for "
                     f"{len(references)} references")
  if not references:
    return float("nan")
  hits = []
  for p, r in zip(predictions, references):
    gold = final_number(r)
    if gold is None:
      raise ValueError(f"gsm8k_exact_match: reference has no final number: {r[:80]!r}")
    hits.append(final_number(p) == gold)
  return float(np.mean(hits))


# ----------------------------------------------------------------------------- selection quality


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
  """AUROC of ``scores`` for ``positives`` (the data package's helper; ties count one half)."""
  from bilevel_jax.data.stats import auroc as data_auroc
  return float(data_auroc(np.asarray(scores, np.float64), np.asarray(positives, bool)))


def precision_at_k(scores: Sequence[float], positives: Sequence[bool], k: int) -> float:
  """Share of positives among the ``k`` highest scores (ties broken by position, stable)."""
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives, bool)
  if not 0 < k <= scores.size:
    raise ValueError(f"precision_at_k: k={k} must be in 1..{scores.size}")
  order = np.argsort(-scores, kind="stable")[:k]
  return float(np.mean(positives[order]))


def selection_quality(weights: Sequence[float], is_bad: Sequence[bool],
                      k: int | None = None) -> dict[str, float]:
  """How well weights separate good from bad pairs.

  Args:
    weights: one weight (or logit, or any score where higher means keep) per pool example.
    is_bad: True for pairs labelled bad (harmful, low quality).
    k: how many lowest-weighted pairs precision@k looks at; default: the number of bad pairs.
  Returns:
    ``auroc`` (probability that a random good pair outweighs a random bad one; 0.5 is chance) and
    ``precision_at_k`` (share of bad pairs among the ``k`` lowest weights), plus ``k``.
  """
  w = np.asarray(weights, np.float64)
  bad = np.asarray(is_bad, bool)
  if w.shape != bad.shape:
    raise ValueError(f"selection_quality: {w.shape[0]} weights for {bad.shape[0]} labels")
  n_bad = int(bad.sum())
  if n_bad == 0 or n_bad == bad.size:
    return {"auroc": float("nan"), "precision_at_k": float("nan"), "k": 0}
  k = n_bad if k is None else k
  return {"auroc": auroc(w, ~bad), "precision_at_k": precision_at_k(-w, bad, k), "k": int(k)}


def response_lengths(tokenizer: Any, responses: Sequence[str]) -> np.ndarray:
  """Response length in tokens: the length confound baseline."""
  return np.asarray([len(tokenizer.encode(r)) for r in responses], np.float64)


def evaluate_model(spec: lora_lib.TrainableSpec, trainable: Params, frozen: Params,
                   cfg: llama.LlamaConfig, tokenizer: Any, *, loss_fn: sft.LossFn,
                   val_batches: Sequence[dict], harmful_prompts: Sequence[str] = (),
                   benign_prompts: Sequence[str] = (), gsm8k: Sequence[tuple[str, str]] = (),
                   max_new_tokens: int = 48, batch_size: int = 8, generate: bool = True
                   ) -> tuple[dict[str, float], dict[str, list[str]]]:
  """Every judge-free metric of one model.

  Returns:
    ``(metrics, answers)``: metrics ``val_loss``, ``refusal_rate_harmful``, ``over_refusal_benign``,
    ``gsm8k_exact_match`` (those whose prompts were given); answers per prompt set, to be written to
    files by the caller (never printed).
  """
  metrics: dict[str, float] = {}
  answers: dict[str, list[str]] = {}
  if val_batches:
    metrics["val_loss"] = validation_loss(loss_fn, trainable, frozen, val_batches)
  if not generate:
    return metrics, answers

  def answer(qs):
    return generate_answers(spec, trainable, frozen, cfg, tokenizer, list(qs),
                            max_new_tokens=max_new_tokens, batch_size=batch_size)

  if harmful_prompts:
    answers["harmful"] = answer(harmful_prompts)
    metrics["refusal_rate_harmful"] = refusal_rate(answers["harmful"])
  if benign_prompts:
    answers["benign"] = answer(benign_prompts)
    metrics["over_refusal_benign"] = refusal_rate(answers["benign"])
  if gsm8k:
    answers["gsm8k"] = answer([q for q, _ in gsm8k])
    metrics["gsm8k_exact_match"] = gsm8k_exact_match(answers["gsm8k"], [a for _, a in gsm8k])
  return metrics, answers
