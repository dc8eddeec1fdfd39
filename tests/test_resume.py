"""A run killed with SIGKILL at random points and resumed ends bit-identical to one never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bilevel_jax import checkpoint as ckpt
from bilevel_jax import metrics as M

ROOT = Path(__file__).resolve().parents[1]

CONFIG = '''
from bilevel_jax.config import base_config
def get_config():
  c = base_config()
  c.name = "resume"
  c.data.pool = "toy"
  c.data.pool_size = 16
  c.data.max_len = 48
  c.data.batch_size = 4
  c.data.val_batch_size = 4
  c.model.tiny_d_model = 16
  c.select.estimator = "penalty"
  c.select.steps = 14
  c.finetune.steps = 12
  c.finetune.batch_size = 4
  c.finetune.optimizer = "adam"
  c.finetune.lr = 1e-2
  c.checkpoint.every = 2
  c.metrics.tensorboard = False
  c.run.methods = ("bds",)
  return c
'''
TOTAL_LINES = 14 + 12  # metrics.jsonl lines of the two phases when finished


def _cmd(cfg_path, workdir):
  return [sys.executable, "-m", "bilevel_jax.cli", "finetune", "--config", str(cfg_path),
          f"--config.workdir={workdir}"]


def _env(tmp_path, delay):
  env = dict(os.environ, BILEVEL_JAX_DEBUG_STEP_DELAY=str(delay),
             BILEVEL_JAX_COMPILE_CACHE=str(tmp_path / "jit_cache"), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _lines(workdir):
  return sum(len(M.read_jsonl(p)) for p in Path(workdir).glob("*/metrics.jsonl"))


def _final_state(workdir, phase):
  """The arrays of a phase's final checkpoint, read without a template (as saved)."""
  import orbax.checkpoint as ocp
  d = Path(workdir) / phase / "ckpt"
  step = max(int(p.name) for p in d.iterdir() if p.name.isdigit())
  with ocp.CheckpointManager(d, item_names=("state", "meta")) as m:
    out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, out["state"])


def _assert_same_tree(a, b, what):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb, what
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=what)


class _Crash(Exception):
  pass


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent compilation cache for this test only: the four in-process runs compile once."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path / "jit_cache"))
  jax.config.update(keys[1], 0.0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


def test_crash_and_resume_in_process_is_bit_identical(tmp_path, monkeypatch, compile_cache):
  """Fast variant (default suite): an exception after step k of the run, then a resume."""
  from bilevel_jax import config as C
  from bilevel_jax import experiment, loops
  cfg_file = tmp_path / "resume_cfg.py"
  cfg_file.write_text(CONFIG)
  experiment.run(C.load(str(cfg_file), [f"workdir={tmp_path / 'ref'}"]), until="finetune")

  real_progress = loops.metrics_lib.progress
  killed = tmp_path / "killed"
  # Crash once in the selection phase and once in fine-tuning, right after a step was logged
  # (before its checkpoint, when one is due).
  for crash_at in (5, 18):

    def crashing_progress(*a, **kw):
      bar = real_progress(*a, **kw)
      update = bar.update

      def upd(k=1):
        update(k)
        if _lines(killed) >= crash_at:
          raise _Crash()
      bar.update = upd
      return bar

    monkeypatch.setattr(loops.metrics_lib, "progress", crashing_progress)
    with pytest.raises(_Crash):
      experiment.run(C.load(str(cfg_file), [f"workdir={killed}"]), until="finetune")
    assert _lines(killed) == crash_at
  monkeypatch.setattr(loops.metrics_lib, "progress", real_progress)
  experiment.run(C.load(str(cfg_file), [f"workdir={tmp_path / 'killed'}"]), until="finetune")
  for phase in ("select_bds", "finetune_bds"):
    _assert_same_tree(_final_state(tmp_path / "ref", phase)[1],
                      _final_state(tmp_path / "killed", phase)[1], phase)
    assert M.read_jsonl(tmp_path / "ref" / phase / "metrics.jsonl") == M.read_jsonl(
        tmp_path / "killed" / phase / "metrics.jsonl")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
  cfg = tmp_path / "resume_cfg.py"
  cfg.write_text(CONFIG)
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  # The reference: never stopped.
  subprocess.run(_cmd(cfg, ref), env=_env(tmp_path, 0), check=True, capture_output=True, timeout=300)
  assert _lines(ref) == TOTAL_LINES

  seed = int.from_bytes(os.urandom(4), "little")
  rng = np.random.default_rng(seed)
  targets = sorted(rng.choice(np.arange(2, TOTAL_LINES - 1), size=3, replace=False))
  kills = []
  for target in targets:
    proc = subprocess.Popen(_cmd(cfg, killed), env=_env(tmp_path, 0.15), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _lines(killed) < target and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append(_lines(killed))
  assert len(set(kills)) >= 2, f"kills did not land at different points: {kills} (seed {seed})"
  assert max(kills) < TOTAL_LINES, f"the run finished before a kill: {kills} (seed {seed})"
  done = subprocess.run(_cmd(cfg, killed), env=_env(tmp_path, 0), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  msg = f"kill points (metrics lines) {kills}, seed {seed}"
  for name in ("logits", "weights", "history", "keep"):
    np.testing.assert_array_equal(np.load(ref / "select_bds" / f"{name}.npy"),
                                  np.load(killed / "select_bds" / f"{name}.npy"), err_msg=msg)
  for phase in ("select_bds", "finetune_bds"):
    s1, a = _final_state(ref, phase)
    s2, b = _final_state(killed, phase)
    assert s1 == s2
    _assert_same_tree(a, b, f"{phase}: {msg}")
    # The metrics files match too: lines written after the last checkpoint were replaced.
    assert M.read_jsonl(ref / phase / "metrics.jsonl") == M.read_jsonl(
        killed / phase / "metrics.jsonl"), msg
  assert json.loads((ref / "finetune_bds" / "result.json").read_text()) == json.loads(
      (killed / "finetune_bds" / "result.json").read_text())
