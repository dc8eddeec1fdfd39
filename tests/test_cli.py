"""The command line end to end on a tiny random model and the synthetic toy pool."""

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from bilevel_jax import cli
from bilevel_jax import metrics as M

CONFIG = '''
from bilevel_jax.config import base_config
def get_config():
  c = base_config()
  c.name = "cli"
  c.data.pool = "toy"
  c.data.pool_size = 16
  c.data.max_len = 48
  c.data.batch_size = 4
  c.data.val_batch_size = 4
  c.model.tiny_d_model = 16
  c.select.estimator = "penalty"
  c.select.steps = 6
  c.select.keep_fraction = 0.5
  c.finetune.steps = 4
  c.finetune.batch_size = 4
  c.finetune.lr = 1e-2
  c.evaluate.max_new_tokens = 3
  c.evaluate.n_gsm8k = 4
  c.checkpoint.every = 2
  c.run.methods = ("bds", "direct_mixing", "random_selection")
  c.run.selection_scores = ("length", "base_loss", "random")
  return c
'''


@pytest.fixture
def cfg_file(tmp_path):
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path / "jit_cache"))
  jax.config.update(keys[1], 0.0)
  f = tmp_path / "cli_cfg.py"
  f.write_text(CONFIG)
  yield f
  for k, v in old.items():
    jax.config.update(k, v)


def test_run_writes_everything_and_report_alone_trains_nothing(cfg_file, tmp_path, capsys,
                                                                monkeypatch):
  monkeypatch.setenv("BILEVEL_JAX_COMPILE_CACHE", "")  # The fixture's cache, not the user's.
  wd = tmp_path / "run"
  assert cli.main(["run", "--config", str(cfg_file), f"--config.workdir={wd}"]) == 0
  assert "report/index.html" in capsys.readouterr().out
  saved = json.loads((wd / "config.json").read_text())
  assert saved["workdir"] == str(wd) and saved["select"]["steps"] == 6
  for phase in ("select_bds", "finetune_bds", "finetune_direct_mixing",
                "finetune_random_selection"):
    recs = M.read_jsonl(wd / phase / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)) and recs
    assert list((wd / phase / "tb").glob("events.out.tfevents.*"))
  summary = json.loads((wd / "report" / "summary.json").read_text())
  ev = summary["eval_metrics"]
  assert set(ev) == {"bds", "direct_mixing", "random_selection"}
  assert ev["bds"]["n_train"] == 8 and ev["random_selection"]["n_train"] == 8
  assert ev["direct_mixing"]["n_train"] == 16 + 4  # pool plus validation
  for m in ev.values():
    assert np.isfinite(m["val_loss"]) and 0.0 <= m["gsm8k_exact_match"] <= 1.0
  assert {"bds", "length", "base_loss", "random"} <= set(summary["selection_quality"])
  rows = list(csv.DictReader(open(wd / "report" / "scores.csv")))
  assert len(rows) == 16 and sum(int(r["selected"]) for r in rows) == 8
  keep = np.load(wd / "select_bds" / "keep.npy")
  assert [int(r["selected"]) for r in rows] == keep.astype(int).tolist()

  # `report` alone: reads the finished phases, trains nothing, rewrites the report.
  mtimes = {p: p.stat().st_mtime_ns for p in wd.glob("*/result.json")}
  (wd / "report" / "index.html").unlink()
  assert cli.main(["report", "--config", str(cfg_file), f"--config.workdir={wd}"]) == 0
  assert (wd / "report" / "index.html").exists()
  assert mtimes == {p: p.stat().st_mtime_ns for p in wd.glob("*/result.json")}
  assert json.loads((wd / "report" / "summary.json").read_text())["eval_metrics"] == ev

  # Other data in the same workdir is refused with a clear message.
  assert cli.main(["select", "--config", str(cfg_file), f"--config.workdir={wd}",
                   "--config.data.shuffle_seed=3"]) == 1
  assert "fingerprint" in capsys.readouterr().err


def test_nonfinite_steps_are_skipped_then_the_run_stops(cfg_file, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("BILEVEL_JAX_COMPILE_CACHE", "")
  wd = tmp_path / "nan"
  code = cli.main(["finetune", "--config", str(cfg_file), f"--config.workdir={wd}",
                   "--config.run.methods=full_sft", "--config.finetune.lr=1e30",
                   "--config.finetune.optimizer=sgd", "--config.metrics.max_nonfinite=2"])
  err = capsys.readouterr().err
  assert code == 1 and "max_nonfinite=2" in err and "skipped" in err
  recs = M.read_jsonl(wd / "finetune_full_sft" / "metrics.jsonl")
  assert any(r["loss"] is None or r["grad_norm"] is None for r in recs)


@pytest.mark.parametrize("args,message", [
    (["--config.select.stepz=1"], "unknown key 'select.stepz'"),
    (["--config.finetune.steps=ten"], "'finetune.steps' must be of type int"),
])
def test_config_errors_exit_2_with_the_key(cfg_file, capsys, args, message):
  assert cli.main(["select", "--config", str(cfg_file), *args]) == 2
  assert message in capsys.readouterr().err


def test_unknown_argument_and_command(cfg_file):
  with pytest.raises(SystemExit) as e:
    cli.main(["run", "--config", str(cfg_file), "--seed=3"])
  assert e.value.code == 2
  with pytest.raises(SystemExit):
    cli.main(["train", "--config", str(cfg_file)])


def test_every_shipped_config_parses_through_the_cli_parser():
  root = Path(__file__).resolve().parents[1]
  for f in sorted((root / "configs").glob("*.py")):
    command, spec, overrides = cli._parse(["run", "--config", str(f), "--config.seed=2"])
    assert command == "run" and spec == str(f) and overrides == ["seed=2"]


def test_refine_runs_bds_then_bmo(cfg_file, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("BILEVEL_JAX_COMPILE_CACHE", "")
  wd = tmp_path / "bmo"
  assert cli.main(["refine", "--config", str(cfg_file), f"--config.workdir={wd}",
                   "--config.refine.steps=4", "--config.refine.warmup=1",
                   "--config.refine.period=2", "--config.refine.max_new_tokens=4",
                   "--config.refine.share=0.25", "--config.evaluate.n_gsm8k=0"]) == 0
  result = json.loads((wd / "finetune_bmo" / "result.json").read_text())
  assert [r["round"] for r in result["rounds"]] == [0, 1]
  assert result["rounds"][0]["questions_regenerated"] == 4  # a quarter of 16 questions
  assert len(M.read_jsonl(wd / "finetune_bmo" / "metrics.jsonl")) == 4
  ev = json.loads((wd / "finetune_bmo" / "eval.json").read_text())
  assert np.isfinite(ev["val_loss"])
  gens = [json.loads(l) for l in (wd / "finetune_bmo" / "generations.jsonl").open()]
  assert len(gens) == 4 and all(len(g["texts"]) == 2 for g in gens)  # G = 2 responses each
  # The report sets BMO next to BDS alone, and the console shows the same numbers.
  summary = json.loads((wd / "report" / "summary.json").read_text())
  assert set(summary["eval_metrics"]) == {"bds", "bmo"}
  bmo = summary["eval_metrics"]["bmo"]
  last = result["rounds"][-1]["harmful_questions_in_training"]
  # The toy pool has no harmful label: the share is NaN (null in JSON), and BDS has no such row.
  assert last is None or np.isnan(last)
  assert bmo["harmful_questions_in_training"] is None
  assert "harmful_questions_in_training" not in summary["eval_metrics"]["bds"]
  assert np.isfinite(bmo["val_loss"]) and bmo["n_train"] == result["n_train"]
  out = capsys.readouterr().out
  assert any(l.startswith("bmo ") and "|" in l for l in out.splitlines())


def test_plan_prints_a_memory_table(cfg_file, capsys):
  # 8 fake CPU devices (tests/conftest.py): batches must split over data * fsdp = 8.
  assert cli.main(["plan", "--config", str(cfg_file), "--config.data.batch_size=8",
                   "--config.data.val_batch_size=8", "--config.finetune.batch_size=8"]) == 0
  assert "memory plan: model tiny" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_per_layer_selects_and_finetunes_like_the_stacked_model(cfg_file, tmp_path, monkeypatch,
                                                                kind):
  """``model.trainable.per_layer`` changes how the layers are stored and run, not the results."""
  monkeypatch.setenv("BILEVEL_JAX_COMPILE_CACHE", "")
  runs = {}
  for per_layer in (False, True):
    wd = tmp_path / f"per_layer_{per_layer}"
    args = ["--config", str(cfg_file), f"--config.workdir={wd}",
            f"--config.model.trainable.kind={kind}", f"--config.model.trainable.per_layer={per_layer}",
            "--config.run.methods=('bds',)", "--config.evaluate.n_gsm8k=0"]
    assert cli.main(["select"] + args) == 0
    assert cli.main(["finetune"] + args) == 0
    runs[per_layer] = wd
  for name in ("logits", "weights"):
    stacked, per_layer = (np.load(runs[p] / "select_bds" / f"{name}.npy") for p in (False, True))
    assert np.std(stacked) > 0  # the selection moved the weights
    np.testing.assert_allclose(per_layer, stacked, rtol=1e-4, atol=1e-6)
  losses = {p: [r["loss"] for r in M.read_jsonl(runs[p] / "finetune_bds" / "metrics.jsonl")]
            for p in (False, True)}
  assert len(losses[False]) == 4  # finetune.steps
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_bf16_compute_with_f32_params_finetunes_close_to_f32(cfg_file, tmp_path, monkeypatch):
  """``model.compute_dtype=bfloat16`` keeps the params in ``model.dtype`` (f32) and computes in bf16."""
  from bilevel_jax import config as config_lib
  from bilevel_jax import loops
  monkeypatch.setenv("BILEVEL_JAX_COMPILE_CACHE", "")
  cfg = config_lib.load(str(cfg_file), ["model.compute_dtype=bfloat16"])
  mcfg, params, _ = loops.build_model(cfg)
  assert mcfg.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  losses = {}
  for dtype in ("", "bfloat16"):
    wd = tmp_path / f"compute_{dtype or 'f32'}"
    args = ["--config", str(cfg_file), f"--config.workdir={wd}", "--config.model.trainable.kind=full",
            "--config.model.trainable.per_layer=True", f"--config.model.compute_dtype={dtype}",
            "--config.run.methods=('full_sft',)", "--config.evaluate.n_gsm8k=0"]
    assert cli.main(["finetune"] + args) == 0
    losses[dtype] = [r["loss"] for r in M.read_jsonl(wd / "finetune_full_sft" / "metrics.jsonl")]
  assert len(losses[""]) == 4 and losses["bfloat16"] != losses[""]  # bf16 did round something
  # bf16 keeps 8 significant bits: the losses agree to a few parts in a hundred, not better.
  np.testing.assert_allclose(losses["bfloat16"], losses[""], rtol=0.05)
