"""Checkpoint round trip, fingerprint refusal and fallback from a corrupt or partial latest step."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax import checkpoint as ckpt


def _state(seed: int):
  key = jax.random.key(seed)
  params = {"w": jax.random.normal(key, (4, 3)), "b": jnp.arange(3, dtype=jnp.float32) * seed}
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  logits = jax.random.normal(jax.random.fold_in(key, 1), (7,))
  return {"params": params, "opt_state": opt_state, "logits": logits,
          "logits_opt_state": optax.adam(1e-1).init(logits), "count": jnp.int32(seed)}


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _manager(tmp_path, fingerprint="sha256:aa"):
  return ckpt.Checkpointer(tmp_path / "ckpt", fingerprint=fingerprint, config={"seed": 3},
                           max_to_keep=3)


def test_round_trip_restores_everything_bitwise(tmp_path):
  data_state = {"next_index": 5, "raw": b"\x00\xffgrain", "nested": [1, {"b": b"x"}]}
  with _manager(tmp_path) as m:
    m.save(1, _state(1), data_state={"next_index": 1}, extra={"nonfinite": 0})
    m.save(2, _state(2), data_state=data_state, extra={"nonfinite": 1, "name": "bds"})
  with _manager(tmp_path) as m:
    got = m.restore_latest(_state(0))
  assert got.step == 2 and got.skipped == []
  _assert_bitwise_equal(got.state, _state(2))
  assert got.data_state == data_state
  assert got.extra == {"nonfinite": 1, "name": "bds"}
  assert got.config == {"seed": 3}
  # The optimizer state keeps its optax NamedTuple structure.
  assert type(got.state["opt_state"][0]).__name__ == "ScaleByAdamState"


def test_per_layer_params_round_trip_as_a_tuple(tmp_path):
  """``TrainableSpec(per_layer=True)`` keeps layers in a tuple; it must come back as one."""
  layers = tuple({"w": jnp.full((2, 3), float(i)), "n": jnp.arange(3.0) + i} for i in range(3))
  state = {"params": {"layers": layers, "embed": jnp.ones((4, 2))}, "count": jnp.int32(7)}
  with _manager(tmp_path) as m:
    m.save(1, state)
  template = jax.tree.map(jnp.zeros_like, state)
  with _manager(tmp_path) as m:
    got = m.restore_latest(template)
  assert isinstance(got.state["params"]["layers"], tuple)
  _assert_bitwise_equal(got.state, state)


def test_empty_directory_gives_none(tmp_path):
  with _manager(tmp_path) as m:
    assert m.restore_latest(_state(0)) is None


def test_other_dataset_fingerprint_is_refused(tmp_path):
  with _manager(tmp_path, "sha256:aa") as m:
    m.save(1, _state(1))
  with _manager(tmp_path, "sha256:bb") as m:
    with pytest.raises(ckpt.FingerprintMismatch, match=r"sha256:aa.*sha256:bb"):
      m.restore_latest(_state(0))


def _save_three(tmp_path):
  with _manager(tmp_path) as m:
    for s in (1, 2, 3):
      m.save(s, _state(s), data_state={"i": s})
  return tmp_path / "ckpt"


def test_corrupt_latest_state_falls_back_to_previous(tmp_path):
  root = _save_three(tmp_path)
  # Truncate every data file of the newest checkpoint's array item.
  files = [p for p in (root / "3" / "state").rglob("*") if p.is_file()]
  assert files
  for p in files:
    p.write_bytes(b"")
  with _manager(tmp_path) as m:
    got = m.restore_latest(_state(0))
  assert got.step == 2 and got.skipped == [3] and got.data_state == {"i": 2}
  _assert_bitwise_equal(got.state, _state(2))


def test_corrupt_latest_meta_falls_back_to_previous(tmp_path):
  root = _save_three(tmp_path)
  metas = [p for p in (root / "3" / "meta").rglob("*") if p.is_file()]
  for p in metas:
    p.write_text("{not json")
  with _manager(tmp_path) as m:
    got = m.restore_latest(_state(0))
  assert got.step == 2 and got.skipped == [3]


def test_partial_save_directory_is_ignored(tmp_path):
  root = _save_three(tmp_path)
  # What a process killed mid-save leaves behind: a temporary directory for the next step.
  tmp = root / "4.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "junk").write_bytes(b"partial")
  with _manager(tmp_path) as m:
    assert m.all_steps() == [1, 2, 3]
    got = m.restore_latest(_state(0))
  assert got.step == 3


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
  root = _save_three(tmp_path)
  for s in (1, 2, 3):
    for p in (root / str(s) / "meta").rglob("*"):
      if p.is_file():
        p.write_text("garbage")
  with _manager(tmp_path) as m:
    with pytest.raises(ckpt.NoUsableCheckpoint, match="could be restored"):
      m.restore_latest(_state(0))


def test_json_safe_round_trip_and_fingerprint_stability():
  obj = {"a": b"\x01\x02", "b": [np.int64(3), "s"], "c": {"d": 1.5}}
  enc = ckpt.to_json_safe(obj)
  import json
  assert ckpt.from_json_safe(json.loads(json.dumps(enc))) == {"a": b"\x01\x02", "b": [3, "s"],
                                                               "c": {"d": 1.5}}
  f1 = ckpt.dataset_fingerprint([("id1", "q", "r"), {"max_len": 64}])
  assert f1 == ckpt.dataset_fingerprint([("id1", "q", "r"), {"max_len": 64}])
  assert f1 != ckpt.dataset_fingerprint([("id1", "q", "r2"), {"max_len": 64}])
  assert f1 != ckpt.dataset_fingerprint([{"max_len": 64}, ("id1", "q", "r")])


def test_max_to_keep_below_two_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    ckpt.Checkpointer(tmp_path, fingerprint="x", max_to_keep=1)


def test_gs_url_reaches_orbax_intact(monkeypatch):
  """``gs://bucket/x`` stays a URL all the way into orbax (``pathlib`` made it ``gs:/bucket/x``).

  No network: orbax's manager is replaced by a stub that records the directory it is given.
  """
  from bilevel_jax import config as C

  seen = {}

  class StubManager:
    def __init__(self, directory, *args, **kwargs):
      seen["directory"] = directory

    def wait_until_finished(self):
      pass

    def close(self):
      pass

  monkeypatch.setattr(ckpt.ocp, "CheckpointManager", StubManager)
  cfg = C.base_config()
  cfg.workdir = "gs://bucket/x"
  workdir = C.workdir(cfg)
  assert str(workdir) == "gs://bucket/x"
  with ckpt.Checkpointer(workdir / "select_bds" / "ckpt", fingerprint="sha256:aa") as c:
    assert str(c.directory) == "gs://bucket/x/select_bds/ckpt"
  assert str(seen["directory"]) == "gs://bucket/x/select_bds/ckpt"
  with ckpt.Checkpointer("gs://bucket/x/ckpt", fingerprint="sha256:aa"):  # a plain string too
    assert str(seen["directory"]) == "gs://bucket/x/ckpt"
  # Local paths are still made absolute.
  ckpt.Checkpointer("rel/ckpt", fingerprint="sha256:aa")
  assert str(seen["directory"]) == str(Path("rel/ckpt").absolute())
  cfg.workdir = ""
  assert C.workdir(cfg) == Path("runs") / cfg.name
