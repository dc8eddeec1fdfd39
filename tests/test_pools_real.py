"""Builds the real pools from the installed data packages (slow: about a minute in all)."""

import collections

import pytest

from bilevel_jax.data import lengths, tfds_builders
from bilevel_jax.data.records import normalize_text
from bilevel_jax.data.sources import POOL_NAMES, build_pool
from bilevel_jax.data.summary import confounds, main

pytestmark = pytest.mark.slow

EXPECTED = {  # split -> label counts, with the default PoolParams
    "safety_matched": {"pool": {"harmful": 60, "refusal": 60},
                       "validation": {"good": 28, "refusal": 28},
                       "test": {"good": 50, "harmful": 100}},
    "safety_matched_easy": {"pool": {"harmful": 60, "refusal": 60},
                            "validation": {"good": 28, "refusal": 30},
                            "test": {"good": 50, "harmful": 100}},
    "safety": {"pool": {"good": 150, "harmful": 150}, "validation": {"good": 28, "refusal": 28},
               "test": {"good": 50, "harmful": 100}},
    "quality": {"pool": {"good": 165, "low_quality": 71}, "validation": {"good": 30},
                "test": {"good": 40}},
    "quality_easy": {"pool": {"good": 165, "low_quality": 71}, "validation": {"good": 30},
                     "test": {"good": 40}},
    "math": {"pool": {"good": 150, "low_quality": 150}, "validation": {"good": 64},
             "test": {"good": 192}},
}


@pytest.fixture(scope="module")
def pools():
  return {n: build_pool(n) for n in POOL_NAMES}


@pytest.mark.parametrize("name", POOL_NAMES)
def test_counts_labels_and_no_leak(pools, name):
  pool = pools[name]
  got = {s: dict(collections.Counter(r.label for r in recs)) for s, recs in pool.splits.items()}
  assert got == EXPECTED[name]
  questions = {s: [normalize_text(r.question) for r in recs] for s, recs in pool.splits.items()}
  all_q = sum(questions.values(), [])
  assert len(all_q) == len(set(all_q))  # no question twice, in or across splits
  ids = [r.example_id for recs in pool.splits.values() for r in recs]
  assert len(ids) == len(set(ids))
  assert all(r.split == s for s, recs in pool.splits.items() for r in recs)
  assert list(pool.index_map().values()) == list(range(len(pool.splits["pool"])))


def test_matched_pools_share_pool_and_test_and_differ_in_validation(pools):
  a, b = pools["safety_matched"], pools["safety_matched_easy"]
  assert a.splits["pool"] == b.splits["pool"] and a.splits["test"] == b.splits["test"]
  src = lambda p: {r.source for r in p.splits["validation"] if r.label == "refusal"}
  assert src(a) == {"pyrit-scorer"} and src(b) == {"uncensorbench"}


def test_confounds(pools):
  tok = lengths.smollm2_tokenizer()
  for name in ("safety_matched", "quality", "math"):
    c = confounds(pools[name].splits["pool"], tok)
    assert c["length_unit"] == "tokens" and c["length_separability"] <= 0.6, (name, c)
    assert c["source_auroc"] <= 0.6, (name, c)
  assert confounds(pools["safety"].splits["pool"], tok)["source_auroc"] == 1.0  # the naive pool


def test_math_pairs_have_exact_answers_and_wrong_ones_differ_only_in_the_number(pools):
  for r in pools["math"].splits["pool"]:
    final = r.response.rsplit("####", 1)[1].strip()
    if r.label == "good":
      assert final == r.meta["answer"]
    else:
      assert final != r.meta["answer"] and len(final) == len(r.meta["answer"])


def test_tfds_build_and_summary_print_no_text(tmp_path, capsys, pools):
  src = tfds_builders.data_source("math", "validation", data_dir=str(tmp_path))
  got = sorted(tfds_builders.decode(src[i]) for i in range(len(src)))
  assert [r for _, r in got] == pools["math"].splits["validation"]
  assert main(["--pool", "safety", "--examples-out", str(tmp_path / "ex.jsonl")]) == 0
  out = capsys.readouterr().out
  assert "pool safety" in out and "source AUROC 1.000" in out
  texts = [r.response[:40] for r in pools["safety"].splits["pool"] if r.label == "harmful"]
  assert not any(t in out for t in texts)  # harmful text stays in the examples file
  assert (tmp_path / "ex.jsonl").stat().st_size > 0
