"""The CLI's select and fine-tune phases on a device mesh give the single-device results.

With the 8 fake CPU devices of conftest.py, ``mesh.shape=(1, 1, 1)`` runs the plain single-device
programs and a mesh of 8 runs the sharded ones (``loops.prepare`` builds it once). Selection
logits, their trajectory and the fine-tuned params must agree within the f32 tolerances of
``tests/test_sharding.py`` (``EST_RTOL``/``PARAM_RTOL`` = 5e-5 relative Frobenius error per leaf,
losses ``LOSS_RTOL`` = 1e-5): a sharded program sums in another order, so not bit for bit. Both
optimizers are SGD, which is linear in the gradient; Adam would turn f32 noise in near-zero gradient
entries into O(lr) changes (see test_sharding.py), a property of Adam and not of the mesh.

A SIGTERM during a phase on the mesh makes the loop checkpoint the step it agreed on and exit with
status 143; the same command then finishes bit-identical to a run never stopped.
"""

import os
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bilevel_jax import cli
from bilevel_jax import config as C
from bilevel_jax import distributed, experiment, loops
from bilevel_jax import metrics as M

# The CLI builds its mesh from the default backend's devices: the 8 fake CPUs of conftest.py (on a
# GPU/TPU machine the accelerator is the default and these runs would not see 8 devices).
pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 default-backend devices")
EST_RTOL = PARAM_RTOL = 5e-5  # as tests/test_sharding.py
LOSS_RTOL = 1e-5

CONFIG = '''
from bilevel_jax.config import base_config
def get_config():
  c = base_config()
  c.name = "mesh"
  c.data.pool = "toy"
  c.data.pool_size = 16
  c.data.max_len = 32
  c.data.batch_size = 8
  c.data.val_batch_size = 8
  c.model.tiny_d_model = 16
  c.model.tiny_n_layers = 1
  c.select.estimator = "penalty"
  c.select.steps = 3
  c.select.logits_optimizer = "sgd"
  c.select.logits_lr = 1.0
  c.finetune.steps = 3
  c.finetune.batch_size = 8
  c.finetune.optimizer = "sgd"
  c.finetune.lr = 0.1
  c.checkpoint.every = 2
  c.metrics.tensorboard = False
  c.run.methods = ("bds",)
  return c
'''


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
  """The config file, and one persistent compilation cache for the module (the runs share steps)."""
  tmp = tmp_path_factory.mktemp("mesh_run")
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp / "jit_cache"))
  jax.config.update(keys[1], 0.0)
  env = os.environ.get("BILEVEL_JAX_COMPILE_CACHE")
  os.environ["BILEVEL_JAX_COMPILE_CACHE"] = ""  # the cache above, not the user's
  f = tmp / "mesh_cfg.py"
  f.write_text(CONFIG)
  yield f
  for k, v in old.items():
    jax.config.update(k, v)
  if env is None:
    os.environ.pop("BILEVEL_JAX_COMPILE_CACHE", None)
  else:
    os.environ["BILEVEL_JAX_COMPILE_CACHE"] = env


def _finetune(cfg_file, workdir, *overrides):
  assert cli.main(["finetune", "--config", str(cfg_file), f"--config.workdir={workdir}",
                   *[f"--config.{o}" for o in overrides]]) == 0
  return workdir


@pytest.fixture(scope="module")
def one_device(cfg_file):
  """The reference: select + fine-tune with the plain single-device programs."""
  return _finetune(cfg_file, cfg_file.parent / "one", "mesh.shape=1,1,1")


@pytest.fixture(scope="module")
def mesh_222(cfg_file):
  """The same on a (2, 2, 2) mesh with the weight logits split over data; records batch shardings."""
  seen = []
  real = distributed.put_rows

  def spy(host, shardings):
    out = real(host, shardings)
    seen.append(jax.tree.leaves(out)[0].sharding)
    return out

  loops.distributed.put_rows = spy
  try:
    wd = _finetune(cfg_file, cfg_file.parent / "mesh_222", "mesh.shape=2,2,2", "mesh.weights=data")
  finally:
    loops.distributed.put_rows = real
  return wd, seen


def _final_state(workdir, phase):
  d = Path(workdir) / phase / "ckpt"
  step = max(int(p.name) for p in d.iterdir() if p.name.isdigit())
  with ocp.CheckpointManager(d, item_names=("state", "meta")) as m:
    out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, out["state"])


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _assert_trees_close(got, want, rtol, what):
  (gl, gt), (wl, wt) = jax.tree.flatten(got), jax.tree.flatten(want)
  assert gt == wt, what
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], wl):
    err = _rel(g, w)
    assert err <= rtol, f"{what} {jax.tree_util.keystr(path)}: relative error {err:.3g} > {rtol}"


def _assert_matches(one, many):
  for name in ("logits", "weights", "history"):
    a, b = np.load(many / "select_bds" / f"{name}.npy"), np.load(one / "select_bds" / f"{name}.npy")
    assert _rel(a, b) <= EST_RTOL, name
  assert np.ptp(np.load(one / "select_bds" / "logits.npy")) > 0  # the logits moved
  for phase, rtol in (("select_bds", EST_RTOL), ("finetune_bds", PARAM_RTOL)):
    s1, want = _final_state(one, phase)
    s2, got = _final_state(many, phase)
    assert s1 == s2
    _assert_trees_close(got, want, rtol, phase)
    for key in ("loss", "val_loss"):
      l1 = [r[key] for r in M.read_jsonl(one / phase / "metrics.jsonl") if key in r]
      l2 = [r[key] for r in M.read_jsonl(many / phase / "metrics.jsonl") if key in r]
      assert len(l1) == len(l2)
      np.testing.assert_allclose(l2, l1, rtol=LOSS_RTOL, err_msg=f"{phase} {key}")


def test_select_and_finetune_on_a_2x2x2_mesh_match_one_device(one_device, mesh_222):
  many, seen = mesh_222
  # The mesh run fed its batches split over data x fsdp = 4 (each row on 2 devices: tensor).
  assert seen and all(s.mesh.devices.size == 8 for s in seen)
  assert all(("data", "fsdp") in tuple(s.spec) for s in seen)
  _assert_matches(one_device, many)


@pytest.mark.slow
def test_select_and_finetune_on_a_1x8x1_mesh_match_one_device(cfg_file, one_device):
  _assert_matches(one_device, _finetune(cfg_file, cfg_file.parent / "mesh_181", "mesh.shape=1,8,1"))


def test_one_device_mesh_keeps_the_single_device_path(cfg_file, tmp_path):
  cfg = C.load(str(cfg_file), [f"workdir={tmp_path / 'x'}", "mesh.shape=1,1,1"])
  assert loops.prepare(cfg).layout is None
  cfg = C.load(str(cfg_file), [f"workdir={tmp_path / 'x'}"])  # default: FSDP over all 8
  assert C.base_config().mesh.shape == (1, -1, 1)
  assert dict(loops.prepare(cfg).layout.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_sigterm_on_a_mesh_checkpoints_the_agreed_step_and_resumes_exactly(cfg_file, mesh_222,
                                                                           monkeypatch):
  ref, _ = mesh_222
  stopped = cfg_file.parent / "stopped"
  args = ["select", "--config", str(cfg_file), f"--config.workdir={stopped}",
          "--config.mesh.shape=2,2,2", "--config.mesh.weights=data"]
  real_progress = loops.metrics_lib.progress
  before = signal.getsignal(signal.SIGTERM)

  def signalling_progress(*a, **kw):  # a preemption notice once step 1 is logged
    bar = real_progress(*a, **kw)
    update = bar.update

    def upd(k=1):
      update(k)
      os.kill(os.getpid(), signal.SIGTERM)
    bar.update = upd
    return bar

  monkeypatch.setattr(loops.metrics_lib, "progress", signalling_progress)
  with pytest.raises(distributed.Preempted) as e:
    cli.main(args)
  assert e.value.code == 143 and "after step 1 of 3" in str(e.value)
  # checkpoint.every=2: step 1's checkpoint exists only because the SIGTERM asked for it.
  assert sorted(int(p.name) for p in (stopped / "select_bds" / "ckpt").iterdir()
                if p.name.isdigit()) == [1]
  assert not (stopped / "select_bds" / "result.json").exists()
  assert signal.getsignal(signal.SIGTERM) is before  # the guard put the old handler back
  monkeypatch.setattr(loops.metrics_lib, "progress", real_progress)
  assert cli.main(args) == 0
  for name in ("logits", "history", "keep"):
    np.testing.assert_array_equal(np.load(stopped / "select_bds" / f"{name}.npy"),
                                  np.load(ref / "select_bds" / f"{name}.npy"), err_msg=name)
  assert M.read_jsonl(stopped / "select_bds" / "metrics.jsonl") == M.read_jsonl(
      ref / "select_bds" / "metrics.jsonl")
