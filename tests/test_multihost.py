"""Two processes x two CPU devices on 127.0.0.1 run bilevel selection like one process does.

The test starts this file twice as a worker (``python tests/test_multihost.py --worker ...``): the
workers join with ``jax.distributed`` (gloo collectives), build a (data=2, fsdp=2) mesh over their
4 devices, each load only the batch rows that live on their own devices, and run outer steps of
``unroll`` bilevel selection with the weight logits split over ``data`` (so over both hosts).
After the third step worker 1 sends itself SIGTERM; the :class:`PreemptionGuard` all-gathers the
flag, both workers stop at that same step and write one checkpoint together. This pytest process
(8 devices, one process) then computes the same three steps on one device, and restores the
checkpoint onto a (2, 2, 2) mesh: a different process count, device count and mesh.

The CLI tests do the same through the command line: both workers run ``bilevel-jax select``
with ``mesh.distributed`` on a (2, 2, 1) mesh (``loops`` builds it, feeds each process its rows and
writes global-array checkpoints); the result equals a one-device run, and this single process then
restores the checkpoint the two wrote. Slow variants: ``finetune`` too, and a SIGTERM to one
worker mid-selection (both checkpoint one agreed step and exit 143; restarted, they finish).

Tolerance: as in test_sharding.py (rounding of reordered f32 sums, ``EST_RTOL``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess
EST_RTOL = 5e-5
N_EXAMPLES, BATCH, STOP_AFTER, MAX_STEPS = 16, 8, 3, 8


# ----------------------------------------------------------------------------- shared set-up


def build():
  """Everything both sides need: the problem, the estimator and the batches of each step."""
  import jax
  import jax.numpy as jnp

  from bilevel_jax.core import hypergrad, select, sft
  from bilevel_jax.model import llama, lora

  cfg = llama.tiny_config(n_layers=1)
  spec = lora.TrainableSpec("full")
  problem = hypergrad.Problem(sft.make_loss_fn(lora.make_logits_fn(spec, cfg)),
                              sft.sgd_or_adam("sgd", 0.1))
  est = hypergrad.make_estimator("unroll", k=1)
  logit_opt = select.make_logit_optimizer(est)

  def init(key):
    return select.init_state(problem, est, llama.init_params(cfg, key), N_EXAMPLES, logit_opt)

  rng = np.random.default_rng(0)
  t = 12
  toks = rng.integers(0, cfg.vocab_size, (N_EXAMPLES + BATCH, t + 1)).astype(np.int32)
  ar = np.arange(t)
  arrays = {"tokens": toks[:, :-1], "targets": toks[:, 1:],
            "loss_mask": np.broadcast_to((ar >= 3).astype(np.float32), (len(toks), t)).copy(),
            "positions": np.broadcast_to(ar, (len(toks), t)).astype(np.int32).copy(),
            "segment_ids": np.ones((len(toks), t), np.int32),
            "index": np.arange(len(toks), dtype=np.int32)}
  pool = {k: v[:N_EXAMPLES] for k, v in arrays.items()}
  val = {k: v[N_EXAMPLES:] for k, v in arrays.items()}
  val["index"] = np.zeros(BATCH, np.int32)

  def batches(step):
    """Global batches of outer step ``step`` (host arrays): a fixed shuffle of the pool."""
    rows = np.random.default_rng(100 + step).permutation(N_EXAMPLES)[:BATCH]
    return {"train": {k: v[rows][None] for k, v in pool.items()}, "val": val}

  return problem, est, logit_opt, init, batches, jax.random.key(0), jnp


# ----------------------------------------------------------------------------- the worker


def worker(process_id: int, port: int, workdir: str) -> None:
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  from bilevel_jax import distributed, parallel, sharding
  from bilevel_jax.checkpoint import Checkpointer
  from jax.experimental import multihost_utils

  distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                         process_id=process_id)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  problem, est, logit_opt, init, batches, key, _ = build()
  layout = sharding.make_layout((2, 2, 1), weights="data")
  # The mesh's first device is process 0's; memory queries (the plan's capacity) need a local one.
  assert parallel.first_local_device(layout.mesh).process_index == process_id
  abstract_state = jax.eval_shape(init, key)
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batches(0))
  step = parallel.sharded_outer_step(problem, est, logit_opt, layout, abstract_state, {}, example)
  s_sh, _, b_sh, _ = step.in_shardings
  state = jax.jit(init, out_shardings=s_sh)(key)  # born sharded across both hosts

  def local_batches(t):
    full = batches(t)
    train_rows = distributed.local_rows(b_sh["train"]["tokens"], BATCH, row_axis=1)
    val_rows = distributed.local_rows(b_sh["val"]["tokens"], BATCH)
    local = {"train": {k: v[:, train_rows] for k, v in full["train"].items()},
             "val": {k: v[val_rows] for k, v in full["val"].items()}}
    return {"train": distributed.global_batch(local["train"], b_sh["train"], BATCH, row_axis=1),
            "val": distributed.global_batch(local["val"], b_sh["val"], BATCH)}, len(train_rows)

  ckpt = Checkpointer(Path(workdir) / "ckpt", fingerprint="multihost-test", async_save=True)
  stopped_at, local_rows_per_host = None, None
  with distributed.PreemptionGuard() as guard:
    for t in range(MAX_STEPS):
      b, local_rows_per_host = local_batches(t)
      state, _ = step(state, {}, b, jax.random.fold_in(key, t))
      if process_id == 1 and t + 1 == STOP_AFTER:
        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice on one host only
      if guard.should_stop(t):
        ckpt.save(t + 1, state, force=True)
        stopped_at = t + 1
        break
  ckpt.close()
  logits = multihost_utils.process_allgather(state.logits, tiled=True)
  result = {"process": process_id, "stopped_at": stopped_at, "signalled": guard.local_request,
            "local_rows": local_rows_per_host, "logits": np.asarray(logits).tolist()}
  Path(workdir, f"result_{process_id}.json").write_text(json.dumps(result))
  jax.distributed.shutdown()


# ----------------------------------------------------------------------------- the test


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _single_process_reference(n_steps):
  import jax
  from bilevel_jax.core import select

  problem, est, logit_opt, init, batches, key, jnp = build()
  step = select.make_outer_step(problem, est, logit_opt, donate=False)
  state = jax.jit(init)(key)
  for t in range(n_steps):
    state, _ = step(state, {}, jax.tree.map(jnp.asarray, batches(t)), jax.random.fold_in(key, t))
  return state, init, key


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_two_processes_match_one_and_checkpoint_restores_on_another_mesh(tmp_path):
  import jax

  from bilevel_jax import sharding
  from bilevel_jax.checkpoint import Checkpointer
  from bilevel_jax.parallel import select_state_shardings

  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(port),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, f"worker failed:\n{out[-4000:]}"
  results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2)]

  # The SIGTERM reached worker 1 only; both stopped at the same step and took part in the save.
  assert [r["signalled"] for r in results] == [False, True]
  assert [r["stopped_at"] for r in results] == [STOP_AFTER, STOP_AFTER]
  assert [r["local_rows"] for r in results] == [BATCH // 2, BATCH // 2]  # each host its half

  want, init, key = _single_process_reference(STOP_AFTER)
  assert np.ptp(np.asarray(want.logits)) > 0
  for r in results:
    assert _rel(r["logits"], want.logits) <= EST_RTOL

  # Restore the 2-process, 4-device checkpoint in this single process on a (2, 2, 2) mesh.
  layout = sharding.make_layout((2, 2, 2), weights="data", devices=jax.devices("cpu")[:8])
  abstract = jax.eval_shape(init, key)
  target = sharding.abstract(abstract, select_state_shardings(layout, abstract))
  with Checkpointer(tmp_path / "ckpt", fingerprint="multihost-test") as ckpt:
    restored = ckpt.restore_latest(target)
  assert restored.step == STOP_AFTER
  state = restored.state
  assert state.logits.sharding == layout.omega(16)
  assert state.est.params["layers"]["wq"].sharding == layout.params(abstract.est.params)["layers"]["wq"]
  np.testing.assert_array_equal(np.asarray(state.logits), np.asarray(results[0]["logits"],
                                                                      np.float32))
  for got, ref in zip(jax.tree.leaves(state.est.params), jax.tree.leaves(want.est.params)):
    assert _rel(got, ref) <= EST_RTOL
  assert int(state.step) == STOP_AFTER


# ----------------------------------------------------------------------------- the CLI path

CLI_CONFIG = '''
from bilevel_jax.config import base_config
def get_config():
  c = base_config()
  c.name = "multihost_cli"
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
  c.finetune.steps = 2
  c.finetune.batch_size = 8
  c.finetune.optimizer = "sgd"
  c.finetune.lr = 0.1
  c.checkpoint.every = 2
  c.metrics.tensorboard = False
  c.run.methods = ("bds",)
  return c
'''


def cli_worker(process_id: int, port: int, cfg_file: str, workdir: str, command: str,
               *overrides: str) -> None:
  """``bilevel-jax <command>`` (``select``, or ``finetune``: select then fine-tune on the selection)
  as one of 2 processes x 2 CPU devices (mesh data=2 x fsdp=2)."""
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  from bilevel_jax import cli, distributed, loops

  fed = []  # per selection step: the rows of the global train batch this process fed
  real = distributed.put_rows

  def spy(host, shardings):
    out = real(host, shardings)
    if isinstance(out, dict) and "train" in out:
      leaf = jax.tree.leaves(out["train"])[0]
      fed.append(distributed.local_rows(leaf.sharding, leaf.shape[1], row_axis=1).tolist())
    return out

  loops.distributed.put_rows = spy
  code = cli.main([command, "--config", cfg_file, f"--config.workdir={workdir}",
                   "--config.mesh.distributed=true", "--config.mesh.shape=2,2,1",
                   "--config.mesh.weights=data",
                   f"--config.mesh.coordinator_address=127.0.0.1:{port}",
                   "--config.mesh.num_processes=2", f"--config.mesh.process_id={process_id}",
                   *overrides])
  Path(workdir, f"fed_{process_id}.json").write_text(json.dumps(
      {"processes": jax.process_count(), "devices": jax.device_count(), "fed": fed}))
  sys.exit(code)


def _start_cli_workers(cfg_file, workdir, command, *overrides, step_delay=0.0):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1]),
         "BILEVEL_JAX_COMPILE_CACHE": "", "BILEVEL_JAX_DEBUG_STEP_DELAY": str(step_delay)}
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  return [subprocess.Popen([sys.executable, __file__, "--cli-worker", str(i), str(port),
                            str(cfg_file), str(workdir), command, *overrides], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _wait(procs, timeout=300):
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  return outputs


def _saved_state(directory, like=None):
  """The newest checkpoint's arrays (NumPy), restored onto this process's first device.

  ``like``: a NumPy tree of the same structure, the template; needed for a checkpoint written by
  other processes (orbax refuses to guess a foreign topology), optional for one written here.
  """
  import jax
  import orbax.checkpoint as ocp
  step = max(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = None if like is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), like)
  with ocp.CheckpointManager(directory, item_names=("state", "meta")) as m:
    out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return step, jax.tree.map(np.asarray, out["state"])


@pytest.mark.parametrize("command", ["select", pytest.param("finetune", marks=pytest.mark.slow)])
def test_two_processes_run_the_cli_like_one(tmp_path, monkeypatch, command):
  """``bilevel-jax select`` on 2 processes x 2 CPU devices (3 selection steps) equals the one-device
  run, and its checkpoint (global arrays written by both processes) restores in this single
  process. ``finetune`` (slow: about twice as long) adds 2 fine-tuning steps on the selection.

  Tolerances as in test_sharding.py; both optimizers are SGD (see there for why not Adam).
  """
  import jax

  from bilevel_jax import cli

  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(CLI_CONFIG)
  multi, one = tmp_path / "multi", tmp_path / "one"
  procs = _start_cli_workers(cfg_file, multi, command)
  outputs = _wait(procs)
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, f"worker failed:\n{out[-4000:]}"
  fed = [json.loads((multi / f"fed_{i}.json").read_text()) for i in range(2)]
  assert [(f["processes"], f["devices"], len(f["fed"])) for f in fed] == [(2, 4, 3)] * 2
  for step in range(3):  # each process fed its own half of every batch (data axis = hosts)
    rows = [f["fed"][step] for f in fed]
    assert [len(r) for r in rows] == [4, 4] and sorted(rows[0] + rows[1]) == list(range(8))

  monkeypatch.setenv("BILEVEL_JAX_COMPILE_CACHE", "")
  old_cache = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jit_cache"))
  try:
    assert cli.main([command, "--config", str(cfg_file), f"--config.workdir={one}",
                     "--config.mesh.shape=1,1,1"]) == 0
    want = np.load(one / "select_bds" / "logits.npy")
    got = np.load(multi / "select_bds" / "logits.npy")
    assert np.ptp(want) > 0
    assert _rel(got, want) <= EST_RTOL
    assert _rel(np.load(multi / "select_bds" / "history.npy"),
                np.load(one / "select_bds" / "history.npy")) <= EST_RTOL
    np.testing.assert_array_equal(np.load(multi / "select_bds" / "keep.npy"),
                                  np.load(one / "select_bds" / "keep.npy"))
    for phase in ("select_bds", "finetune_bds")[:1 + (command == "finetune")]:
      want_step, want_state = _saved_state(one / phase / "ckpt")
      got_step, got_state = _saved_state(multi / phase / "ckpt", like=want_state)
      assert got_step == want_step
      for g, w in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        assert _rel(g, w) <= EST_RTOL, phase
    if command == "finetune":
      curves = [json.loads((d / "finetune_bds" / "result.json").read_text())["curve"]
                for d in (multi, one)]
      np.testing.assert_allclose(np.asarray(curves[0]), np.asarray(curves[1]), rtol=1e-5)

    # Restore the 2-process checkpoint in this one process (one device, no mesh): with its result
    # removed, the phase resumes at step 3 of 3 and rewrites the result from the restored state.
    (multi / "select_bds" / "result.json").unlink()
    (multi / "select_bds" / "logits.npy").unlink()
    assert cli.main(["select", "--config", str(cfg_file), f"--config.workdir={multi}",
                     "--config.mesh.shape=1,1,1"]) == 0
    np.testing.assert_array_equal(np.load(multi / "select_bds" / "logits.npy"), got)
    assert json.loads((multi / "select_bds" / "result.json").read_text())["steps"] == 3
  finally:
    jax.config.update("jax_compilation_cache_dir", old_cache)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  elif sys.argv[1:2] == ["--cli-worker"]:
    cli_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], *sys.argv[6:])


def test_single_process_helpers():
  import jax

  from bilevel_jax import distributed, sharding

  assert distributed.initialize(None) is False
  assert distributed.initialize({"distributed": False}) is False
  layout = sharding.make_layout((2, 2, 2), devices=jax.devices("cpu")[:8])
  sh = layout.batch({"x": np.zeros((8, 3))})["x"]
  np.testing.assert_array_equal(distributed.local_rows(sh, 8), np.arange(8))  # one process: all
  batch = distributed.global_batch({"x": np.arange(24.0).reshape(8, 3)}, {"x": sh}, 8)
  assert batch["x"].sharding == sh
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(24.0).reshape(8, 3))
  # The loops' placement helpers: rows per process, whole values (keys too), host copies.
  x = np.arange(16.0).reshape(8, 2)
  rows = distributed.put_rows({"x": x}, {"x": sh})
  assert rows["x"].sharding == sh and np.array_equal(np.asarray(rows["x"]), x)
  w_sh = layout.sharding(jax.sharding.PartitionSpec(None, "tensor"))
  placed = distributed.put({"w": x, "k": jax.random.key(3)}, {"w": w_sh, "k": layout.replicated()})
  assert placed["w"].sharding == w_sh and placed["k"].sharding == layout.replicated()
  assert distributed.put(placed, {"w": w_sh, "k": layout.replicated()})["w"] is placed["w"]
  np.testing.assert_array_equal(jax.random.key_data(placed["k"]),
                                jax.random.key_data(jax.random.key(3)))
  np.testing.assert_array_equal(distributed.to_host(placed["w"]), x)
  with distributed.PreemptionGuard(every=2) as guard:
    assert not guard.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.local_request
    assert guard.should_stop() is True  # 2nd call: a check
  assert signal.getsignal(signal.SIGTERM) is not guard._handler  # the old handler is back


@pytest.mark.slow
def test_sigterm_to_one_cli_process_stops_both_at_one_step_then_the_run_resumes(tmp_path,
                                                                               monkeypatch):
  """A SIGTERM to worker 1 alone, mid-selection: both workers checkpoint the same step and exit
  with 143; started again, they finish, and the logits equal the one-device run."""
  import time

  import jax

  from bilevel_jax import cli
  from bilevel_jax import metrics as M

  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(CLI_CONFIG)
  multi, one = tmp_path / "multi", tmp_path / "one"
  steps = ["--config.select.steps=8", "--config.checkpoint.every=100"]
  procs = _start_cli_workers(cfg_file, multi, "select", *steps, step_delay=1.0)
  metrics = multi / "select_bds" / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while (not metrics.exists() or len(M.read_jsonl(metrics)) < 2) and time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), _wait(procs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # a preemption notice on one host only
  outputs = _wait(procs)
  assert [p.returncode for p in procs] == [143, 143], "\n".join(o[-3000:] for o in outputs)
  saved = sorted(int(p.name) for p in (multi / "select_bds" / "ckpt").iterdir()
                 if p.name.isdigit())
  assert len(saved) == 1 and 2 <= saved[0] < 8, saved  # one agreed step, mid-phase
  assert "stopped after step %d of 8" % saved[0] in outputs[0]  # process 0 was not signalled

  outputs = _wait(_start_cli_workers(cfg_file, multi, "select", *steps))
  assert (multi / "select_bds" / "result.json").exists(), outputs[0][-3000:]
  assert [r["step"] for r in M.read_jsonl(metrics)] == list(range(1, 9))
  monkeypatch.setenv("BILEVEL_JAX_COMPILE_CACHE", "")  # the cache below, not the user's
  old_cache = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jit_cache"))
  try:
    assert cli.main(["select", "--config", str(cfg_file), f"--config.workdir={one}",
                     "--config.mesh.shape=1,1,1", *steps]) == 0
  finally:
    jax.config.update("jax_compilation_cache_dir", old_cache)
  assert _rel(np.load(multi / "select_bds" / "logits.npy"),
              np.load(one / "select_bds" / "logits.npy")) <= EST_RTOL
