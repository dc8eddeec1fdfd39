"""Token-level pair scores: does a per-token reduction find what a per-pair mean misses?

Every per-pair score of the selection study (base-model loss, the ``likelihood_ratio`` score) is a
*mean* over the response tokens, so a corruption that changes one token (``math``'s wrong final
number, ``quality``'s ``wrong_number``) or one transition (``swap``, ``shuffle_sentences``) is diluted
by the response length. This diagnostic scores the pairs of a pool draw with three per-token
quantities, each reduced four ways, and prints (and appends to ``--out``) the AUROC of each
(good pairs positive, higher score = kept):

* ``base``: the base model's log-probability of each response token;
* ``fit``: the same under the copy fitted on validation (``likelihood_ratio``'s fit: Adam, lr 1e-4,
  ``--fit-steps`` steps over the validation batches in order);
* ``lr``: ``fit - base`` per token (the ``likelihood_ratio`` score before its mean);

reduced by ``mean`` (the study's scores: ``lr_mean`` equals the ``likelihood_ratio`` row),
``min`` (the most surprising token), ``bottom3`` (mean of the 3 lowest) and ``last12`` (mean of the
last 12 response tokens, where ``math``'s final answer is). Same pools, subsample, prefix cache and
trainable set (last 4 layers) as ``scripts/selection_study.py``'s ``main`` rows.

  .venv/bin/python scripts/token_scores.py --pools math,quality,safety_matched --seeds 0 \
      --out docs/study/tokens.jsonl       # --fit-steps 0: base-model reductions only
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import selection_study as ss  # noqa: E402
from bilevel_jax.core import sft  # noqa: E402
from bilevel_jax.data import stats  # noqa: E402
from bilevel_jax.model import lora as lora_lib  # noqa: E402

LAST = 12


def reductions(x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """Per-pair reductions of a per-token score ``x`` [n, T] (higher = better) over ``mask``."""
  m = mask > 0
  low = np.sort(np.where(m, x, np.inf), axis=1)
  last = np.zeros_like(m)
  for i in range(len(m)):
    last[i, np.flatnonzero(m[i])[-LAST:]] = True
  return {"mean": (x * m).sum(1) / m.sum(1), "min": low[:, 0], "bottom3": low[:, :3].mean(1),
          "last12": (x * last).sum(1) / last.sum(1)}


def token_logprobs(m: ss.StudyModel, params, arrays: dict, batch_size: int) -> np.ndarray:
  """[n, T] log-probability of every target token under ``params``."""
  logits_fn = lora_lib.make_logits_fn(m.spec, m.cfg)

  @jax.jit
  def lp(tr, fz, b):
    logp = jax.nn.log_softmax(logits_fn(tr, fz, b).astype(jnp.float32), -1)
    return jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]

  return np.concatenate([np.asarray(lp(params, m.frozen, b))[b["index"] >= 0]
                         for b in ss.batches_of(arrays, batch_size)])


def score_pool(pool: str, seed: int, fit_steps: int, model, s: dict) -> dict:
  cfg, params, tok = model
  t0 = time.time()
  data = ss.pool_data(pool, seed, s, tok)
  m = ss.make_model(cfg, params, s, seed)
  pa, va = ss.cached_prefix(m, data, pathlib.Path("/tmp/bilevel_jax_study_cache"), (pool, seed, s))
  good = (~data.is_bad).astype(int)
  base = token_logprobs(m, m.trainable, pa, s["batch_size"])
  per_token = {"base": base}
  if fit_steps:
    fitted = ss.fit_on_validation(m, va, s["val_batch_size"], sft.sgd_or_adam("adam", 1e-4),
                                  fit_steps, mask_padding=True)
    fit = token_logprobs(m, fitted, pa, s["batch_size"])
    per_token.update(fit=fit, lr=fit - base)
  row = {"pool": pool, "seed": seed, "n": int(len(good)), "n_bad": int(data.is_bad.sum()),
         "fit_steps": fit_steps}
  for name, x in per_token.items():
    for red, v in reductions(x, pa["loss_mask"]).items():
      row[f"{name}_{red}"] = round(stats.auroc(v, good), 3)
  row.update(secs=round(time.time() - t0, 1), load=os.getloadavg()[0])
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--pools", default="math,quality,safety_matched")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--fit-steps", type=int, default=30)
  ap.add_argument("--out", default="", help="append one JSON row per (pool, seed) here")
  a = ap.parse_args(argv)
  s = dict(ss.DEFAULTS)
  s.update(pool_size=96, sft_steps=20)  # the study's `main` settings
  from bilevel_jax.model import load
  model = load.load_smollm2()
  for pool in a.pools.split(","):
    for seed in (int(x) for x in a.seeds.split(",")):
      row = score_pool(pool, seed, a.fit_steps, model, s)
      print(json.dumps(row), flush=True)
      if a.out:
        with open(a.out, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
