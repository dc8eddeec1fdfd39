"""The ``run`` chain: BDS selection, fine-tuning on the selection and on the baselines, evaluation and
the report, each step resumable (see :mod:`bilevel_jax.loops`).

Methods (``config.run.methods``):

* ``bds``: weights from the configured estimator, the selection rule, fine-tune on the kept pairs
  (``soft``: on all pairs weighted by ``p_i``).
* ``one_step``: the same with the ``one_step`` (gradient alignment) estimator.
* ``bmo``: BDS then online self-refinement (``bilevel_jax.refine``).
* ``full_sft``: the whole pool, unweighted.  ``direct_mixing``: pool plus validation, unweighted
  (the paper's main baseline).  ``val_only``: the validation set alone.
* ``random_selection``: a seeded random subset of the same size as BDS's selection.
* ``loss_filter``: the ``keep_fraction`` of pairs with the lowest base-model loss.

Selection quality is reported for every weight-producing method next to the cheap signals
(``config.run.selection_scores``): response length (reported as ``max(a, 1 - a)``, since it has no
natural direction: that is the confound's separability), base-model loss (lower loss kept), loss
change under the direct-mixing model (larger decrease kept) and random scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from bilevel_jax import evaluate as eval_lib
from bilevel_jax import loops
from bilevel_jax import report as report_lib
from bilevel_jax.core import weights as wts

STAGES = ("select", "finetune", "evaluate", "report")


def _pool_losses(ctx: loops.Context, trainable) -> np.ndarray:
  batches = loops.fixed_batches(ctx.pool_arrays, ctx.cfg.data.val_batch_size)
  return eval_lib.per_example_losses(ctx.loss_fn, trainable, ctx.frozen, batches)


def _quality_rows(ctx: loops.Context, selections: dict, seeds: dict, extra_scores: dict) -> dict:
  is_bad = np.asarray([r.is_bad for r in ctx.pool])
  out = {}
  for name, sel in selections.items():
    q = eval_lib.selection_quality(sel["weights"], is_bad)
    runs = [eval_lib.selection_quality(s["weights"], is_bad)["auroc"] for s in seeds.get(name, [])]
    if runs:
      aucs = [q["auroc"], *runs]
      q = {**q, "auroc": float(np.mean(aucs)), "auroc_std": float(np.std(aucs)), "seeds": len(aucs)}
    out[name] = q
  for name, (scores, note) in extra_scores.items():
    q = eval_lib.selection_quality(scores, is_bad)
    out[name] = {**q, "note": note}
  return out


def _cheap_scores(ctx: loops.Context, base_losses: np.ndarray) -> dict:
  cfg = ctx.cfg
  out = {}
  if "length" in cfg.run.selection_scores:
    lengths = eval_lib.response_lengths(ctx.tokenizer, [r.response for r in ctx.pool])
    is_bad = np.asarray([r.is_bad for r in ctx.pool])
    a = eval_lib.auroc(lengths, ~is_bad)
    out["length"] = (lengths if a >= 0.5 else -lengths, "response tokens, best sign (confound)")
  if "base_loss" in cfg.run.selection_scores:
    out["base_loss"] = (-base_losses, "base-model loss, lower kept")
  if "random" in cfg.run.selection_scores:
    out["random"] = (np.random.default_rng(cfg.seed).random(len(ctx.pool)), "uniform random")
  return out


def _method_arrays(ctx: loops.Context, method: str, sel: dict, base_losses: np.ndarray) -> dict:
  cfg, n = ctx.cfg, len(ctx.pool)
  wv = bool(cfg.finetune.with_validation)  # direct_mixing and val_only hold it anyway
  bds_keep = int(sel["bds"]["keep"].sum()) if "bds" in sel else wts.top_p_count(
      n, cfg.select.keep_fraction)
  if method in ("bds", "one_step"):
    s = sel[method]
    rows = np.arange(n) if cfg.select.rule == "soft" else np.flatnonzero(s["keep"])
    w = s["train_weights"][rows]
    return loops.train_arrays(ctx, rows, w, with_val=wv)
  if method == "full_sft":
    return loops.train_arrays(ctx, np.arange(n), with_val=wv)
  if method == "direct_mixing":
    return loops.train_arrays(ctx, np.arange(n), with_val=True)
  if method == "val_only":
    return loops.train_arrays(ctx, np.zeros((0,), int), with_val=True)
  if method == "random_selection":
    rng = np.random.default_rng(cfg.seed + 17)
    return loops.train_arrays(ctx, np.sort(rng.choice(n, bds_keep, replace=False)), with_val=wv)
  if method == "loss_filter":
    k = wts.top_p_count(n, cfg.select.keep_fraction)
    return loops.train_arrays(ctx, np.sort(np.argsort(base_losses, kind="stable")[:k]), with_val=wv)
  raise ValueError(f"method {method!r} has no training set here")


def _evaluate(ctx: loops.Context, method: str, trainable) -> dict:
  pdir = ctx.workdir / f"finetune_{method}"
  cached = pdir / "eval.json"
  if cached.exists():
    return json.loads(cached.read_text())
  cfg = ctx.cfg
  e = cfg.evaluate
  test = ctx.test
  harmful = [r.question for r in test if r.label == "harmful"][:e.n_harmful or None]
  benign = [r.question for r in test if r.label == "good" and "answer" not in r.meta]
  benign = benign[:e.n_benign or None] if any(r.label == "harmful" for r in test) else []
  gsm = [(r.question, "#### " + str(r.meta["answer"])) for r in test if "answer" in r.meta
         and cfg.data.pool in ("math", "toy")][:e.n_gsm8k or None] if e.n_gsm8k else []
  val_batches = loops.fixed_batches(ctx.val_arrays, cfg.data.val_batch_size)
  metrics, answers = eval_lib.evaluate_model(
      ctx.spec, trainable, ctx.frozen, ctx.model_cfg, ctx.tokenizer, loss_fn=ctx.loss_fn,
      val_batches=val_batches, harmful_prompts=harmful, benign_prompts=benign, gsm8k=gsm,
      max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, generate=e.generate)
  with_resp = [r for r in test if r.response]
  if with_resp:
    arrays = loops.encode_records(with_resp, ctx.tokenizer, cfg.data.max_len)
    metrics["test_loss"] = eval_lib.validation_loss(
        ctx.loss_fn, trainable, ctx.frozen, loops.fixed_batches(arrays, cfg.data.val_batch_size))
  if ctx.is_chief:
    pdir.mkdir(parents=True, exist_ok=True)
    for name, texts in answers.items():  # Answers to harmful prompts: files only, never printed.
      with open(pdir / f"answers_{name}.jsonl", "w") as f:
        for t in texts:
          f.write(json.dumps({"answer": t[:2000]}, ensure_ascii=False) + "\n")
    cached.write_text(json.dumps(metrics, indent=1))
  return metrics


def _run_bmo(ctx: loops.Context, bds: dict) -> dict:
  """BDS then online self-refinement (``bilevel_jax.refine``), as one phase ``finetune_bmo``.

  The refine loop has no mid-phase checkpoints: a killed run redoes this phase from its start
  (the phases before it are kept). Its final params are checkpointed like a fine-tune's.
  """
  from bilevel_jax import checkpoint as ckpt_lib
  from bilevel_jax import metrics as metrics_lib
  from bilevel_jax import refine as refine_lib
  from bilevel_jax import sampling
  from bilevel_jax.core import sft
  cfg, r = ctx.cfg, ctx.cfg.refine
  pdir = ctx.workdir / "finetune_bmo"
  opt = sft.sgd_or_adam(cfg.finetune.optimizer, cfg.finetune.lr,
                        weight_decay=cfg.finetune.weight_decay)
  template = {"params": ctx.trainable}
  with ckpt_lib.Checkpointer(pdir / "ckpt", fingerprint=ctx.fingerprint) as c:
    done = (pdir / "result.json").exists() and c.restore_latest(template)
  if done:
    result = json.loads((pdir / "result.json").read_text())
    return {**result, "trainable": done.state["params"]}
  if r.weight_variant != "token":
    raise NotImplementedError("refine.weight_variant='response' needs a reference model; the run "
                              "chain wires the token-level ratio only (use bilevel_jax.refine)")
  tok = ctx.tokenizer
  rcfg = refine_lib.RefineConfig(
      selection=r.choose, share=r.share, dynamic=r.dynamic, num_generations=r.responses_per_question,
      regen_every=r.period, warmup_steps=r.warmup, num_steps=r.steps,
      batch_size=cfg.finetune.batch_size, max_len=cfg.data.max_len, weighting="token", clip=r.clip,
      sampler=sampling.SamplerConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     top_k=r.top_k, top_p=r.top_p, stop_ids=tuple(tok.stop_ids),
                                     pad_id=int(tok.pad_id), max_batch=cfg.evaluate.batch_size),
      seed=cfg.seed)
  records = [{"question": p.question, "response": p.response, "label": p.label, "index": i}
             for i, p in enumerate(ctx.pool)]
  rounds = []
  with metrics_lib.MetricsLogger(pdir, enabled=ctx.is_chief,
                                 tensorboard=cfg.metrics.tensorboard) as log:
    res = refine_lib.refine(
        records, tok, ctx.model_cfg, ctx.spec, jax.tree.map(lambda x: x.copy(), ctx.trainable),
        ctx.frozen, opt, rcfg, jax.random.fold_in(jax.random.key(cfg.seed), 5),
        weights=bds["weights"], keep=bds["keep"], on_round=rounds.append,
        on_step=lambda t, m: log.log(t + 1, m))
  val_batches = loops.fixed_batches(ctx.val_arrays, cfg.data.val_batch_size)
  curve = [[0, eval_lib.validation_loss(ctx.loss_fn, ctx.trainable, ctx.frozen, val_batches)],
           [r.steps, eval_lib.validation_loss(ctx.loss_fn, res.trainable, ctx.frozen, val_batches)]]
  result = {"curve": curve, "n_train": int(bds["keep"].sum()), "rounds": [
      {k: v for k, v in rd.items() if k != "regenerated_index"} for rd in rounds]}
  if ctx.is_chief:
    with ckpt_lib.Checkpointer(pdir / "ckpt", fingerprint=ctx.fingerprint) as c:
      c.save(r.steps, {"params": res.trainable}, force=True)
    with open(pdir / "generations.jsonl", "w") as f:  # May be harmful: files only.
      for i, texts in res.generations.items():
        f.write(json.dumps({"index": int(i), "texts": [t[:2000] for t in texts]}) + "\n")
    (pdir / "result.json").write_text(json.dumps(result, indent=1, default=float))
  return {**result, "trainable": res.trainable}


def run(cfg, until: str = "report", train: bool = True, methods=None) -> Path:
  """Runs the stages of ``cfg`` up to ``until`` (``select``, ``finetune``, ``evaluate``, ``report``).

  Args:
    cfg: a validated config.
    until: the last stage to run.
    train: False for ``report`` alone: use finished phases only, train nothing.
    methods: the methods to run instead of ``cfg.run.methods``.
  Returns:
    The run directory.
  """
  if until not in STAGES:
    raise ValueError(f"until must be one of {STAGES}, got {until!r}")
  stage = STAGES.index(until)
  ctx = loops.prepare(cfg)
  methods = list(methods or cfg.run.methods)
  sel, seeds = {}, {}
  done = lambda phase: (ctx.workdir / phase / "result.json").exists()  # noqa: E731
  need_bds = any(m in methods for m in ("bds", "bmo", "random_selection"))
  if need_bds and (train or done("select_bds")):
    sel["bds"] = loops.run_select(ctx, "bds")
    seeds["bds"] = [loops.run_select(ctx, "bds", seed_offset=s)
                    for s in range(1, cfg.run.selection_seeds)
                    if train or done(f"select_bds_s{s}")]
  if "one_step" in methods and (train or done("select_one_step")):
    sel["one_step"] = loops.run_select(ctx, "one_step", estimator="one_step")
  if stage == 0:
    return ctx.workdir
  base_losses = _pool_losses(ctx, ctx.trainable)
  trained, evals, curves = {}, {}, {}
  for m in methods:
    if not train and not done(f"finetune_{m}"):
      continue
    if m == "bmo":
      out = _run_bmo(ctx, sel["bds"])
      trained[m], curves[m] = out["trainable"], [tuple(x) for x in out["curve"]]
      evals[m] = {"n_train": out["n_train"]}
      if out["rounds"]:
        last = out["rounds"][-1]
        evals[m].update({k: last[k] for k in ("harmful_questions_in_training",
                                               "refusal_rate_regenerated_harmful") if k in last})
      continue
    if (m in ("bds", "random_selection") and "bds" not in sel) or (m == "one_step"
                                                                   and m not in sel):
      continue
    arrays = _method_arrays(ctx, m, sel, base_losses)
    out = loops.run_finetune(ctx, m, arrays)
    trained[m] = out["trainable"]
    curves[m] = [tuple(x) for x in out["curve"]]
    evals[m] = {"n_train": out["n_train"]}
    if m == "bds" and "bmo" in methods:
      # Next to BMO: the harmful questions BDS alone trains on (with their original answers).
      harmful = np.asarray([r.label == "harmful" for r in ctx.pool])
      if harmful.any():
        evals[m]["harmful_questions_in_training"] = float(
            (np.asarray(sel["bds"]["keep"], bool) & harmful).sum() / harmful.sum())
  if stage >= 2:
    for m, params in trained.items():
      evals[m].update(_evaluate(ctx, m, params))
  extra = _cheap_scores(ctx, base_losses)
  if "loss_change" in cfg.run.selection_scores and "direct_mixing" in trained:
    after = _pool_losses(ctx, trained["direct_mixing"])
    extra["loss_change"] = (base_losses - after, "loss decrease under direct mixing, larger kept")
  if stage < 3 or not ctx.is_chief:
    return ctx.workdir
  quality = _quality_rows(ctx, sel, seeds, extra)
  data = report_lib.ReportData(
      name=cfg.name, config=json.loads(cfg.to_json()),
      pool=[{"example_id": r.example_id, "source": r.source, "label": r.label,
             "question": r.question, "response": r.response} for r in ctx.pool],
      weights={k: v["weights"] for k, v in sel.items()},
      selected={k: v["keep"] for k, v in sel.items()},
      trajectories={k: v["history"] for k, v in sel.items()},
      trajectory_steps={k: [int(s) for s in v["history_steps"]] for k, v in sel.items()},
      selection_quality=quality, curves=curves, eval_metrics=evals,
      data_summary=ctx.data_summary,
      notes=[f"model: {cfg.model.source}, trainable: {cfg.model.trainable.kind}",
             f"selection: estimator {cfg.select.estimator}, rule {cfg.select.rule} "
             f"(keep_fraction {cfg.select.keep_fraction})",
             "validation loss is the upper-level objective on the validation set, which "
             "direct_mixing and val_only also train on; test_loss is on held-out test pairs",
             "refusal: phrase list 'default' of bilevel_jax/refusal.py, greedy answers",
             f"devices: {jax.devices()[0].platform} x{jax.device_count()}"])
  report_lib.write_report(data, ctx.workdir / "report")
  return ctx.workdir
