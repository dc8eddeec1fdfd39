"""Training sets of the run chain's methods (no model: arrays only)."""

import types

import numpy as np
import pytest

from bilevel_jax import config as C
from bilevel_jax import experiment


def _ctx(with_validation: bool, n_pool=10, n_val=4, t=6):
  cfg = C.base_config()
  cfg.finetune.with_validation = with_validation
  cfg.select.keep_fraction = 0.5

  def arrays(n, offset):
    tokens = (np.arange(n * t).reshape(n, t) + offset).astype(np.int32)
    return {"tokens": tokens, "targets": tokens, "positions": np.tile(np.arange(t), (n, 1)),
            "segment_ids": np.ones((n, t), np.int32), "loss_mask": np.ones((n, t), np.float32),
            "index": np.arange(n, dtype=np.int32), "weight": np.ones(n, np.float32)}

  return types.SimpleNamespace(cfg=cfg, pool=list(range(n_pool)), pool_arrays=arrays(n_pool, 0),
                               val_arrays=arrays(n_val, 1000))


SEL = {"bds": {"keep": np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0], bool),
               "train_weights": np.linspace(0.5, 1.5, 10).astype(np.float32)}}


@pytest.mark.parametrize("with_validation", [False, True])
def test_with_validation_adds_the_validation_pairs_to_every_method(with_validation):
  ctx = _ctx(with_validation)
  base = np.zeros(10)
  val_rows = {int(x) for x in ctx.val_arrays["tokens"][:, 0]}
  for method, n_pool_rows in (("bds", 5), ("random_selection", 5), ("full_sft", 10),
                              ("loss_filter", 5), ("direct_mixing", 10), ("val_only", 0)):
    a = experiment._method_arrays(ctx, method, SEL, base)
    first = {int(x) for x in a["tokens"][:, 0]}
    has_val = val_rows <= first
    always = method in ("direct_mixing", "val_only")
    assert has_val == (with_validation or always), method
    assert len(a["weight"]) == n_pool_rows + (4 if has_val else 0), method
    assert list(a["index"]) == list(range(len(a["weight"])))
  bds = experiment._method_arrays(ctx, "bds", SEL, base)
  # BDS rows keep their selection weights; validation pairs weigh 1.
  np.testing.assert_array_equal(bds["weight"][:5], SEL["bds"]["train_weights"][::2])
  if with_validation:
    np.testing.assert_array_equal(bds["weight"][5:], np.ones(4, np.float32))
