"""Pool construction pieces: corruptions, length matching, leak checks, package readers."""

import json
import random

import numpy as np
import pytest

from bilevel_jax.data import corruptions as C
from bilevel_jax.data import packages
from bilevel_jax.data.records import Record, normalize_text
from bilevel_jax.data.sources import assert_no_leak
from bilevel_jax.data.stats import auroc, separability, source_scores

TEXT = "First we add. Then we multiply the two numbers. Finally we check the sum. The answer is 448."


def rec(i, response=TEXT, source="s", question=None, meta=None):
  return Record(f"r{i}", question or f"question {i}", response, source, "good", meta=meta or {})


def test_auroc_matches_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 4, 40).astype(float)  # many ties
  y = rng.integers(0, 2, 40)
  pos, neg = s[y == 1], s[y == 0]
  want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
  assert auroc(s, y) == pytest.approx(want, abs=1e-12)
  assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
  assert auroc([5, 5, 5], [0, 1, 1]) == 0.5 and np.isnan(auroc([1, 2], [1, 1]))
  assert separability(0.3) == pytest.approx(0.7)
  with pytest.raises(ValueError, match="NaN"):
    auroc([np.nan, 1], [0, 1])


def test_source_scores_give_auroc_one_when_source_is_the_label():
  y = [1, 1, 0, 0, 1, 0]
  assert auroc(source_scores(["a", "a", "b", "b", "a", "b"], y), y) == 1.0
  assert auroc(source_scores(["a", "b", "a", "b", "a", "b"], [1, 1, 0, 0, 0, 0]), [1, 1, 0, 0, 0, 0]) == 0.5


def test_wrong_number_keeps_length_and_changes_the_final_answer():
  text = "First = 14\nSecond = 3 * 14 = 42\nOne dose = 14 + 42 = 448\n#### 448"
  for seed in range(20):
    bad = C.wrong_final_number(text, random.Random(seed), answer="448")
    assert len(bad) == len(text) and bad != text
    assert bad.split("\n")[:2] == text.split("\n")[:2]
    new = bad.rsplit("#### ", 1)[1]
    assert new != "448" and len(new) == 3 and new[0] != "0"
    assert bad.split("\n")[2].endswith(new)  # the last step agrees with the wrong answer
  assert C.wrong_final_number("no digits here", random.Random(0)) is None


@pytest.mark.parametrize("kind", C.HARD_KINDS)
def test_hard_corruptions_keep_length_and_label_the_copy(kind):
  donors = [rec(1), rec(2, response="Another answer of a similar size. It is fine and good. Truly it is quite ok, I promise!"),
            rec(3, source="other", response="x" * len(TEXT))]
  bad = C.corrupt(rec(0), kind, random.Random(0), donors)
  assert bad.label == "low_quality" and bad.meta["corruption"] == kind
  assert bad.example_id != "r0" and bad.meta["original_id"] == "r0" and bad.question == "question 0"
  assert bad.response != TEXT and abs(len(bad.response) - len(TEXT)) <= 30
  if kind == "swap":  # same source only, nearest length
    assert bad.response == donors[1].response
  if kind == "shuffle_sentences":
    assert sorted(C.sentences(bad.response)) == sorted(C.sentences(TEXT))


def test_easy_corruptions_and_fallback():
  rng = random.Random(0)
  assert len(C.corrupt(rec(0), "truncate", rng).response) <= len(TEXT) // 4
  assert C.corrupt(rec(0), "near_empty", rng).response in C.NEAR_EMPTY
  # One sentence, no number, no donor: only near_empty applies, and corrupt_many falls through.
  out, counts = C.corrupt_many([rec(0, response="Just words")], ["swap", "shuffle_sentences",
                                                                 "near_empty"], rng)
  assert counts == {"near_empty": 1}
  with pytest.raises(ValueError, match="no corruption"):
    C.corrupt_many([rec(0, response="Just words")], ["swap"], rng)


def test_match_lengths_gives_both_groups_the_same_length_distribution():
  rng = random.Random(0)
  words = "alpha beta gamma delta epsilon zeta eta theta".split()
  long_words = [" ".join(random.Random(i).choices(words, k=80)) for i in range(50)]
  short_words = [" ".join(["a b c d e"] * 60) for _ in range(50)]
  g1 = [rec(i, response=t) for i, t in enumerate(long_words)]
  g2 = [rec(100 + i, response=t) for i, t in enumerate(short_words)]
  a, b = C.match_lengths([g1, g2], 60, 200, rng, length_fn=len)
  la, lb = [len(r.response) for r in a], [len(r.response) for r in b]
  assert max(la + lb) <= 210 and min(la + lb) >= 50
  y = [1] * 50 + [0] * 50
  assert separability(auroc(la + lb, y)) < 0.6
  assert all("cut_from_chars" in r.meta for r in a)


def test_cut_near_picks_the_nearest_word_boundary():
  assert C.cut_near("aaaa bbbbbbbbbb cc", 6) == "aaaa"
  assert C.cut_near("aaaa bbbbbbbbbb cc", 14) == "aaaa bbbbbbbbbb"
  assert C.cut_near("short", 10) == "short"


def test_approx_tokens_counts_digits_singly():
  assert C.approx_tokens("12345") == 5
  assert C.approx_tokens("the cat sat") == 3


def test_assert_no_leak_uses_normalized_text():
  splits = {"pool": [rec(0, question="What is 2+2?")],
            "validation": [rec(1, question="Other?")],
            "test": [rec(2, question="what is 2 + 2")]}
  assert normalize_text("What is 2+2?") == normalize_text("what is 2 + 2")
  with pytest.raises(AssertionError, match="1 test question"):
    assert_no_leak(splits)
  splits["test"] = [rec(2, question="fresh")]
  assert_no_leak(splits)


def test_sharegpt_reader_handles_a_truncated_array(tmp_path):
  convs = [{"id": "a", "conversations": [{"from": "human", "value": "Hi there?"},
                                         {"from": "gpt", "value": "Hello! " * 10}]},
           {"id": "b", "conversations": [{"from": "gpt", "value": "no human turn first"}]}]
  text = json.dumps(convs)[:-1] + ', {"id": "c", "conversations": [{"from": "hu'
  p = tmp_path / "sg.json"
  p.write_text(text)
  out, skipped = packages.sharegpt_first_turns(str(p), limit=10)
  assert [r.question for r in out] == ["Hi there?"] and out[0].source == "sharegpt"
  assert skipped == {"sharegpt: no human->gpt first turn": 1,
                     "sharegpt: truncated object at end of file": 1}


def test_gsm8k_reads_from_a_wheel_with_zipfile(tmp_path):
  import zipfile
  wheel = tmp_path / "senbonzakura-0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("senbonzakura/data/capability-gsm8k.jsonl",
               json.dumps({"problem": "1+1?", "reference": "1+1=<<1+1=2>>2\n#### 2"}) + "\n")
  rows = packages.gsm8k(wheel=str(wheel))
  assert rows == [{"problem": "1+1?", "reference": "1+1=<<1+1=2>>2\n#### 2"}]
  assert packages.clean_gsm8k_solution(rows[0]["reference"]) == "1+1=2\n#### 2"


def test_refusal_phrases():
  assert packages.is_refusal("I'm sorry, but I can't help with that.")
  assert not packages.is_refusal("Sure! Here is a recipe.")


def test_missing_package_error_says_how_to_install(monkeypatch):
  monkeypatch.setitem(packages.MODULES, "uncensorbench", "no_such_module_xyz")
  with pytest.raises(packages.MissingPackageError, match="pip install --no-deps uncensorbench=="):
    packages.package_dir("uncensorbench")
