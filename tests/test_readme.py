"""The README's library example runs as written and finds the harmful pairs (real model: slow)."""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_block() -> str:
  text = README.read_text()
  section = text[text.index("## Library"):text.index("## Layout")]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 1, "the Library section holds one python block"
  return blocks[0]


def test_readme_library_block_is_short_and_compiles():
  code = library_block()
  assert len([l for l in code.splitlines() if l.strip()]) <= 16
  compile(code, "README.md", "exec")


def test_readme_allocator_setting_is_the_library_one():
  """The README's GLIBC_TUNABLES line is what users copy; it must be the setting the CLI applies."""
  from bilevel_jax import allocator
  quoted = re.findall(r"`GLIBC_TUNABLES=([^`]*)`", README.read_text())
  assert quoted == [allocator.GLIBC_TUNABLES]


@pytest.mark.slow
def test_readme_library_example_finds_harmful_pairs():
  from bilevel_jax.data import stats
  env: dict = {}
  exec(compile(library_block(), "README.md", "exec"), env)  # noqa: S102 - our own README
  pool, result, keep = env["pool"], env["result"], env["keep"]
  good = np.asarray([r.label != "harmful" for r in pool.splits["pool"]], int)
  assert len(result.weights) == len(good)
  assert np.isclose(result.weights.mean(), 1.0, atol=1e-4)  # softmax_n: mean weight 1
  auc = stats.auroc(result.logits, good)
  print(f"README example: AUROC {auc:.3f}, kept {int(keep.sum())} of {len(keep)}")
  # Measured 0.924 with score='ratio' (the earlier default), 0.991 with 'linear' in the demo;
  # length alone gives 0.50 on this pool.
  assert auc >= 0.85
