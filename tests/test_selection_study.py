"""The selection-study driver has a pulse: tiny model, synthetic pool, every method, resume."""

import importlib.util
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from bilevel_jax.data.records import Record
from bilevel_jax.model import llama
from bilevel_jax.model.tokenizer import ByteTokenizer

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "selection_study.py"
_spec = importlib.util.spec_from_file_location("selection_study", _PATH)
study_mod = importlib.util.module_from_spec(_spec)
sys.modules["selection_study"] = study_mod  # dataclasses look their module up
_spec.loader.exec_module(study_mod)

GOOD = "no sorry"
BAD = "xq zv kw"


def _records(n: int) -> tuple[list, list]:
  pool = [Record(f"p{i:03d}", f"q{i}", GOOD if i % 2 else BAD, "syn",
                 "good" if i % 2 else "harmful") for i in range(n)]
  val = [Record(f"v{i:03d}", f"w{i}", GOOD, "syn", "good", split="validation") for i in range(8)]
  return pool, val


def _loaders():
  tok = ByteTokenizer()
  cfg = llama.tiny_config(vocab_size=tok.vocab_size, n_layers=2)
  params = llama.init_params(cfg, jax.random.key(0))

  def data_loader(name, seed, s, tokenizer):
    pool, val = _records(16)
    return study_mod.make_data(pool, val, s, tokenizer, seed, max_len=64)

  return (lambda: (cfg, params, tok)), data_loader


def _settings(**kw):
  s = dict(study_mod.DEFAULTS)
  s.update(n_layers=1, batch_size=4, val_batch_size=4, steps=3, sft_steps=2, inner_lr=0.05,
           pool_size=0)
  s.update(kw)
  return s


def test_every_method_writes_a_row_and_resumes(tmp_path):
  out = tmp_path / "rows.jsonl"
  model_loader, data_loader = _loaders()
  methods = list(study_mod.BASELINES) + ["likelihood_ratio", "unroll"]
  s, kw = _settings(), {"fit_steps": 2, "k": 2, "iters": 2, "damping": 0.1}
  rows = study_mod.study("syn", [0], methods, s, kw, out, "t", model_loader, data_loader)
  assert [r["method"] for r in rows] == methods
  for r in rows:
    assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["precision"] <= 1.0, r
    assert r["data"] == {"n_built": 16, "max_len": 64, "n_fit": 16, "n_val_prompt_too_long": 0, "n": 16,
                         "n_bad": 8, "n_val": 8}
    assert len(r["scores"]) == 16 and r["example_ids"][0] == "p000"
    assert r["by_kind"]["harmful"]["n"] == 8  # the only bad kind: every bad pair
    assert r["by_kind"]["harmful"]["auroc"] == round(r["auroc"], 4)
  by = {r["method"]: r for r in rows}
  # Both responses have 8 bytes: length (counted from the loss mask) carries no signal.
  assert by["length"]["auroc"] == 0.5 and by["length"]["separability"] == 0.5
  assert len(by["unroll"]["curve"]) == 3 and by["unroll"]["kwargs"] == {"k": 2}
  lr = by["likelihood_ratio"]
  assert lr["steps"] == 2 + 4 and len(lr["curve"]) == 6
  assert all(c[1] >= 0 for c in lr["curve"])
  # Resume: nothing left to do, nothing appended.
  again = study_mod.study("syn", [0], methods, s, kw, out, "t", model_loader, data_loader)
  assert again == [] and len(out.read_text().splitlines()) == len(methods)
  assert json.loads(out.read_text().splitlines()[0])["key"] == rows[0]["key"]


def test_likelihood_ratio_finds_the_template_on_an_easy_pool(tmp_path):
  """Validation shares the good pairs' response: a fitted copy must rank them first."""
  model_loader, data_loader = _loaders()
  s = _settings(inner_opt="adam", inner_lr=3e-3)
  rows = study_mod.study("syn", [0], ["likelihood_ratio", "random"], s, {"fit_steps": 15},
                         tmp_path / "r.jsonl", "t", model_loader, data_loader)
  lr, rnd = rows
  assert lr["auroc"] > 0.95 and lr["precision"] > 0.9, lr
  assert lr["time_to_090_s"] is not None and lr["steps_to_090"] == lr["steps"]


def test_estimator_settings_are_routed_by_field():
  s = _settings()
  kw = {"fit_steps": 2, "k": 4, "iters": 3, "lr": 0.5}
  for name in study_mod.ESTIMATORS:
    est, kwargs = study_mod.make_estimator(name, s, kw, n=16)
    assert est.name == name
    assert all(getattr(est, k) == v for k, v in kwargs.items())
  assert study_mod.make_estimator("unroll", s, kw, 16)[0].k == 4
  assert study_mod.make_estimator("penalty", s, kw, 16)[0].decay_every == 4  # one epoch
  assert study_mod.make_estimator("one_step", s, {}, 16)[0].lr == s["inner_lr"]


def test_quality_and_subsample():
  is_bad = np.array([True, False, True, False, False])
  q = study_mod.quality(np.array([0.0, 1.0, 0.1, 0.9, 0.8]), is_bad)
  assert q == {"auroc": 1.0, "precision": 1.0}
  q = study_mod.quality(np.array([1.0, 0.0, 0.9, 0.1, 0.2]), is_bad)
  assert q == {"auroc": 0.0, "precision": 0.0}
  big = np.array([True] * 30 + [False] * 70)
  rows = study_mod.subsample(list(range(100)), big, 20, seed=0)
  assert len(rows) == 20 == len(set(rows)) and big[rows].sum() == 6


def test_prefix_cache_is_reused_and_checked_against_tokens(tmp_path, monkeypatch):
  """The stored prefix equals a fresh one; a different pool under the same name is recomputed."""
  model_loader, data_loader = _loaders()
  cfg, params, tok = model_loader()
  s = _settings()
  data = data_loader("syn", 0, s, tok)
  m = study_mod.make_model(cfg, params, s, 0)
  key = ("syn", 0, s)
  pa, va = study_mod.cached_prefix(m, data, tmp_path, key)
  assert len(list(tmp_path.glob("syn-s0-*.npz"))) == 1
  calls = []
  real = study_mod.add_prefix
  monkeypatch.setattr(study_mod, "add_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
  pa2, va2 = study_mod.cached_prefix(m, data, tmp_path, key)
  assert calls == []  # read back, not recomputed
  np.testing.assert_array_equal(pa2["prefix_hidden"], pa["prefix_hidden"])
  np.testing.assert_array_equal(va2["prefix_hidden"], va["prefix_hidden"])
  # Same file name, other tokens (e.g. the pool builder changed): the stale file must not be used.
  data.pool_arrays = {**data.pool_arrays, "tokens": data.pool_arrays["tokens"][::-1].copy()}
  pa3, _ = study_mod.cached_prefix(m, data, tmp_path, key)
  assert calls == [1, 1]
  np.testing.assert_array_equal(pa3["prefix_hidden"], real(m, data.pool_arrays)["prefix_hidden"])


def test_compact_table_is_method_by_pool(tmp_path):
  out = tmp_path / "rows.jsonl"
  rows = [{"tag": "a", "pool": p, "method": m, "seed": s, "auroc": a, "wall_s": 10.0 * s}
          for p, m, s, a in [("x", "random", 0, 0.5), ("x", "likelihood_ratio", 0, 0.9),
                             ("x", "likelihood_ratio", 1, 0.7), ("y", "random", 0, 0.4)]]
  rows.append({**rows[0], "tag": "other", "auroc": 0.0})
  out.write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = study_mod.compact(out, ["a"]).splitlines()
  assert lines[0] == "| method | x | y | wall s (mean) |"
  assert lines[2] == "| random | 0.500 (n=1) | 0.400 (n=1) | 0 |"
  assert lines[3] == "| likelihood_ratio | 0.800 (0.70-0.90, n=2) | not measured | 5 |"
  assert len(lines) == 4  # the row of another tag is not counted


def test_by_kind_scores_each_corruption_against_all_good_pairs():
  recs = [Record(f"p{i}", "q", "r", "syn", "good") for i in range(2)]
  recs += [Record("b0", "q", "r", "syn", "low_quality", meta={"corruption": "swap"}),
           Record("b1", "q", "r", "syn", "low_quality", meta={"corruption": "wrong_number"})]
  data = study_mod.StudyData(recs, [], {}, {}, np.array([False, False, True, True]), {})
  out = study_mod.by_kind(np.array([1.0, 0.5, 0.0, 0.7]), data)
  assert out == {"swap": {"n": 1, "auroc": 1.0}, "wrong_number": {"n": 1, "auroc": 0.5}}


def test_fit_alignment_is_the_first_order_likelihood_ratio(tmp_path):
  """The diagnostic row: scores correlate with the exact ratio; ``baselines`` does not include it."""
  model_loader, data_loader = _loaders()
  assert "fit_alignment" not in study_mod.BASELINES
  kw = {"fit_steps": 2, "fit_optimizer": "sgd", "fit_lr": 1e-3}
  (row,) = study_mod.study("syn", [0], ["fit_alignment"], _settings(), kw, tmp_path / "r.jsonl",
                           "t", model_loader, data_loader)
  assert len(row["scores"]) == 16 and 0.0 <= row["exact_ratio_auroc"] <= 1.0
  assert row["corr_with_exact"] > 0.99, row  # a small step: first order is nearly exact
  assert 0.0 <= row["fit_loss_auroc"] <= 1.0


def test_pool_alignment_is_the_alignment_with_the_pool_gradient(tmp_path):
  """Scored against the pool instead of validation: equals the ``alignment`` baseline computed with
  the pool standing in for the validation set."""
  model_loader, data_loader = _loaders()
  (row,) = study_mod.study("syn", [0], ["pool_alignment"], _settings(), {}, tmp_path / "r.jsonl",
                           "t", model_loader, data_loader)
  cfg, params, tok = model_loader()
  s = _settings()
  data = data_loader("syn", 0, s, tok)
  m = study_mod.make_model(cfg, params, s, 0)
  pa = study_mod.cached_prefix(m, data, None, ("syn", 0, s))[0]
  expected = study_mod.alignment(m, pa, pa, s["batch_size"], s["batch_size"])
  np.testing.assert_allclose(row["scores"], expected, rtol=1e-4, atol=1e-5)


def test_changes_table_lists_what_differs_from_the_main_rows(tmp_path):
  out = tmp_path / "rows.jsonl"
  base = {"pool": "x", "seed": 0, "auroc": 0.5, "precision": 0.5, "wall_s": 3.0, "load": 1.0,
          "settings": {"steps": 40, "inner_opt": "sgd"}, "kw": {"fit_lr": 1e-4}}
  rows = [{**base, "tag": "main", "method": "penalty"},
          {**base, "tag": "abl", "method": "penalty", "settings": {"steps": 160, "inner_opt": "sgd"},
           "curve": [[1, 1.0, 0.5], [2, 2.0, 0.6]], "best_auroc": 0.6, "median_step_s": 1.0},
          {**base, "tag": "abl", "method": "likelihood_ratio", "kw": {"fit_lr": 1e-2}}]
  out.write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = study_mod.changes_table(out, ["abl"]).splitlines()
  assert len(lines) == 4
  assert "| penalty | 0 | steps=160 | 0.500 | 0.600 (2) |" in lines[2]
  assert "| likelihood_ratio | 0 | fit_lr=0.01 |" in lines[3]  # penalty has no fit_lr: not listed


def _ridge_influence(mu: float, damping: float, iters: int):
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    x, y = rng.normal(size=(7, 3)), rng.normal(size=7)
    xv, yv = rng.normal(size=(5, 3)), rng.normal(size=5)
    theta = np.array([0.3, -0.2, 0.1])

    def loss_fn(p, frozen, b):
      del frozen
      return 0.5 * (b["x"] @ p - b["y"]) ** 2 + 0.5 * mu * p @ p

    m = study_mod.StudyModel(None, None, jax.numpy.asarray(theta), {}, loss_fn)
    pa = {"x": x, "y": y, "index": np.arange(7)}  # batches of 4: the last one padded
    va = {"x": xv, "y": yv, "index": np.arange(5)}
    scores, extra = study_mod.influence_alignment(m, pa, va, 4, 4,
                                                  {"iters": iters, "damping": damping})
  return x, y, xv, yv, theta, scores, extra


def test_influence_alignment_solves_the_damped_system_on_ridge():
  """On ridge (3 parameters) CG is exact in 3 iterations: scores equal ``grad l_i . v`` with
  ``v = (H + damping I)^-1 grad f`` from the closed form, in float64; pool padding is ignored."""
  mu, damping = 0.1, 0.5
  x, y, xv, yv, theta, scores, extra = _ridge_influence(mu, damping, 3)
  h = x.T @ x / 7 + mu * np.eye(3)
  g = xv.T @ (xv @ theta - yv) / 5 + mu * theta
  v = np.linalg.solve(h + damping * np.eye(3), g)
  per_row = (x @ theta - y)[:, None] * x + mu * theta
  np.testing.assert_allclose(scores, per_row @ v, rtol=1e-10)
  assert extra["residuals"][-1] < 1e-10 and len(extra["residuals"]) == 3
  assert extra["negative_curvature_at"] is None


def test_influence_alignment_stops_at_negative_curvature():
  """A negative-definite ``H + damping`` (ridge with mu = -10): CG stops at its first iteration and
  says so, and the scores are those of the zero iterate."""
  *_, scores, extra = _ridge_influence(-10.0, 0.1, 3)
  assert extra["negative_curvature_at"] == 1 and extra["residuals"] == []
  np.testing.assert_array_equal(scores, np.zeros(7))


def test_val_labels_keeps_validation_of_those_labels_and_the_old_keys():
  pool, val = _records(8)
  val = val + [Record(f"r{i}", f"z{i}", "I cannot help.", "syn", "refusal", split="validation")
               for i in range(3)]
  tok = ByteTokenizer()
  data = study_mod.make_data(pool, val, _settings(val_labels="refusal"), tok, 0, max_len=64)
  assert [r.label for r in data.val] == ["refusal"] * 3 and data.notes["n_val"] == 3
  data = study_mod.make_data(pool, val, _settings(val_labels="good,refusal", val_size=5), tok, 0,
                             max_len=64)
  assert len(data.val) == 5
  with pytest.raises(ValueError, match=r"\['harmful'\] not among .* \['good', 'refusal'\]"):
    study_mod.make_data(pool, val, _settings(val_labels="harmful"), tok, 0, max_len=64)
  # The rows recorded before the setting existed keep their keys at its default.
  s = _settings()
  old = {k: v for k, v in s.items() if k != "val_labels"}
  assert study_mod.row_key("q", "random", 0, s, {}) == json.dumps(["q", "random", 0, old, {}],
                                                                  sort_keys=True)
  assert "val_labels" in study_mod.row_key("q", "random", 0, _settings(val_labels="good"), {})
