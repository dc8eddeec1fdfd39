"""Selection study: does each hypergradient estimator find the bad pairs of a real pool?

For one pool, a seed and a set of settings, it learns weights with every estimator of
``bilevel_jax/core/hypergrad.py`` and computes the cheap signals (response length, base-model loss,
loss change over a plain SFT run on pool plus validation, one-step gradient alignment, random), and
writes one JSON row per (pool, method, seed, settings) with the weight AUROC against the pool's
labels, precision at the true bad fraction, wall time and, for estimators, the AUROC curve over
outer steps with elapsed time (so "time until AUROC first reaches 0.90" can be read off).

Reproducible and resumable: rows already in ``--out`` (same key) are skipped, so a killed study
restarts where it stopped. The seed sets the pool's own construction (``PoolParams(seed=...)``, so
a seed is a different draw of pool, validation and test) and the training order.

    .venv/bin/python scripts/selection_study.py --pools safety_matched --seeds 0 \
        --methods baselines,likelihood_ratio,penalty --out docs/study/rows.jsonl --tag default

Settings (``--set key=value``, repeatable; see :data:`DEFAULTS`) apply to every method;
``--kw key=value`` sets an estimator field on every estimator that has it (e.g. ``fit_lr``, ``k``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bilevel_jax.core import hypergrad, select as select_lib, sft  # noqa: E402
from bilevel_jax.data import stats  # noqa: E402
from bilevel_jax.model import lora as lora_lib  # noqa: E402

ESTIMATORS = ("likelihood_ratio", "penalty", "penalty_vf", "unroll", "implicit", "one_step")
BASELINES = ("length", "base_loss", "loss_change", "alignment", "random")
# Diagnostics (run only when named in --methods; not part of "baselines"):
# ``fit_alignment``: ``grad l_i(theta_0) . (theta_0 - theta_fit)``, the first-order part of the
# ``likelihood_ratio`` score, with ``theta_fit`` fitted on validation as ``likelihood_ratio`` does
# (``--kw fit_optimizer/fit_lr/fit_steps``, its defaults otherwise). With an SGD fit the direction is
# a sum of raw validation gradients (the ``alignment``/``one_step`` direction); with Adam it is
# preconditioned, so the pair of rows tests whether the preconditioning carries the signal.
# ``influence_alignment``: ``grad l_i(theta_0) . v`` with ``(H + damping I) v = grad f(theta_0)``
# solved by ``--kw iters`` CG iterations (``--kw damping``, :data:`INFLUENCE_DEFAULTS` otherwise),
# ``H`` the Hessian of the uniform pool loss over the whole pool and ``f`` the whole validation set:
# the score ``implicit`` targets (its hypergradient is ``-grad l_i . v / B``), solved at the start
# on full sets instead of one 8-row batch per outer step.
# ``pool_alignment``: ``grad l_i(theta_0) . grad g(theta_0)``, ``g`` the uniform pool loss: to first
# order the weight score of ``penalty_vf`` (``l_i(theta) - l_i(theta_in)`` with ``theta_in`` one inner
# step on the pool from ``theta``), i.e. how typical a pair is of the pool, with no validation in it.
DIAGNOSTICS = ("fit_alignment", "influence_alignment", "pool_alignment")
INFLUENCE_DEFAULTS = {"iters": 20, "damping": 0.1}
MAX_LEN = {"safety_matched": 96, "safety_matched_easy": 96, "safety": 128, "quality": 128,
           "quality_easy": 128, "math": 192}

DEFAULTS: dict[str, Any] = {
    "trainable": "last_n_layers",  # or "lora" (all layers)
    "n_layers": 4,
    "lora_rank": 8,
    "max_len": 0,  # 0: MAX_LEN[pool]
    "pool_size": 160,  # stratified subsample when the pool is larger (0: all)
    "fit_only": True,  # keep only pairs whose conversation fits max_len (corruption stays visible)
    "val_size": 0,  # 0: whole validation split
    # validation records of these labels only, comma-separated ("": all), e.g. "refusal" or "good"
    # on the safety pools (pyrit refusals / good benign answers); applied before val_size
    "val_labels": "",
    "batch_size": 8,
    "val_batch_size": 8,
    "steps": 40,  # outer steps (likelihood_ratio: fit steps + one pass over the pool)
    "inner_opt": "sgd",
    "inner_lr": 1e-2,
    "logit_opt": "adam",
    "logit_lr": 0.1,
    "parametrization": "softmax_n",
    "sft_steps": 40,  # loss_change baseline: plain SFT steps on pool + validation
}
ADDED_SETTINGS = {"val_labels": ""}  # see row_key


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class StudyData:
  """One pool draw: records and their per-example arrays (batch format of ``core/sft.py``)."""

  pool: list
  val: list
  pool_arrays: dict
  val_arrays: dict
  is_bad: np.ndarray
  notes: dict


def encode(records, tokenizer, max_len: int) -> dict[str, np.ndarray]:
  """Right-padded per-example arrays; the response is cut when the pair is longer than the row."""
  n = len(records)
  out = {k: np.zeros((n, max_len), np.int32) for k in ("tokens", "targets", "positions",
                                                       "segment_ids")}
  out["loss_mask"] = np.zeros((n, max_len), np.float32)
  for i, r in enumerate(records):
    prompt, resp = tokenizer.encode_chat(r.question, r.response)
    ids = (prompt + resp)[:max_len + 1]
    m = len(ids) - 1
    if len(prompt) >= len(ids):
      raise ValueError(f"record {r.example_id}: prompt of {len(prompt)} tokens leaves no response "
                       f"token within max_len={max_len}")
    out["tokens"][i, :m], out["targets"][i, :m] = ids[:-1], ids[1:]
    out["positions"][i, :m] = np.arange(m)
    out["segment_ids"][i, :m] = 1
    out["loss_mask"][i, len(prompt) - 1:m] = 1.0
  out["index"] = np.arange(n, dtype=np.int32)
  return out


def conv_len(r, tokenizer) -> int:
  p, s = tokenizer.encode_chat(r.question, r.response)
  return len(p) + len(s)


def subsample(pool, is_bad, size: int, seed: int) -> list[int]:
  """Rows of a stratified random subsample of ``size`` (keeps the bad fraction)."""
  rng = np.random.default_rng(seed + 7919)
  bad, good = np.flatnonzero(is_bad), np.flatnonzero(~is_bad)
  n_bad = int(round(size * len(bad) / len(pool)))
  rows = np.concatenate([rng.choice(bad, n_bad, replace=False),
                         rng.choice(good, size - n_bad, replace=False)])
  return sorted(rows.tolist())


def pool_data(name: str, seed: int, s: dict, tokenizer) -> StudyData:
  """Builds pool ``name`` with ``PoolParams(seed=seed)`` and applies the size/fit settings."""
  from bilevel_jax.data import sources
  p = sources.build_pool(name, sources.PoolParams(seed=seed))
  pool = sorted(p.splits["pool"], key=lambda r: r.example_id)
  val = [r for r in p.splits["validation"] if r.response]
  return make_data(pool, val, s, tokenizer, seed, max_len=s["max_len"] or MAX_LEN.get(name, 128))


def make_data(pool, val, s: dict, tokenizer, seed: int, max_len: int) -> StudyData:
  notes = {"n_built": len(pool), "max_len": max_len}
  if s["fit_only"]:
    fits = [r for r in pool if conv_len(r, tokenizer) <= max_len + 1]
    notes["n_fit"] = len(fits)
    if not fits:
      raise ValueError(f"no pool pair fits max_len={max_len} tokens; raise max_len or set fit_only=0")
    pool = fits
  is_bad = np.asarray([r.is_bad for r in pool])
  if s["pool_size"] and len(pool) > s["pool_size"]:
    rows = subsample(pool, is_bad, s["pool_size"], seed)
    pool, is_bad = [pool[i] for i in rows], is_bad[rows]
  # Validation pairs need at least a few response tokens inside the row to say anything.
  val_fit = [r for r in val if len(tokenizer.encode_chat(r.question, r.response)[0]) + 8 <= max_len + 1]
  notes["n_val_prompt_too_long"] = len(val) - len(val_fit)
  val = val_fit
  if s["val_labels"]:
    keep = set(s["val_labels"].split(","))
    known = {r.label for r in val}
    if not keep <= known:
      raise ValueError(f"val_labels: {sorted(keep - known)} not among the validation labels "
                       f"{sorted(known)}")
    val = [r for r in val if r.label in keep]
  if s["val_size"] and len(val) > s["val_size"]:
    rng = np.random.default_rng(seed + 31)
    val = [val[i] for i in sorted(rng.choice(len(val), s["val_size"], replace=False))]
  notes.update(n=len(pool), n_bad=int(is_bad.sum()), n_val=len(val))
  return StudyData(pool, val, encode(pool, tokenizer, max_len), encode(val, tokenizer, max_len),
                   is_bad, notes)


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass
class StudyModel:
  """The split model and its per-example loss for one trainable set."""

  cfg: Any
  spec: lora_lib.TrainableSpec
  trainable: Any
  frozen: Any
  loss_fn: Callable

  def __post_init__(self):
    self.loss_jit = jax.jit(self.loss_fn)  # compiled once per model, reused for every loss pass


def make_model(cfg, params, s: dict, seed: int) -> StudyModel:
  spec = lora_lib.TrainableSpec(kind=s["trainable"], n_layers=s["n_layers"],
                                lora_rank=s["lora_rank"], lora_alpha=2.0 * s["lora_rank"])
  lora = (lora_lib.init_lora(cfg, spec, jax.random.fold_in(jax.random.key(seed), 11))
          if spec.kind == "lora" else None)
  trainable, frozen = lora_lib.split(spec, cfg, params, lora)
  loss_fn = sft.make_loss_fn(lora_lib.make_logits_fn(spec, cfg))
  return StudyModel(cfg, spec, trainable, frozen, loss_fn)


def add_prefix(m: StudyModel, arrays: dict, chunk: int = 8) -> dict:
  """Runs the frozen prefix once per example (``last_n_layers``): every later step reuses it."""
  if m.spec.kind != "last_n_layers":
    return arrays
  fn = jax.jit(lambda fz, b: lora_lib.precompute_prefix(m.spec, m.cfg, fz, b)["prefix_hidden"])
  n, outs = len(arrays["index"]), []
  for start in range(0, n, chunk):
    rows = np.arange(start, min(start + chunk, n))
    rows_p = np.concatenate([rows, np.full(chunk - len(rows), rows[0])])
    b = {k: jnp.asarray(arrays[k][rows_p]) for k in ("tokens", "positions", "segment_ids")}
    outs.append(np.asarray(fn(m.frozen, b))[:len(rows)])
  return {**arrays, "prefix_hidden": np.concatenate(outs)}


def cached_prefix(m: StudyModel, data: StudyData, cache_dir: pathlib.Path | None, key) -> tuple:
  """:func:`add_prefix` of pool and validation arrays, stored under ``cache_dir`` by settings."""
  if cache_dir is None or m.spec.kind != "last_n_layers":
    return add_prefix(m, data.pool_arrays), add_prefix(m, data.val_arrays)
  pool_name, seed, s = key
  fields = ("n_layers", "max_len", "pool_size", "fit_only", "val_size", "val_labels")
  name = f"{pool_name}-s{seed}-" + "-".join(f"{f}{s[f]}" for f in fields) + ".npz"
  path = cache_dir / name
  if path.exists():
    z = np.load(path)
    if (np.array_equal(z["pool_tokens"], data.pool_arrays["tokens"])
        and np.array_equal(z["val_tokens"], data.val_arrays["tokens"])):
      return ({**data.pool_arrays, "prefix_hidden": z["pool"]},
              {**data.val_arrays, "prefix_hidden": z["val"]})
  pa, va = add_prefix(m, data.pool_arrays), add_prefix(m, data.val_arrays)
  cache_dir.mkdir(parents=True, exist_ok=True)
  np.savez(path, pool=pa["prefix_hidden"], val=va["prefix_hidden"],
           pool_tokens=pa["tokens"], val_tokens=va["tokens"])
  return pa, va


def batches_of(arrays: dict, batch_size: int) -> list[dict]:
  """Every example once, in order, in same-shaped batches (the last padded with index -1)."""
  n, out = len(arrays["index"]), []
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    take = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    b = {k: v[take] for k, v in arrays.items()}
    b["index"] = np.where(np.arange(batch_size) < len(rows), b["index"], -1).astype(np.int32)
    out.append(b)
  return out


def per_example_losses(m: StudyModel, params, arrays: dict, batch_size: int) -> np.ndarray:
  out = [np.asarray(m.loss_jit(params, m.frozen, b))[b["index"] >= 0]
         for b in batches_of(arrays, batch_size)]
  return np.concatenate(out)


# ----------------------------------------------------------------------------- scoring


def quality(scores: np.ndarray, is_bad: np.ndarray) -> dict:
  """AUROC (higher score = kept; good pairs positive) and precision at the true bad fraction."""
  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
  k = int(is_bad.sum())
  lowest = np.argsort(scores, kind="stable")[:k]
  return {"auroc": stats.auroc(scores, (~is_bad).astype(int)),
          "precision": float(np.mean(is_bad[lowest]))}


def bad_kind(r) -> str:
  """What makes a bad pair bad: its corruption kind (``quality``, ``math``) or its label."""
  return str(r.meta.get("corruption", r.label))


def by_kind(scores: np.ndarray, data: StudyData) -> dict[str, dict]:
  """AUROC of every good pair against the bad pairs of one kind (which corruptions are found)."""
  scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
  kinds = np.asarray([bad_kind(r) if b else "" for r, b in zip(data.pool, data.is_bad)])
  good = ~data.is_bad
  out = {}
  for k in sorted(set(kinds[data.is_bad])):
    rows = good | (kinds == k)
    out[k] = {"n": int((kinds == k).sum()),
              "auroc": round(stats.auroc(scores[rows], good[rows].astype(int)), 4)}
  return out


def inner_optimizer(s: dict):
  return sft.sgd_or_adam(s["inner_opt"], s["inner_lr"])


def baseline_score(name: str, data: StudyData, m: StudyModel, s: dict, seed: int,
                   cache: dict) -> tuple[np.ndarray, float]:
  """``(scores, seconds)`` of one cheap signal (higher score = kept); ``cache`` keeps base losses."""
  pa, va, bs = data.pool_arrays, data.val_arrays, s["batch_size"]
  t = time.time()
  if name == "length":
    return pa["loss_mask"].sum(1), time.time() - t
  if name == "random":
    return np.random.default_rng(seed).random(len(data.pool)), 0.0
  if name == "alignment":
    return alignment(m, pa, va, bs, s["val_batch_size"]), time.time() - t
  if "base" not in cache:
    cache["base"] = (per_example_losses(m, m.trainable, pa, bs), time.time() - t)
  base, base_s = cache["base"]
  if name == "base_loss":
    return -base, base_s
  # loss_change: plain SFT on pool + validation (direct mixing), then each pair's loss decrease.
  both = {k: np.concatenate([pa[k], va[k]]) for k in pa if k in va}
  both["index"] = np.arange(len(both["index"]), dtype=np.int32)
  step = sft.make_inner_step(m.loss_fn, inner_optimizer(s))
  params = jax.tree.map(jnp.copy, m.trainable)
  opt_state = inner_optimizer(s).init(params)
  it = select_lib.epoch_batches(both, bs, seed=seed)
  for _ in range(s["sft_steps"]):
    b = next(it)
    params, opt_state, _ = step(params, m.frozen, opt_state, b, (b["index"] >= 0).astype(np.float32))
  return base - per_example_losses(m, params, pa, bs), time.time() - t + base_s


def _row_sum(m: StudyModel):
  """Sum of the per-row losses of a batch, padding rows (index -1) excluded."""
  return lambda q, fz, b: jnp.sum(m.loss_fn(q, fz, b) * (b["index"] >= 0))


def mean_gradient(m: StudyModel, arrays: dict, bs: int):
  """Gradient of the mean per-row loss over every row of ``arrays`` at ``m.trainable``."""
  # frozen is an argument, never closed over: a closure would bake the embedding into the program.
  grad_sum = jax.jit(jax.grad(_row_sum(m)))
  g = None
  for b in batches_of(arrays, bs):
    gb = grad_sum(m.trainable, m.frozen, b)
    g = gb if g is None else jax.tree.map(jnp.add, g, gb)
  return jax.tree.map(lambda x: x / int((arrays["index"] >= 0).sum()), g)


def directional_scores(m: StudyModel, arrays: dict, bs: int, direction) -> np.ndarray:
  """``grad l_i(theta_0) . direction`` for every row of ``arrays`` (one forward-mode pass each)."""
  dots = jax.jit(lambda p, fz, b, d: hypergrad.directional_losses(m.loss_fn, p, fz, b, d))
  return np.concatenate([np.asarray(dots(m.trainable, m.frozen, b, direction))[b["index"] >= 0]
                         for b in batches_of(arrays, bs)])


def alignment(m: StudyModel, pa: dict, va: dict, bs: int, vbs: int) -> np.ndarray:
  """``grad l_i . grad f`` at the start (the ``one_step`` score) with ``f`` on all validation."""
  return directional_scores(m, pa, bs, mean_gradient(m, va, vbs))


def fit_on_validation(m: StudyModel, va: dict, vbs: int, opt, steps: int,
                      mask_padding: bool = False):
  """A copy of ``m.trainable`` after ``steps`` steps of ``opt`` on the validation batches in order.

  The rows that pad the last batch get weight 1 like ``likelihood_ratio``'s fit (they repeat
  row 0) unless ``mask_padding`` (weight 0; ``token_scores.py`` and ``warm_start_study.py`` rows
  were measured that way).
  """
  step = sft.make_inner_step(m.loss_fn, opt, donate=False)
  fit, opt_state = m.trainable, opt.init(m.trainable)
  vb = batches_of(va, vbs)
  for t in range(steps):
    b = vb[t % len(vb)]
    w = (b["index"] >= 0) if mask_padding else np.ones(vbs, bool)
    fit, opt_state, _ = step(fit, m.frozen, opt_state, b, w.astype(np.float32))
  return fit


def fit_alignment(m: StudyModel, pa: dict, va: dict, bs: int, vbs: int, kw: dict
                  ) -> tuple[np.ndarray, dict]:
  """``grad l_i(theta_0) . (theta_0 - theta_fit)`` per pool row (see :data:`DIAGNOSTICS`).

  ``theta_fit``: ``fit_steps`` steps on the cycled validation batches with uniform weights, exactly
  the fitting of ``likelihood_ratio`` (same optimizer settings and batch order). Returns the scores
  and ``{"exact_ratio": l_i(theta_0) - l_i(theta_fit), "fit_loss": l_i(theta_fit)}`` (the exact
  ``likelihood_ratio`` score and the raw loss under the fitted copy, for comparison).
  """
  lr_cls = hypergrad.ESTIMATORS["likelihood_ratio"]
  defaults = {f.name: f.default for f in dataclasses.fields(lr_cls)}
  opt = sft.sgd_or_adam(kw.get("fit_optimizer", defaults["fit_optimizer"]),
                        kw.get("fit_lr", defaults["fit_lr"]))
  fit = fit_on_validation(m, va, vbs, opt, kw.get("fit_steps", defaults["fit_steps"]))
  dots = jax.jit(lambda p, fz, b, f: hypergrad.likelihood_ratio_scores(m.loss_fn, p, f, fz, b,
                                                                      score="linear"))
  scores = np.concatenate([np.asarray(dots(m.trainable, m.frozen, b, fit))[b["index"] >= 0]
                           for b in batches_of(pa, bs)])
  start, fitted = per_example_losses(m, m.trainable, pa, bs), per_example_losses(m, fit, pa, bs)
  return scores, {"exact_ratio": start - fitted, "fit_loss": fitted}


def influence_alignment(m: StudyModel, pa: dict, va: dict, bs: int, vbs: int, kw: dict
                        ) -> tuple[np.ndarray, dict]:
  """``grad l_i(theta_0) . v``, ``(H + damping I) v = grad f`` by CG (see :data:`DIAGNOSTICS`).

  A plain Python CG over jitted per-batch Hessian-vector products (forward over reverse), so the
  residual of every iteration is recorded. Returns the scores and ``{"residuals": [...],
  "negative_curvature_at": k or None, ...}``: ``|(H + damping) v - grad f| / |grad f|`` after each
  completed iteration, and the iteration at which ``d . (H + damping) d <= 0`` stopped CG (``v`` is
  then the last iterate).
  """
  iters = int(kw.get("iters", INFLUENCE_DEFAULTS["iters"]))
  damping = float(kw.get("damping", INFLUENCE_DEFAULTS["damping"]))
  tree = jax.tree
  n_pool = int((pa["index"] >= 0).sum())
  row_sum = _row_sum(m)
  hvp_sum = jax.jit(lambda p, fz, b, v: jax.jvp(lambda q: jax.grad(row_sum)(q, fz, b),
                                                 (p,), (v,))[1])
  pool_b = batches_of(pa, bs)

  def matvec(v):
    hv = None
    for b in pool_b:
      x = hvp_sum(m.trainable, m.frozen, b, v)
      hv = x if hv is None else tree.map(jnp.add, hv, x)
    return tree.map(lambda a, x: a / n_pool + damping * x, hv, v)

  def dot(a, b):
    return float(sum(jnp.vdot(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b))))

  g = mean_gradient(m, va, vbs)
  g_norm = dot(g, g) ** 0.5
  v = tree.map(jnp.zeros_like, g)
  r, d = g, g
  rr, residuals, stopped = dot(g, g), [], None
  for i in range(iters):
    ad = matvec(d)
    curv = dot(d, ad)
    if not curv > 0:  # H + damping is not positive definite along d: CG cannot go on
      stopped = i + 1
      break
    alpha = rr / curv
    v = tree.map(lambda x, y: x + alpha * y, v, d)
    r = tree.map(lambda x, y: x - alpha * y, r, ad)
    rr_new = dot(r, r)
    residuals.append(round(rr_new ** 0.5 / g_norm, 5))
    d = tree.map(lambda x, y: x + (rr_new / rr) * y, r, d)
    rr = rr_new
  return directional_scores(m, pa, bs, v), {"residuals": residuals, "iters": iters,
                                            "damping": damping, "negative_curvature_at": stopped}


def make_estimator(name: str, s: dict, kw: dict, n: int):
  fields = {f.name for f in dataclasses.fields(hypergrad.ESTIMATORS[name])}
  kwargs = {k: v for k, v in kw.items() if k in fields}
  steps_per_epoch = -(-n // s["batch_size"])
  if name == "penalty":
    kwargs.setdefault("decay_every", steps_per_epoch)
  if name == "penalty_vf":
    kwargs.setdefault("gamma_ramp_steps", s["steps"])
  if name == "one_step":
    kwargs.setdefault("lr", s["inner_lr"])
  return hypergrad.make_estimator(name, **kwargs), kwargs


def run_estimator(name: str, data: StudyData, m: StudyModel, s: dict, kw: dict, seed: int) -> dict:
  """Learns the logits with estimator ``name``; the AUROC after every outer step, with time."""
  n = len(data.pool)
  est, kwargs = make_estimator(name, s, kw, n)
  problem = hypergrad.Problem(m.loss_fn, inner_optimizer(s), s["parametrization"])
  logit_opt = select_lib.make_logit_optimizer(est, s["logit_opt"], s["logit_lr"])
  steps = s["steps"]
  if est.closed_form:  # fitting, then one scoring pass over the whole pool
    steps = est.warmup_steps + -(-n // s["batch_size"])
  train = select_lib.epoch_batches(data.pool_arrays, s["batch_size"], seed=seed)
  if est.warmup_steps:  # fitting steps read no train batch: start the scoring pass at an epoch start
    train = itertools.chain(itertools.repeat(batches_of(data.pool_arrays, s["batch_size"])[0],
                                             est.warmup_steps), train)
  val = select_lib.cycle(batches_of(data.val_arrays, s["val_batch_size"]))
  t0 = time.time()
  curve, times = [], []
  result = select_lib.select(problem, est, m.trainable, m.frozen, n, train, val, steps,
                             logit_optimizer=logit_opt, seed=seed, history_every=1,
                             callback=lambda step, row: times.append(time.time() - t0))
  wall = time.time() - t0
  for step, logits, el in zip(result.history_steps[1:], result.history[1:], times):
    curve.append([int(step), round(float(el), 2), round(quality(logits, data.is_bad)["auroc"], 4)])
  q = quality(result.logits, data.is_bad)
  q["scores"] = np.asarray(result.logits)
  reach = next((c for c in curve if c[2] >= 0.9), None)
  step_times = np.diff([0.0] + times)
  last = result.metrics[-1] if result.metrics else {}
  # Every field of the estimator as run, so a row stays readable when a library default changes
  # (likelihood_ratio's score became "linear"; rows without "estimator" ran with "ratio").
  fields = {k: v for k, v in dataclasses.asdict(est).items()
            if isinstance(v, (int, float, str, bool, type(None)))}
  return {**q, "wall_s": round(wall, 2), "steps": steps, "kwargs": kwargs, "estimator": fields,
          "first_step_s": round(float(step_times[0]), 2),
          "median_step_s": round(float(np.median(step_times[1:])), 3) if steps > 1 else None,
          "best_auroc": max(c[2] for c in curve), "time_to_090_s": reach[1] if reach else None,
          "steps_to_090": reach[0] if reach else None, "curve": curve,
          "final_metrics": {k: round(v, 5) for k, v in last.items()}}


# ----------------------------------------------------------------------------- driver


def row_key(pool: str, method: str, seed: int, s: dict, kw: dict) -> str:
  if method == "likelihood_ratio" and "score" not in kw:
    # The library default changed from "ratio" to "linear"; the rows keyed without a score ran
    # "ratio", so a default run must not be mistaken for them.
    kw = {**kw, "score": hypergrad.LikelihoodRatio.score}
  # Settings added after rows were recorded stay out of the key at their default, so that those
  # rows' keys still match.
  s = {k: v for k, v in s.items() if not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
  return json.dumps([pool, method, seed, s, kw], sort_keys=True)


def read_done(path: pathlib.Path) -> set[str]:
  if not path.exists():
    return set()
  return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def study(pool_name: str, seeds, methods, s: dict, kw: dict, out: pathlib.Path, tag: str,
          model_loader: Callable, data_loader: Callable, device: str = "cpu",
          cache_dir: pathlib.Path | None = None) -> list[dict]:
  """Runs every (seed, method) not yet in ``out``; appends one JSON row each and returns them.

  Args:
    model_loader: ``() -> (cfg, params, tokenizer)``.
    data_loader: ``(pool_name, seed, settings, tokenizer) -> StudyData``.
    cache_dir: where the frozen prefix's hidden states are kept between runs (None: not kept).
  """
  done, rows = read_done(out), []
  out.parent.mkdir(parents=True, exist_ok=True)
  cfg, params, tok = model_loader()
  for seed in seeds:
    todo = [mt for mt in methods if row_key(pool_name, mt, seed, s, kw) not in done]
    if not todo:
      continue
    t = time.time()
    data = data_loader(pool_name, seed, s, tok)
    m = make_model(cfg, params, s, seed)
    data.pool_arrays, data.val_arrays = cached_prefix(m, data, cache_dir, (pool_name, seed, s))
    prep_s = time.time() - t
    print(f"{tag} {pool_name} s{seed}: data and prefix ready in {prep_s:.0f}s ({data.notes})",
          flush=True)
    cache: dict = {}
    for method in todo:
      t = time.time()
      if method == "pool_alignment":
        scores = directional_scores(m, data.pool_arrays, s["batch_size"],
                                    mean_gradient(m, data.pool_arrays, s["batch_size"]))
        res = {**quality(scores, data.is_bad), "wall_s": round(time.time() - t, 2)}
      elif method == "influence_alignment":
        scores, extra = influence_alignment(m, data.pool_arrays, data.val_arrays, s["batch_size"],
                                            s["val_batch_size"], kw)
        res = {**quality(scores, data.is_bad), "wall_s": round(time.time() - t, 2), **extra}
      elif method == "fit_alignment":
        scores, extra = fit_alignment(m, data.pool_arrays, data.val_arrays, s["batch_size"],
                                      s["val_batch_size"], kw)
        exact = extra["exact_ratio"]
        res = {**quality(scores, data.is_bad), "wall_s": round(time.time() - t, 2),
               "exact_ratio_auroc": quality(exact, data.is_bad)["auroc"],
               "corr_with_exact": round(float(np.corrcoef(scores, exact)[0, 1]), 4),
               # the raw loss under the fitted copy (lower kept): what a raw-loss score would see
               "fit_loss_auroc": quality(-extra["fit_loss"], data.is_bad)["auroc"]}
      elif method in BASELINES:
        scores, secs = baseline_score(method, data, m, s, seed, cache)
        res = {**quality(scores, data.is_bad), "wall_s": round(secs, 2)}
        if method == "length":
          res["separability"] = stats.separability(res["auroc"])
      else:
        res = run_estimator(method, data, m, s, kw, seed)
        scores = res.pop("scores")
      # Per-example scores stay in the row so later analyses need no rerun.
      res["by_kind"] = by_kind(scores, data)
      res["scores"] = [round(float(x), 5) for x in np.asarray(scores, np.float64)]
      res["example_ids"] = [r.example_id for r in data.pool]
      row = {"key": row_key(pool_name, method, seed, s, kw), "tag": tag, "pool": pool_name,
             "method": method, "seed": seed, "settings": s, "kw": kw, "data": data.notes,
             "prep_s": round(prep_s, 1), "device": device, "load": os.getloadavg()[0], **res,
             "elapsed_s": round(time.time() - t, 1)}
      with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
      rows.append(row)
      print(f"{tag} {pool_name} s{seed} {method}: auroc {res['auroc']:.3f} prec "
            f"{res['precision']:.3f} wall {res['wall_s']}s", flush=True)
  return rows


def summarize(path: pathlib.Path, tags: list[str] | None = None) -> str:
  """A Markdown table of the rows in ``path``: mean and spread over seeds per (tag, pool, method)."""
  groups: dict[tuple, list[dict]] = {}
  for line in path.read_text().splitlines():
    if line.strip():
      r = json.loads(line)
      if tags is None or r["tag"] in tags:
        groups.setdefault((r["tag"], r["pool"], r["method"]), []).append(r)
  lines = ["| tag | pool | method | seeds | AUROC mean (std) | precision@bad mean (std) | wall s "
           "| time to 0.90 s (steps) | best AUROC |", "|" + "---|" * 9]
  for (tag, pool, method), rs in groups.items():
    a = np.array([r["auroc"] for r in rs])
    pr = np.array([r["precision"] for r in rs])
    wall = np.mean([r["wall_s"] for r in rs])
    reach = [r.get("time_to_090_s") for r in rs if "curve" in r]
    hit = [(r["time_to_090_s"], r["steps_to_090"]) for r in rs if r.get("time_to_090_s") is not None]
    t90 = (f"{np.mean([h[0] for h in hit]):.0f} ({np.mean([h[1] for h in hit]):.0f}); "
           f"{len(hit)}/{len(reach)} reached" if reach else "")
    best = f"{np.mean([r['best_auroc'] for r in rs]):.3f}" if reach else ""
    lines.append(f"| {tag} | {pool} | {method} | {','.join(str(r['seed']) for r in rs)} | "
                 f"{a.mean():.3f} ({a.std():.3f}) | {pr.mean():.3f} ({pr.std():.3f}) | {wall:.0f} | "
                 f"{t90} | {best} |")
  return "\n".join(lines)


def read_rows(path: pathlib.Path, tags: list[str] | None = None) -> list[dict]:
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if tags is None or r["tag"] in tags]


def spread(values, digits: int = 3) -> str:
  """``mean (min-max, n)`` over seeds: with 3 seeds the range says more than a std."""
  v = np.asarray(values, np.float64)
  if len(v) == 1:
    return f"{v[0]:.{digits}f} (n=1)"
  d = max(digits - 1, 0)
  return f"{v.mean():.{digits}f} ({v.min():.{d}f}-{v.max():.{d}f}, n={len(v)})"


def compact(path: pathlib.Path, tags: list[str] | None = None, field: str = "auroc") -> str:
  """A Markdown table, one row per method and one column per pool: ``field`` over seeds.

  The last column is the mean wall time (compilation included) per run, over every pool.
  """
  rows = read_rows(path, tags)
  pools = sorted(dict.fromkeys(r["pool"] for r in rows),
                 key=lambda x: list(MAX_LEN).index(x) if x in MAX_LEN else len(MAX_LEN))
  methods = list(dict.fromkeys(m for m in BASELINES + ESTIMATORS if any(r["method"] == m
                                                                        for r in rows)))
  lines = ["| method | " + " | ".join(pools) + " | wall s (mean) |",
           "|---|" + "---|" * len(pools) + "---|"]
  for m in methods:
    cells = []
    for pool in pools:
      vals = [r[field] for r in rows if r["method"] == m and r["pool"] == pool]
      cells.append(spread(vals, 0 if field.endswith("_s") else 3) if vals else "not measured")
    wall = np.mean([r["wall_s"] for r in rows if r["method"] == m])
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {wall:.0f} |")
  return "\n".join(lines)


def changes_table(path: pathlib.Path, tags: list[str] | None, ref_tag: str = "main") -> str:
  """A Markdown table, one line per row of ``tags``: what differs from the ``ref_tag`` settings.

  The reference is the settings and ``kw`` of the first ``ref_tag`` row of the same pool (the
  ``main`` rows share them; a pool without one takes the first pool's); ``kw`` fields the method
  does not have are not listed, nor settings added later at their default (``ADDED_SETTINGS``).
  """
  all_rows = read_rows(path, None)
  ref = {}
  for r in all_rows:
    if r["tag"] == ref_tag:
      ref.setdefault(r["pool"], (r["settings"], r["kw"]))
  lines = ["| pool | method | seed | changed | AUROC | best AUROC (step) | precision | median step s "
           "| wall s | load | notes |", "|" + "---|" * 11]
  for r in read_rows(path, tags):
    s_ref, kw_ref = ref.get(r["pool"]) or next(iter(ref.values()), ({}, {}))
    ch = [f"{k}={v}" for k, v in r["settings"].items() if s_ref.get(k, ADDED_SETTINGS.get(k)) != v]
    if r["method"] in ESTIMATORS:
      fields = {f.name for f in dataclasses.fields(hypergrad.ESTIMATORS[r["method"]])}
    else:
      fields = ({"iters", "damping"} if r["method"] == "influence_alignment" else
                {"fit_optimizer", "fit_lr", "fit_steps"} if r["method"] == "fit_alignment" else set())
    ch += [f"{k}={v}" for k, v in r["kw"].items() if k in fields and kw_ref.get(k) != v]
    best = "-"
    if "curve" in r:
      step = next(c[0] for c in r["curve"] if c[2] == r["best_auroc"])
      best = f"{r['best_auroc']:.3f} ({step})"
    notes = ""
    if "residuals" in r:
      notes = (f"CG residual {r['residuals'][-1]} after {len(r['residuals'])} iterations, "
               f"damping {r['damping']}")
      if r.get("negative_curvature_at"):
        notes += f", negative curvature at iteration {r['negative_curvature_at']}"
    if "exact_ratio_auroc" in r:
      notes = (f"exact ratio {r['exact_ratio_auroc']:.3f}, corr {r['corr_with_exact']:.2f}, "
               f"raw loss at fit {r['fit_loss_auroc']:.3f}")
    lines.append(f"| {r['pool']} | {r['method']} | {r['seed']} | {', '.join(ch) or 'none'} | "
                 f"{r['auroc']:.3f} | {best} | {r['precision']:.3f} | "
                 f"{r.get('median_step_s') or '-'} | {r['wall_s']:.0f} | {r['load']:.1f} | {notes} |")
  return "\n".join(lines)


def parse_value(v: str):
  try:
    return json.loads(v)
  except json.JSONDecodeError:
    return v


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pools", default="safety_matched")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--methods", default="baselines," + ",".join(ESTIMATORS))
  ap.add_argument("--set", action="append", default=[], help="setting=value (see DEFAULTS)")
  ap.add_argument("--kw", action="append", default=[], help="estimator field=value")
  ap.add_argument("--out", default="docs/study/rows.jsonl")
  ap.add_argument("--tag", default="default")
  ap.add_argument("--cache", default="/tmp/bilevel_jax_study_cache",
                  help="directory for the frozen-prefix hidden states ('' to recompute)")
  ap.add_argument("--summarize", action="store_true", help="print the table of --out and exit")
  ap.add_argument("--compact", default="",
                  help="with --summarize: a method x pool table of this row field (auroc, "
                       "precision, best_auroc) instead")
  ap.add_argument("--changes", action="store_true",
                  help="with --summarize: one line per row with what differs from the main rows")
  a = ap.parse_args(argv)
  if a.summarize:
    tags = a.tag.split(",") if a.tag != "all" else None
    if a.changes:
      print(changes_table(pathlib.Path(a.out), tags))
    else:
      print(compact(pathlib.Path(a.out), tags, a.compact) if a.compact else
            summarize(pathlib.Path(a.out), tags))
    return
  s = dict(DEFAULTS)
  for item in a.set:
    k, v = item.split("=", 1)
    if k not in s:
      raise SystemExit(f"--set: unknown setting {k!r}; valid: {sorted(s)}")
    s[k] = parse_value(v)
  kw = {k: parse_value(v) for k, v in (item.split("=", 1) for item in a.kw)}
  methods = []
  for mt in a.methods.split(","):
    methods += list(BASELINES) if mt == "baselines" else [mt]
  bad = [mt for mt in methods if mt not in BASELINES + ESTIMATORS + DIAGNOSTICS]
  if bad:
    raise SystemExit(f"--methods: unknown {bad}; valid: baselines, "
                     f"{BASELINES + ESTIMATORS + DIAGNOSTICS}")
  from bilevel_jax.model import load
  loader = lambda: load.load_smollm2()  # noqa: E731
  for pool_name in a.pools.split(","):
    study(pool_name, [int(x) for x in a.seeds.split(",")], methods, s, kw, pathlib.Path(a.out),
          a.tag, loader, pool_data, device=jax.devices()[0].device_kind,
          cache_dir=pathlib.Path(a.cache) if a.cache else None)


if __name__ == "__main__":
  main()
