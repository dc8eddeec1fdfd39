"""The select and fine-tune drivers behind the CLI: data and model set-up, checkpoints, metrics,
progress, NaN guard and exact resume.

A run lives in one directory (``config.workdir``, default ``runs/<name>``)::

    config.json              the resolved config
    data_summary.json        pool counts and confound AUROCs
    select_<method>/         one selection phase: ckpt/, metrics.jsonl, tb/, result.json, *.npy
    finetune_<method>/       one fine-tuning phase: ckpt/, metrics.jsonl, tb/, result.json
    report/                  see bilevel_jax.report

Every phase checkpoints its whole state (model or selection state, optimizer states, logits, the
grain iterator state, the loop step) every ``checkpoint.every`` steps and at its end, and writes
``result.json`` when it is done. Running the same command again skips finished phases and resumes an
unfinished one from its latest complete checkpoint, so a killed run ends bit-identical to one that
never stopped (``tests/test_resume.py``). Randomness: step ``t`` of a phase uses
``fold_in(key(seed), t)``; the data order is a seeded grain shuffle whose state is checkpointed.

Devices: when ``config.mesh.shape`` spans more than one device (or ``mesh.distributed`` is set),
:func:`prepare` builds the mesh once (``parallel.run_layout``) and the select and fine-tune phases
run their steps ``jax.jit``-ed with explicit shardings on it: params and optimizer state by the
logical rules (FSDP by default), the weight logits per ``mesh.weights``, batch rows over
``data`` x ``fsdp`` (each process feeds its own rows, ``distributed.put_rows``). Their checkpoints
then hold global arrays, which restore on any mesh. What a phase returns (logits, trained params)
is copied back to one device, so evaluation, BMO refinement and the report run unsharded, on every
process alike. A mesh of one device runs exactly the single-device programs. SIGTERM (a preemption
notice) makes every process stop at one agreed step, write a checkpoint there and exit with status
143 (:class:`~bilevel_jax.distributed.Preempted`); the same command resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax import checkpoint as ckpt_lib
from bilevel_jax import config as config_lib
from bilevel_jax import distributed
from bilevel_jax import metrics as metrics_lib
from bilevel_jax import parallel
from bilevel_jax import sharding as sharding_lib
from bilevel_jax.core import hypergrad, sft
from bilevel_jax.core import select as select_lib
from bilevel_jax.core import weights as wts
from bilevel_jax.data import records as records_lib
from bilevel_jax.model import llama
from bilevel_jax.model import lora as lora_lib

Params = Any
log = logging.getLogger(__name__)
# Test hook: seconds to sleep after every step, so a test can kill a tiny run at random points.
_STEP_DELAY = float(os.environ.get("BILEVEL_JAX_DEBUG_STEP_DELAY", "0") or 0)
_NUMERIC = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "index", "weight",
            "prefix_hidden")


# ----------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Context:
  """Everything the phases share; built once by :func:`prepare`."""

  cfg: Any
  workdir: Path
  model_cfg: llama.LlamaConfig
  spec: lora_lib.TrainableSpec
  tokenizer: Any
  trainable: Params  # The base model's trainable part (never donated; phases copy it).
  frozen: Params
  pool: list  # Records, weight-vector order.
  val: list
  test: list
  pool_arrays: dict
  val_arrays: dict
  fingerprint: str
  loss_fn: Callable
  data_summary: dict
  is_chief: bool = True
  # The mesh and rules the phases train on; None: one device, the plain jitted steps.
  layout: Any = None
  # Jitted steps shared by the phases of one run (same shapes: compiled once, not per method).
  compiled: dict = dataclasses.field(default_factory=dict)


def toy_pool(n: int = 32, seed: int = 0) -> dict[str, list]:
  """A tiny synthetic pool for tests and smoke runs: sums answered right (good) or wrong (bad).

  Validation and test hold further right answers. No package data is needed.
  """
  rng = np.random.default_rng(seed)

  def rec(i, split, wrong):
    a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    ans = a + b + (int(rng.integers(1, 9)) if wrong else 0)
    return records_lib.Record(example_id=f"toy-{split}-{i:04d}", question=f"What is {a}+{b}?",
                              response=f"{a}+{b} is {ans}.", source="toy_right" if not wrong
                              else "toy_wrong", label="low_quality" if wrong else "good",
                              split=split, meta={"answer": str(ans)})

  return {"pool": [rec(i, "pool", i % 2 == 1) for i in range(n)],
          "validation": [rec(i, "validation", False) for i in range(max(4, n // 4))],
          "test": [rec(i, "test", False) for i in range(max(4, n // 4))]}


def load_records(cfg) -> tuple[dict[str, list], dict]:
  """The pool's splits (records) and its data summary."""
  if cfg.data.pool == "toy":
    splits = toy_pool(cfg.data.pool_size or 32, cfg.data.shuffle_seed)
    return splits, {"pool": "toy", "counts": {k: len(v) for k, v in splits.items()}}
  from bilevel_jax.data import sources, summary
  pool = sources.build_pool(cfg.data.pool)
  splits = {k: list(v) for k, v in pool.splits.items()}
  rng = np.random.default_rng(cfg.data.shuffle_seed)
  for split, size in (("pool", cfg.data.pool_size), ("validation", cfg.data.val_size),
                      ("test", cfg.data.test_size)):
    if size and size < len(splits[split]):
      keep = np.sort(rng.choice(len(splits[split]), size, replace=False))
      splits[split] = [splits[split][i] for i in keep]
  return splits, summary.describe(pool)


def encode_records(records, tokenizer, max_len: int) -> dict[str, np.ndarray]:
  """Per-example arrays in the batch format of ``bilevel_jax.core.sft``, tokenized once.

  Uses the data pipeline's own templating and truncation (``bilevel_jax.data.pipeline``: the prompt
  is kept and the response cut); ``index`` is the row in ``records`` order and ``weight`` is 1.
  Keeping every example as arrays lets a phase gather any subset, and lets ``last_n_layers`` runs
  compute the frozen prefix once per example.
  """
  from bilevel_jax.data import pipeline
  examples = [pipeline.tokenize_example(
      {"question": r.question, "response": r.response, "index": i, "example_id": r.example_id},
      tokenizer, max_len) for i, r in enumerate(records)]
  batch = pipeline.collate(examples, len(examples), max_len, tokenizer.pad_id)
  out = pipeline.device_batch(batch)
  out["weight"] = np.ones(len(records), np.float32)
  out["truncated"] = batch["truncated"]
  return out


def _add_prefix(spec, model_cfg, frozen, arrays: dict, chunk: int = 16) -> dict:
  """For ``last_n_layers``: the frozen prefix's hidden states, computed once per example."""
  if spec.kind != "last_n_layers":
    return arrays
  fn = jax.jit(lambda fr, b: lora_lib.precompute_prefix(spec, model_cfg, fr, b)["prefix_hidden"])
  n, outs = len(arrays["index"]), []
  for s in range(0, n, chunk):
    rows = np.arange(s, min(s + chunk, n))
    rows_p = np.concatenate([rows, np.full(chunk - len(rows), rows[0])])  # one compiled shape
    b = {k: jnp.asarray(arrays[k][rows_p]) for k in ("tokens", "positions", "segment_ids")}
    outs.append(np.asarray(fn(frozen, b))[:len(rows)])
  return {**arrays, "prefix_hidden": np.concatenate(outs)}


def build_model(cfg):
  """``(model_cfg, params, tokenizer, lora_or_None)`` from ``cfg.model``."""
  dtype = jnp.dtype(cfg.model.dtype)
  if cfg.model.source == "tiny":
    from bilevel_jax.model.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    mcfg = llama.tiny_config(vocab_size=tok.vocab_size, d_model=cfg.model.tiny_d_model,
                             n_layers=cfg.model.tiny_n_layers,
                             max_seq_len=max(256, cfg.data.max_len + cfg.evaluate.max_new_tokens + 64))
    params = llama.init_params(mcfg, jax.random.fold_in(jax.random.key(cfg.seed), 7), dtype)
  else:
    from bilevel_jax.model import load
    if cfg.model.source == "smollm2":
      mcfg, params, tok = load.load_smollm2(dtype)
    elif cfg.model.source == "gguf":
      mcfg, params, tok = load.load_gguf(cfg.model.path, dtype)
    else:
      mcfg, params, tok = load.load_safetensors_dir(cfg.model.path, dtype)
  return parallel.with_run_settings(mcfg, cfg.model), params, tok


def prepare(cfg) -> Context:
  """Loads the model and data of ``cfg``, tokenizes, and writes config.json and data_summary.json."""
  workdir = config_lib.workdir(cfg)
  is_chief = jax.process_index() == 0
  layout = parallel.run_layout(cfg)  # The one place a run builds its mesh.
  if layout is not None and is_chief:
    log.info("mesh %s over %d %s devices (%d processes), rules %s, weight logits %s",
             dict(layout.mesh.shape), layout.mesh.devices.size, jax.devices()[0].platform,
             jax.process_count(), cfg.mesh.rules, cfg.mesh.weights)
  mcfg, params, tok = build_model(cfg)
  spec = lora_lib.TrainableSpec.from_config(cfg.model.trainable)
  lora = (lora_lib.init_lora(mcfg, spec, jax.random.fold_in(jax.random.key(cfg.seed), 11))
          if spec.kind == "lora" else None)
  trainable, frozen = lora_lib.split(spec, mcfg, params, lora)
  splits, summary = load_records(cfg)
  pool = sorted(splits["pool"], key=lambda r: r.example_id)
  val, test = splits["validation"], splits["test"]
  pool_arrays = encode_records(pool, tok, cfg.data.max_len)
  val_arrays = encode_records([r for r in val if r.response], tok, cfg.data.max_len)
  summary = {**summary, "truncated": {"pool": int(pool_arrays["truncated"].sum()),
                                      "validation": int(val_arrays["truncated"].sum())}}
  pool_arrays = _add_prefix(spec, mcfg, frozen, pool_arrays)
  val_arrays = _add_prefix(spec, mcfg, frozen, val_arrays)
  fingerprint = ckpt_lib.dataset_fingerprint(
      [(r.example_id, r.question, r.response, r.label) for r in pool + val]
      + [{"max_len": cfg.data.max_len, "model": cfg.model.source, "seed": cfg.data.shuffle_seed}])
  if is_chief:
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save_json(cfg, workdir / "config.json")
    (workdir / "data_summary.json").write_text(json.dumps(summary, indent=1, default=str))
  loss_fn = sft.make_loss_fn(lora_lib.make_logits_fn(spec, mcfg))
  return Context(cfg, workdir, mcfg, spec, tok, trainable, frozen, pool, val, test, pool_arrays,
                 val_arrays, fingerprint, loss_fn, summary, is_chief, layout=layout)


def mesh_frozen(ctx: Context) -> Params:
  """The frozen params placed on the run's mesh (once per run; never donated)."""
  if "frozen@mesh" not in ctx.compiled:
    ctx.compiled["frozen@mesh"] = distributed.put(ctx.frozen, ctx.layout.params(ctx.frozen))
  return ctx.compiled["frozen@mesh"]


def to_local(tree: Any) -> Any:
  """Single-device copies of (possibly multi-host) mesh arrays, equal on every process."""
  return jax.tree.map(jnp.asarray, distributed.to_host(tree))


# ----------------------------------------------------------------------------- batches


def device_batch(arrays: dict, rows: np.ndarray) -> dict:
  """The numeric arrays of ``rows`` as one batch (rows < 0 become padding with ``index = -1``)."""
  take = np.where(rows >= 0, rows, 0)
  b = {k: arrays[k][take] for k in _NUMERIC if k in arrays}
  b["index"] = np.where(rows >= 0, b["index"], -1).astype(np.int32)
  return b


def fixed_batches(arrays: dict, batch_size: int) -> list[dict]:
  """Every example once, in order, in same-shaped batches (the last padded)."""
  n = len(arrays["index"])
  out = []
  for s in range(0, n, batch_size):
    rows = np.arange(s, min(s + batch_size, n))
    out.append(device_batch(arrays, np.concatenate([rows, -np.ones(batch_size - len(rows), int)])))
  return out


def row_stream(n: int, batch_size: int, seed: int):
  """A grain iterator over shuffled row ids, epoch after epoch; ``get_state``/``set_state`` resume it."""
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).batch(batch_size)
  return iter(ds)


# ----------------------------------------------------------------------------- the guarded loop


def guarded_step(step_fn: Callable, layout: Any = None, in_shardings: Any = None,
                 state_shardings: Any = None) -> Callable:
  """Jits ``step_fn(state, *args) -> (state, metrics)`` with the state donated, and skips the update
  (keeps the old state) when a metric is NaN or Inf; adds a ``finite`` metric.

  With a ``layout`` the step is jitted on its mesh with explicit ``in_shardings`` (state first) and
  out shardings ``(state_shardings, replicated metrics)``.
  """

  def guarded(state, *args):
    new, metrics = step_fn(state, *args)
    vals = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)
            if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)]
    ok = jnp.all(jnp.stack(vals)) if vals else jnp.bool_(True)
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    return new, {**metrics, "finite": ok}

  if layout is None:
    return jax.jit(guarded, donate_argnums=(0,))
  return sharding_lib.shard_jit(guarded, layout.mesh, in_shardings,
                                (state_shardings, layout.replicated()), donate_argnums=(0,))


def _host(metrics: dict) -> dict:
  return {k: (v.item() if np.ndim(v) == 0 else np.asarray(v).tolist())
          for k, v in jax.device_get(metrics).items()}


def run_phase(ctx: Context, phase: str, *, init_state: Any, step: Callable, num_steps: int,
              n_rows: int, batch_size: int, make_args: Callable[[np.ndarray, int], tuple],
              on_log: Callable[[int, Any, dict], dict] | None = None,
              extra_init: dict | None = None, draws: int = 1,
              shardings: tuple | None = None) -> tuple[Any, dict]:
  """Runs ``num_steps`` guarded steps with checkpoints, metrics and resume.

  Args:
    ctx: the run context.
    phase: directory name under the workdir.
    init_state: the fresh state pytree (also the restore template).
    step: ``step(state, *make_args(rows, t)) -> (state, metrics)``, pure (jitted here).
    num_steps: total steps of the phase.
    n_rows, batch_size: the grain row stream (rows of the phase's training arrays).
    make_args: builds the step's other arguments from the batch's row ids (a list of ``draws``
      arrays of ``batch_size`` rows) and the step number.
    on_log: ``on_log(t, state, metrics) -> more metrics`` after each step (e.g. a validation loss).
    extra_init: JSON bookkeeping carried through checkpoints (updated in place by ``on_log``).
    draws: batches taken from the stream per step.
    shardings: required when ``ctx.layout`` is set: ``(state_shardings, arg_shardings,
      batch_args)``, the shardings of the state and of each of ``make_args``'s values, and the
      positions of the batch arguments (their rows are fed per process; the others are values
      every process holds whole, or arrays already on the mesh).
  Returns:
    The final state (on the mesh when there is one) and the bookkeeping dict.
  Raises:
    distributed.Preempted: after a SIGTERM, once the checkpoint of the agreed step is written.
  """
  cfg = ctx.cfg
  pdir = ctx.workdir / phase
  checkpointer = ckpt_lib.Checkpointer(pdir / "ckpt", fingerprint=ctx.fingerprint,
                                       config=config_lib.to_dict(cfg),
                                       max_to_keep=cfg.checkpoint.max_to_keep,
                                       async_save=cfg.checkpoint.async_save)
  stream = row_stream(n_rows, batch_size, cfg.seed + cfg.data.shuffle_seed)
  extra = dict(extra_init or {}, nonfinite=0)
  layout = ctx.layout
  if layout is not None:
    state_sh, arg_sh, batch_args = shardings
    template = sharding_lib.abstract(init_state, state_sh)  # Restores straight onto the mesh.
  else:
    template = init_state
  restored = checkpointer.restore_latest(template)
  start, state = 0, init_state
  if restored is not None:
    start, state, extra = restored.step, restored.state, restored.extra
    stream.set_state(restored.data_state)
  elif layout is None:
    state = jax.tree.map(jnp.copy, init_state)  # The step donates its state; keep the caller's.
  else:
    state = distributed.put(init_state, state_sh)  # A sharded copy; the caller's stays.
  guard = metrics_lib.NonFiniteGuard(cfg.metrics.max_nonfinite, phase, extra.get("nonfinite", 0))
  key = ("step", phase.split("_")[0], getattr(step, "cache_key", id(step)))
  if key not in ctx.compiled:
    ctx.compiled[key] = (guarded_step(step) if layout is None else guarded_step(
        step, layout, (state_sh, *arg_sh), state_sh))
  jstep = ctx.compiled[key]

  def args_of(rows, t):
    args = make_args(rows, t)
    if layout is None:
      return args
    return tuple(distributed.put_rows(a, s) if i in batch_args else distributed.put(a, s)
                 for i, (a, s) in enumerate(zip(args, arg_sh)))

  bar = metrics_lib.progress(num_steps, phase, initial=start, interval=cfg.metrics.progress_interval,
                             enabled=ctx.is_chief)
  try:
    with metrics_lib.MetricsLogger(pdir, resume_step=start if restored else None,
                                   enabled=ctx.is_chief, tensorboard=cfg.metrics.tensorboard) as mlog, \
        distributed.PreemptionGuard() as preempt:
      for t in range(start, num_steps):
        rows = [np.asarray(next(stream)) for _ in range(draws)]
        state, m = jstep(state, *args_of(rows, t))
        m = _host(m)
        guard.update(t + 1, bool(m.pop("finite")))
        extra["nonfinite"] = guard.count
        if on_log is not None:
          m.update(on_log(t + 1, state, extra) or {})
        mlog.log(t + 1, m)
        bar.update(1)
        if _STEP_DELAY:
          time.sleep(_STEP_DELAY)
        saved = False
        if (t + 1) % cfg.checkpoint.every == 0 or t + 1 == num_steps:
          saved = checkpointer.save(t + 1, state, data_state=stream.get_state(), extra=extra,
                                    force=t + 1 == num_steps)
        # Every process asks at every step (a collective with several processes), so all of them
        # stop after the same step and write its checkpoint together.
        if preempt.should_stop(t + 1):
          if not saved:
            checkpointer.save(t + 1, state, data_state=stream.get_state(), extra=extra, force=True)
          stop = distributed.Preempted(
              f"{phase}: SIGTERM; stopped after step {t + 1} of {num_steps} and checkpointed it. "
              "Run the same command again to resume.")
          log.warning("%s", stop)  # SystemExit prints nothing itself.
          raise stop
  finally:  # Also on an error: finish the saves already started.
    bar.close()
    checkpointer.close()
  return state, extra


def _done(ctx: Context, pdir: Path) -> dict | None:
  """The result of a finished phase, or None; refuses one finished on other data."""
  f = pdir / "result.json"
  if not f.exists():
    return None
  result = json.loads(f.read_text())
  if result.get("fingerprint") != ctx.fingerprint:
    raise ckpt_lib.FingerprintMismatch(
        f"{f} was written for dataset fingerprint {result.get('fingerprint')}, but this run's "
        f"data has fingerprint {ctx.fingerprint}. Use a new workdir to start afresh.")
  return result


def _write_result(ctx: Context, pdir: Path, result: dict, arrays: dict[str, np.ndarray]) -> None:
  if not ctx.is_chief:
    return
  result = {**result, "fingerprint": ctx.fingerprint}
  pdir.mkdir(parents=True, exist_ok=True)
  for k, v in arrays.items():
    np.save(pdir / f"{k}.npy", np.asarray(v), allow_pickle=False)
  tmp = pdir / "result.json.tmp"
  tmp.write_text(json.dumps(result, indent=1))
  os.replace(tmp, pdir / "result.json")  # Written last: its presence marks the phase done.


def load_array(ctx: Context, phase: str, name: str) -> np.ndarray:
  return np.load(ctx.workdir / phase / f"{name}.npy", allow_pickle=False)


# ----------------------------------------------------------------------------- selection


def selection_problem(ctx: Context) -> hypergrad.Problem:
  s = ctx.cfg.select
  return hypergrad.Problem(ctx.loss_fn, sft.sgd_or_adam(s.inner_optimizer, s.inner_lr),
                           s.parametrization)


def run_select(ctx: Context, method: str = "bds", estimator: str | None = None,
               seed_offset: int = 0, **estimator_kwargs) -> dict:
  """Learns one weight per pool example; returns ``{"weights", "logits", "keep", "train_weights",
  "history", "history_steps"}`` (NumPy) and writes them under ``select_<method>[_s<seed>]/``."""
  cfg = ctx.cfg
  phase = f"select_{method}" + (f"_s{seed_offset}" if seed_offset else "")
  pdir = ctx.workdir / phase
  names = ("logits", "weights", "keep", "train_weights", "history", "history_steps")
  if _done(ctx, pdir) is not None:
    return {k: load_array(ctx, phase, k) for k in names}
  name = estimator or cfg.select.estimator
  kwargs = dict(cfg.select.estimator_kwargs.to_dict()) if estimator is None else {}
  kwargs.update(estimator_kwargs)
  est = hypergrad.make_estimator(name, **kwargs)
  problem = selection_problem(ctx)
  logit_opt = select_lib.make_logit_optimizer(est, cfg.select.logits_optimizer,
                                               cfg.select.logits_lr)
  n, bsz = len(ctx.pool), cfg.data.batch_size
  steps = cfg.select.steps
  if est.closed_form:  # Fitting steps, then at least one scoring pass over the whole pool.
    steps = est.warmup_steps + max(steps - est.warmup_steps, -(-n // bsz))
  hist_rows = steps + 1
  init = {"sel": select_lib.init_state(problem, est, ctx.trainable, n, logit_opt),
          "history": jnp.zeros((hist_rows, n), jnp.float32)}
  init["history"] = init["history"].at[0].set(problem.weights(init["sel"].logits))
  outer = select_lib.make_outer_step(problem, est, logit_opt, jit=False)
  val_batches = fixed_batches(ctx.val_arrays, cfg.data.val_batch_size)
  root = jax.random.key(cfg.seed + 1000 * seed_offset)
  frozen = ctx.frozen

  def step(state, frozen, batches, key, t):
    sel, metrics = outer(state["sel"], frozen, batches, key)
    hist = state["history"].at[t + 1].set(problem.weights(sel.logits).astype(jnp.float32))
    return {"sel": sel, "history": hist}, metrics

  step.cache_key = ("select", name, json.dumps(kwargs, sort_keys=True))

  layout, shardings = ctx.layout, None
  if layout is not None:
    frozen = mesh_frozen(ctx)
    example = select_lib.stack_batches([device_batch(ctx.pool_arrays, np.zeros(bsz, int))]
                                       * est.train_batches)
    rep = layout.replicated()
    shardings = ({"sel": parallel.select_state_shardings(layout, init["sel"]), "history": rep},
                 (layout.params(ctx.frozen),
                  {"train": parallel.fitting_batch(layout, example, row_axis=1),
                   "val": parallel.fitting_batch(layout, val_batches[0])}, rep, rep), {1})

  def make_args(rows, t):
    train = select_lib.stack_batches([device_batch(ctx.pool_arrays, r) for r in rows])
    return frozen, {"train": train, "val": val_batches[t % len(val_batches)]}, \
        jax.random.fold_in(root, t), jnp.int32(t)

  state, _ = run_phase(ctx, phase, init_state=init, step=step, num_steps=steps, n_rows=n,
                       batch_size=bsz, make_args=make_args, draws=est.train_batches,
                       shardings=shardings)
  # Host copies (all-gathered when the logits are spread over several hosts).
  logits, history = distributed.to_host((state["sel"].logits, state["history"]))
  p = np.asarray(problem.weights(jnp.asarray(logits)))
  sel = wts.select_examples(p, cfg.select.rule, fraction=cfg.select.keep_fraction)
  out = {"logits": logits, "weights": p, "keep": sel.keep, "train_weights": sel.train_weights,
         "history": history, "history_steps": np.arange(hist_rows)}
  _write_result(ctx, pdir, {"estimator": name, "kwargs": kwargs, "steps": steps,
                            "kept": int(sel.keep.sum()), "n": n}, out)
  return out


# ----------------------------------------------------------------------------- fine-tuning


def train_arrays(ctx: Context, pool_rows: np.ndarray, pool_weights: np.ndarray | None = None,
                 with_val: bool = False) -> dict:
  """The training set of a fine-tune: chosen pool rows (with weights), optionally plus validation."""
  parts = [{**device_batch(ctx.pool_arrays, np.asarray(pool_rows, int)),
            "weight": (np.ones(len(pool_rows), np.float32) if pool_weights is None
                       else np.asarray(pool_weights, np.float32))}]
  if with_val:
    rows = np.arange(len(ctx.val_arrays["index"]))
    parts.append({**device_batch(ctx.val_arrays, rows), "weight": np.ones(len(rows), np.float32)})
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  out["index"] = np.arange(len(out["weight"]), dtype=np.int32)
  return out


def run_finetune(ctx: Context, method: str, arrays: dict) -> dict:
  """Fine-tunes the base model on ``arrays`` (weighted by ``arrays["weight"]``).

  Returns ``{"trainable": params, "curve": [(step, val_loss)], "n_train": N}``; the trained params
  are in the phase's final checkpoint.
  """
  cfg = ctx.cfg
  phase = f"finetune_{method}"
  opt = sft.sgd_or_adam(cfg.finetune.optimizer, cfg.finetune.lr,
                        weight_decay=cfg.finetune.weight_decay)
  init = {"params": ctx.trainable, "opt_state": opt.init(ctx.trainable)}
  val_batches = fixed_batches(ctx.val_arrays, cfg.data.val_batch_size)
  layout, shardings, frozen = ctx.layout, None, ctx.frozen
  if layout is None:
    if "val_loss" not in ctx.compiled:
      ctx.compiled["val_loss"] = jax.jit(ctx.loss_fn)
  else:
    frozen = mesh_frozen(ctx)
    p_sh, f_sh = layout.params(ctx.trainable), layout.params(ctx.frozen)
    state_sh = {"params": p_sh, "opt_state": layout.opt_state(init["opt_state"], ctx.trainable,
                                                              p_sh)}
    example = device_batch(arrays, np.zeros(cfg.finetune.batch_size, int))
    shardings = (state_sh, (f_sh, parallel.fitting_batch(layout, example)), {1})
    vb_sh = parallel.fitting_batch(layout, val_batches[0])
    if "val_loss@mesh" not in ctx.compiled:  # Per-example losses, replicated: readable anywhere.
      ctx.compiled["val_loss@mesh"] = sharding_lib.shard_jit(
          ctx.loss_fn, layout.mesh, (p_sh, f_sh, vb_sh), layout.replicated())

  def mean_val(params) -> float:
    if layout is not None:
      params = distributed.put(params, p_sh)
    tot, cnt = 0.0, 0.0
    for b in val_batches:
      valid = np.asarray(b["index"]) >= 0
      if layout is None:
        losses = ctx.compiled["val_loss"](params, ctx.frozen, b)
      else:
        losses = ctx.compiled["val_loss@mesh"](params, frozen, distributed.put_rows(b, vb_sh))
      tot += float(np.asarray(losses)[valid].sum())
      cnt += valid.sum()
    return tot / max(cnt, 1)

  def step(state, frozen, batch):
    params, opt_state, m = sft.inner_step(ctx.loss_fn, opt, state["params"], frozen,
                                          state["opt_state"], batch, batch["weight"])
    return {"params": params, "opt_state": opt_state}, m

  step.cache_key = "finetune"  # Same optimizer and loss for every method: compile once.
  every = max(1, cfg.finetune.steps // 4)  # A few curve points: each costs a validation pass.

  def on_log(t, state, extra):
    if t % every == 0 or t == cfg.finetune.steps:
      v = mean_val(state["params"])
      extra.setdefault("curve", []).append([t, v])
      return {"val_loss": v}
    return {}

  done = _done(ctx, ctx.workdir / phase)
  if done is not None:  # Finished: read the trained params from its final checkpoint.
    template = init if layout is None else sharding_lib.abstract(init, shardings[0])
    with ckpt_lib.Checkpointer(ctx.workdir / phase / "ckpt", fingerprint=ctx.fingerprint) as c:
      restored = c.restore_latest(template)
    if restored is None or restored.step != cfg.finetune.steps:
      raise ckpt_lib.NoUsableCheckpoint(f"{ctx.workdir / phase}: finished, but its final "
                                        "checkpoint is missing; delete result.json to redo it")
    params = restored.state["params"]
    return {**done, "trainable": params if layout is None else to_local(params)}
  init_curve = [[0, mean_val(ctx.trainable)]]
  state, extra = run_phase(ctx, phase, init_state=init, step=step, num_steps=cfg.finetune.steps,
                           n_rows=len(arrays["weight"]), batch_size=cfg.finetune.batch_size,
                           make_args=lambda rows, t: (frozen, device_batch(arrays, rows[0])),
                           on_log=on_log, extra_init={"curve": init_curve}, shardings=shardings)
  result = {"curve": extra.get("curve", []), "n_train": int(len(arrays["weight"])),
            "nonfinite": extra.get("nonfinite", 0)}
  _write_result(ctx, ctx.workdir / phase, result, {})
  params = state["params"]
  return {**result, "trainable": params if layout is None else to_local(params)}
