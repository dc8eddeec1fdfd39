"""Online self-refining generation (BMO): keep a question, replace its bad answer by the model's own.

Offline selection (BDS) drops a harmful question together with its harmful response, and the pool loses
that question. This loop keeps the question instead: the policy being fine-tuned writes ``G`` new
responses for chosen questions, those responses replace the original one, and training continues on the
mix of the kept offline pairs (weighted by their BDS weights) and the regenerated responses (weighted by
an importance ratio, :mod:`bilevel_jax.core.bmo`). DESIGN.md section 2 ("Online self-refinement").

One round every ``regen_every`` (``F``) steps after ``warmup_steps``:

1. choose questions: ``lowest_weight`` (the share ``r`` of pairs BDS weighted lowest) or ``random``
   (a random share ``r``); with ``dynamic`` the choice is made again every round (a fresh random draw,
   or new scores from ``rescore(trainable)``), otherwise once;
2. sample ``G`` responses per chosen question from the current policy, storing the generator's
   per-token log-probs (:mod:`bilevel_jax.sampling`);
3. train: each step draws ``batch_size`` items uniformly from {kept offline pairs} + {regenerated
   questions}; a regenerated question contributes one of its ``G`` responses at random, so a question
   counts once whatever ``G`` is.

Records need ``question``, ``response``, ``label`` and ``index`` (the row of the example in the weight
vector); objects with those attributes and dicts with those keys both work (see :func:`as_pair`).
A pair is *kept* when it is in ``keep`` (the BDS selection; all pairs by default) and not regenerated,
*regenerated* when chosen this round, and *dropped* otherwise. Each round's report counts them, and gives
the refusal rate of the regenerated answers to harmful questions by phrase matching
(:mod:`bilevel_jax.refusal`). Generated text is returned, never printed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array

from bilevel_jax import refusal, sampling
from bilevel_jax.core import bmo, sft
from bilevel_jax.model import llama
from bilevel_jax.model import lora as lora_lib

Params = Any


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Settings of the online loop (static, hashable).

  Attributes:
    selection: ``lowest_weight`` or ``random``.
    share: ``r``, the fraction of pairs whose question is regenerated (of the pairs whose prompt
      fits ``max_len``; the others are skipped and counted).
    dynamic: choose the questions again every round.
    num_generations: ``G``, responses sampled per chosen question.
    regen_every: ``F``, training steps between two rounds of generation.
    warmup_steps: steps on the offline pairs alone before the first round.
    num_steps: total training steps.
    batch_size: rows per training step.
    max_len: training sequence length (prompt + response, truncated on the right).
    weighting: ``token`` (clipped token ratio, the authors' code), ``self_normalized`` (per-response
      ratio of ``reference`` to the generator, normalized per question; needs ``reference``) or
      ``none`` (plain SFT on the regenerated responses).
    clip, log_prob_floor: see :func:`bilevel_jax.core.bmo.token_importance_weights`.
    generator_log_probs: ``model`` (untempered ``log pi_gen``; the ratio is 1 right after sampling)
      or ``sampling`` (log-prob under the tempered/truncated distribution actually sampled from).
    offline_weighted: train kept offline pairs with their BDS weight ``p_i`` (else weight 1).
    harmful_labels: record labels counted as harmful questions in the report.
    refusal_phrases: phrase list for refusal matching (``default`` or ``gcg``).
    sampler: the sampler settings (``stop_ids`` should hold the tokenizer's end-of-turn ids).
    seed: seed of the batch-order stream.
  """

  selection: str = "lowest_weight"
  share: float = 0.2
  dynamic: bool = False
  num_generations: int = 4
  regen_every: int = 50
  warmup_steps: int = 0
  num_steps: int = 200
  batch_size: int = 8
  max_len: int = 256
  weighting: str = "token"
  clip: float = bmo.CLIP_DEFAULT
  log_prob_floor: float = bmo.LOG_PROB_FLOOR_DEFAULT
  generator_log_probs: str = "model"
  offline_weighted: bool = True
  harmful_labels: tuple[str, ...] = ("harmful",)
  refusal_phrases: str = "default"
  sampler: sampling.SamplerConfig = sampling.SamplerConfig(max_new_tokens=64, temperature=1.0)
  seed: int = 0

  def __post_init__(self):
    checks = [("selection", self.selection in ("lowest_weight", "random")),
              ("share", 0.0 <= self.share <= 1.0), ("num_generations", self.num_generations >= 1),
              ("regen_every", self.regen_every >= 1), ("warmup_steps", self.warmup_steps >= 0),
              ("batch_size", self.batch_size >= 1), ("max_len", self.max_len >= 2),
              ("weighting", self.weighting in ("token", "self_normalized", "none")),
              ("generator_log_probs", self.generator_log_probs in ("model", "sampling")),
              ("refusal_phrases", self.refusal_phrases in refusal.PHRASE_LISTS)]
    for name, ok in checks:
      if not ok:
        raise ValueError(f"RefineConfig.{name}: invalid value {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class Pair:
  """The minimal record the loop needs."""

  question: str
  response: str
  label: str
  index: int


def as_pair(record: Any, row: int) -> Pair:
  """Reads ``question``, ``response``, ``label``, ``index`` from an object or a mapping.

  Raises:
    ValueError: naming the row and the field, when a field is missing or has the wrong type.
  """
  get = record.get if isinstance(record, Mapping) else (lambda k, d=None: getattr(record, k, d))
  out = {}
  for name, typ in (("question", str), ("response", str), ("label", str), ("index", int)):
    value = get(name, None)
    if name == "label" and value is None:
      value = "unknown"
    if value is None:
      raise ValueError(f"refine: record {row}: missing field {name!r}")
    if isinstance(value, (np.integer,)):
      value = int(value)
    if not isinstance(value, typ) or isinstance(value, bool):
      raise ValueError(f"refine: record {row}: field {name!r} must be {typ.__name__}, "
                       f"got {type(value).__name__}")
    out[name] = value
  if not out["question"].strip():
    raise ValueError(f"refine: record {row}: field 'question' is empty")
  return Pair(**out)


def choose_questions(scores: np.ndarray, share: float, selection: str, rng: np.random.Generator
                     ) -> np.ndarray:
  """Positions (into ``scores``) of the pairs whose question gets regenerated.

  ``lowest_weight`` takes the ``round(share * n)`` lowest scores (ties by position, so the choice is
  deterministic); ``random`` draws that many positions without replacement from ``rng``.
  """
  n = len(scores)
  k = int(round(share * n))
  if selection == "lowest_weight":
    return np.sort(np.argsort(np.asarray(scores), kind="stable")[:k])
  if selection == "random":
    return np.sort(rng.choice(n, size=k, replace=False))
  raise ValueError(f"unknown selection {selection!r} (lowest_weight, random)")


class Example(NamedTuple):
  """One tokenized training row before padding."""

  prompt: list[int]
  response: list[int]
  gen_log_probs: list[float] | None  # None for offline pairs
  weight: float
  index: int


def build_batch(examples: Sequence[Example], max_len: int) -> tuple[dict, Array]:
  """Right-padded training batch and its per-row weights.

  The batch has the ``bilevel_jax.core.sft`` format plus ``gen_log_probs`` (aligned with
  ``targets``) and ``is_generated``. Sequences longer than ``max_len + 1`` tokens lose their last
  response tokens.
  """
  b = len(examples)
  batch = {k: np.zeros((b, max_len), np.int32) for k in ("tokens", "targets", "positions",
                                                          "segment_ids")}
  batch["loss_mask"] = np.zeros((b, max_len), np.float32)
  batch["gen_log_probs"] = np.zeros((b, max_len), np.float32)
  batch["is_generated"] = np.zeros((b,), np.float32)
  batch["index"] = np.zeros((b,), np.int32)
  weights = np.zeros((b,), np.float32)
  for r, ex in enumerate(examples):
    seq = (ex.prompt + ex.response)[:max_len + 1]
    n = len(seq) - 1
    batch["tokens"][r, :n] = seq[:-1]
    batch["targets"][r, :n] = seq[1:]
    batch["positions"][r, :n] = np.arange(n)
    batch["segment_ids"][r, :n] = 1
    start = len(ex.prompt) - 1
    batch["loss_mask"][r, start:n] = 1.0
    if ex.gen_log_probs is not None:
      batch["is_generated"][r] = 1.0
      lp = np.asarray(ex.gen_log_probs[:max(n - start, 0)], np.float32)
      batch["gen_log_probs"][r, start:start + len(lp)] = lp
    batch["index"][r] = ex.index
    weights[r] = ex.weight
  return {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(weights)


class RefineResult(NamedTuple):
  """What :func:`refine` returns.

  Attributes:
    trainable, opt_state: the trained params and optimizer state.
    rounds: one report dict per round of generation (see :func:`round_report`).
    steps: per-step metrics (``loss``, ``nll``, ``grad_norm`` as floats).
    generations: the last round's regenerated texts, ``{index: [G texts]}`` (may be harmful: write
      them to files, never to the console).
  """

  trainable: Params
  opt_state: optax.OptState
  rounds: list[dict]
  steps: list[dict]
  generations: dict[int, list[str]]


def round_report(pairs: Sequence[Pair], chosen: np.ndarray, keep: np.ndarray,
                 texts: Mapping[int, Sequence[str]], truncated: int, harmful_labels: Sequence[str],
                 phrase_list: str) -> dict:
  """Counts kept / regenerated / dropped pairs and the refusal rate of regenerated harmful answers.

  Args:
    pairs: all records.
    chosen: positions of the regenerated pairs.
    keep: bool per position, the offline selection.
    texts: regenerated answers by position.
    truncated: regenerated answers that hit ``max_new_tokens`` without a stop token.
  """
  regen = np.zeros(len(pairs), bool)
  regen[chosen] = True
  harmful = np.asarray([p.label in harmful_labels for p in pairs], bool)
  kept = keep & ~regen
  harm_texts = [t for i in np.flatnonzero(regen & harmful) for t in texts.get(int(i), ())]
  all_texts = [t for i in np.flatnonzero(regen) for t in texts.get(int(i), ())]
  n_harm = int(harmful.sum())
  return {
      "questions_kept": int(kept.sum()), "questions_regenerated": int(regen.sum()),
      "questions_dropped": int((~kept & ~regen).sum()),
      "harmful_questions": n_harm, "harmful_regenerated": int((regen & harmful).sum()),
      "harmful_kept_offline": int((kept & harmful).sum()),
      "harmful_questions_in_training": (float(((kept | regen) & harmful).sum()) / n_harm
                                        if n_harm else float("nan")),
      "refusal_rate_regenerated_harmful": refusal.refusal_rate(harm_texts, phrase_list),
      "refusal_rate_regenerated": refusal.refusal_rate(all_texts, phrase_list),
      "regenerated_responses": len(all_texts), "truncated_responses": truncated,
      "refusal_phrase_list": phrase_list,
  }


def refine(records: Sequence[Any], tokenizer, cfg: llama.LlamaConfig, spec: lora_lib.TrainableSpec,
           trainable: Params, frozen: Params, optimizer: optax.GradientTransformation,
           rcfg: RefineConfig, key: Array, weights: np.ndarray | None = None,
           keep: np.ndarray | None = None, opt_state: optax.OptState | None = None,
           reference: Params | None = None,
           rescore: Callable[[Params], np.ndarray] | None = None,
           on_round: Callable[[dict], None] | None = None,
           on_step: Callable[[int, dict], None] | None = None) -> RefineResult:
  """Runs the online self-refinement loop.

  Args:
    records: pool records (see :func:`as_pair`); ``index`` addresses ``weights`` and ``keep``.
    tokenizer: a tokenizer following ``bilevel_jax.model.tokenizer.Tokenizer``.
    cfg: model config.
    spec: what trains; ``trainable``/``frozen`` as from ``lora.split``.
    optimizer: optax optimizer; ``opt_state`` defaults to ``optimizer.init(trainable)``.
    rcfg: loop settings.
    key: root key; round ``k`` samples with ``fold_in(key, k)``.
    weights: BDS weights ``p_i`` by index (uniform when None); ``lowest_weight`` ranks by them.
    keep: bool by index, the offline pairs BDS kept (all when None).
    reference: trainable params of a reference copy (same ``frozen``) for ``self_normalized``.
    rescore: with ``dynamic`` and ``lowest_weight``, new scores by index from the current params.
    on_round, on_step: callbacks for reports and metrics.
  Returns:
    A :class:`RefineResult`.
  """
  if rcfg.weighting == "self_normalized" and reference is None:
    raise ValueError("refine: weighting='self_normalized' needs reference params")
  pairs = [as_pair(r, i) for i, r in enumerate(records)]
  if not pairs:
    raise ValueError("refine: no records")
  idx = np.asarray([p.index for p in pairs])
  n_index = int(idx.max()) + 1
  p_all = np.ones(n_index, np.float32) if weights is None else np.asarray(weights, np.float32)
  keep_all = np.ones(n_index, bool) if keep is None else np.asarray(keep, bool)
  if p_all.shape[0] < n_index or keep_all.shape[0] < n_index:
    raise ValueError(f"refine: weights/keep have {p_all.shape[0]}/{keep_all.shape[0]} entries but "
                     f"a record has index {n_index - 1}")
  keep_pos = keep_all[idx]
  offline, fits = [], np.ones(len(pairs), bool)
  for i, p in enumerate(pairs):
    prompt, resp = tokenizer.encode_chat(p.question, p.response)
    # A prompt that fills the row leaves no response token to train on or to generate: the pair is
    # skipped (neither kept nor regenerated) and counted in every round's report.
    fits[i] = len(prompt) < rcfg.max_len
    w = float(p_all[p.index]) if rcfg.offline_weighted else 1.0
    offline.append(Example(prompt, resp, None, w, p.index))
  keep_pos = keep_pos & fits
  candidates = np.flatnonzero(fits)

  step_fn, token_lp_fn = _compiled_steps(spec, cfg, rcfg.clip, rcfg.log_prob_floor, optimizer)
  if opt_state is None:
    opt_state = optimizer.init(trainable)
  rng = np.random.default_rng(rcfg.seed)
  chosen = np.zeros((0,), np.int64)
  regenerated: dict[int, list[Example]] = {}
  texts: dict[int, list[str]] = {}
  rounds, steps = [], []
  pool = None
  stop_ids = set(rcfg.sampler.stop_ids)

  for step in range(rcfg.num_steps):
    if step >= rcfg.warmup_steps and (step - rcfg.warmup_steps) % rcfg.regen_every == 0:
      r = len(rounds)
      t0 = time.perf_counter()
      if r == 0 or rcfg.dynamic:
        scores = p_all[idx]
        if rcfg.dynamic and rescore is not None and r > 0:
          scores = np.asarray(rescore(trainable))[idx]
        chosen = candidates[choose_questions(scores[candidates], rcfg.share, rcfg.selection, rng)]
      regenerated, texts, truncated = _regenerate(
          pairs, offline, chosen, tokenizer, cfg, spec, trainable, frozen, rcfg,
          jax.random.fold_in(key, r), reference, token_lp_fn, stop_ids)
      report = round_report(pairs, chosen, keep_pos, texts, truncated, rcfg.harmful_labels,
                            rcfg.refusal_phrases)
      report.update(round=r, step=step, weighting=rcfg.weighting, seconds=time.perf_counter() - t0,
                    questions_skipped_prompt_too_long=int((~fits).sum()),
                    regenerated_index=[pairs[int(i)].index for i in chosen])
      if rcfg.weighting == "self_normalized" and regenerated:
        ws = np.asarray([e.weight for exs in regenerated.values() for e in exs])
        # Effective sample size share: 1 when all weights are equal, 1/n when one dominates.
        report.update(response_weight_min=float(ws.min()), response_weight_max=float(ws.max()),
                      response_weight_ess=float(ws.sum() ** 2 / (ws ** 2).sum() / len(ws)))
      rounds.append(report)
      if on_round is not None:
        on_round(report)
    if pool is None or rounds and rounds[-1]["step"] == step:
      # The items a step draws from change only when a round regenerates.
      pool = [("offline", int(i)) for i in np.flatnonzero(keep_pos) if int(i) not in regenerated]
      pool += [("regen", i) for i in sorted(regenerated)]
      if not pool:
        raise ValueError("refine: nothing to train on (no kept pairs and no regenerated questions)")
    picks = rng.integers(0, len(pool), size=rcfg.batch_size)
    examples = []
    for j in picks:
      kind, i = pool[int(j)]
      if kind == "offline":
        examples.append(offline[i])
      else:
        examples.append(regenerated[i][int(rng.integers(0, len(regenerated[i])))])
    batch, row_weights = build_batch(examples, rcfg.max_len)
    trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch, row_weights)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["step"] = step
    steps.append(metrics)
    if on_step is not None:
      on_step(step, metrics)
  generations = {pairs[i].index: t for i, t in texts.items()}
  return RefineResult(trainable, opt_state, rounds, steps, generations)


@functools.lru_cache(maxsize=8)
def _compiled_steps(spec, cfg, clip, log_prob_floor, optimizer):
  """The jitted training step and token log-prob function, cached so that repeated calls of
  :func:`refine` with the same model, spec and optimizer object do not compile again."""
  logits_fn = lora_lib.make_logits_fn(spec, cfg)
  loss_fn = bmo.make_importance_weighted_loss_fn(logits_fn, clip, log_prob_floor)
  step_fn = sft.make_inner_step(loss_fn, optimizer)
  token_lp_fn = jax.jit(lambda tr, fr, b: sft.token_log_probs(logits_fn(tr, fr, b), b["targets"]))
  return step_fn, token_lp_fn


def _regenerate(pairs, offline, chosen, tokenizer, cfg, spec, trainable, frozen, rcfg, key,
                reference, token_lp_fn, stop_ids):
  """Samples ``G`` responses per chosen question; returns examples and texts by position."""
  g = rcfg.num_generations
  if len(chosen) == 0:
    return {}, {}, 0
  prompts = [offline[int(i)].prompt for i in chosen for _ in range(g)]
  out = sampling.generate_trainable(spec, trainable, frozen, cfg, rcfg.sampler, prompts, key)
  gen_lp = out.log_probs if rcfg.generator_log_probs == "model" else out.sample_log_probs
  examples: dict[int, list[Example]] = {}
  texts: dict[int, list[str]] = {}
  for row in range(len(prompts)):
    i = int(chosen[row // g])
    resp = sampling.response_tokens(out, row)
    lp = [float(x) for x in gen_lp[row, :len(resp)]]
    examples.setdefault(i, []).append(Example(prompts[row], resp, lp, 1.0, pairs[i].index))
    texts.setdefault(i, []).append(tokenizer.decode([t for t in resp if t not in stop_ids]))
  truncated = int(np.sum(~np.asarray(out.stopped)))
  if rcfg.weighting == "none":
    examples = {i: [e._replace(gen_log_probs=None) for e in exs] for i, exs in examples.items()}
  elif rcfg.weighting == "self_normalized":
    examples = _self_normalize(examples, frozen, reference, rcfg, token_lp_fn)
  return examples, texts, truncated


def _self_normalize(examples, frozen, reference, rcfg, token_lp_fn):
  """Per-response weights ``∝ pi_ref / pi_gen`` normalized per question (bmo module docstring)."""
  flat = [(i, e) for i, exs in examples.items() for e in exs]
  max_len = rcfg.max_len
  log_ratios = []
  for start in range(0, len(flat), rcfg.batch_size):
    part = [e for _, e in flat[start:start + rcfg.batch_size]]
    part += [part[-1]] * (rcfg.batch_size - len(part))  # one compiled shape
    batch, _ = build_batch(part, max_len)
    ref_lp = token_lp_fn(reference, frozen, batch)
    lr = bmo.response_log_ratio(ref_lp, batch["gen_log_probs"], batch["loss_mask"])
    log_ratios.append(np.asarray(lr))
  log_ratio = np.concatenate(log_ratios)[:len(flat)]
  groups = {i: g for g, i in enumerate(examples)}
  group = np.asarray([groups[i] for i, _ in flat])
  w = np.asarray(bmo.self_normalized_response_weights(jnp.asarray(log_ratio), jnp.asarray(group),
                                                      len(groups)))
  out: dict[int, list[Example]] = {}
  for (i, e), wi in zip(flat, w):
    out.setdefault(i, []).append(e._replace(gen_log_probs=None, weight=float(wi)))
  return out
