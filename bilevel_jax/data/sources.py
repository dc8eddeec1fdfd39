"""The embedded pools: each a pool, a validation set and a test set, built from PyPI data packages.

Pools (see ``docs/data.md`` for the reasoning and the measured confounds):

* ``safety_matched``: uncensorbench prompts; compliant answers to some prompts (``harmful``) and
  refusals to others (``refusal``), both cut to one length distribution. Validation: pyrit's
  refusals (another source and style) plus good benign answers. Test: AdvBench harmful prompts
  (no responses) plus benign prompts with reference answers.
* ``safety_matched_easy``: the same pool and test set; validation refusals are uncensorbench
  refusals to further prompts (same template as the pool's refusals: explicitly easy).
* ``safety``: realistic mix; benign good pairs (forgelm, ifbench, pyrit) and harmful compliant
  pairs (pyrit many-shot, uncensorbench); validation and test as ``safety_matched``.
* ``quality`` / ``quality_easy``: good pairs plus length-preserving corruptions (and, in the easy
  variant, truncated and near-empty answers too); validation and test are held-out good pairs.
* ``math``: reasoning-gym ``gsm_symbolic`` pairs, some with a wrong final number (same length);
  validation and test from the 256 GSM8K rows.

Every normalized question appears at most once in a pool's three splits together (duplicates are
skipped and counted), and :func:`assert_no_leak` checks it at build time.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Callable, Sequence

from bilevel_jax.data import lengths, packages
from bilevel_jax.data.corruptions import EASY_KINDS, HARD_KINDS, corrupt_many, match_lengths
from bilevel_jax.data.records import (DataError, Record, assign_indices, normalize_text,
                                      stable_id, validate_record)


@dataclasses.dataclass(frozen=True)
class PoolParams:
  """Sizes and seeds of the embedded pools (defaults fit a 2-core CPU demo).

  Attributes:
    seed: the one seed of every random choice in a pool.
    n_good, n_harmful: ``safety`` pool halves.
    matched_val_per_topic: uncensorbench prompts per topic (of 10) kept out of
      ``safety_matched``'s pool for the easy validation set.
    match_tokens: the ``[lo, hi]`` response length (in ``length_unit``) both labels of
      ``safety_matched`` are cut to.
    length_unit: ``smollm2_tokens`` (default: what the embedded model sees), ``approx_tokens``
      or ``chars`` (see :mod:`bilevel_jax.data.lengths`).
    n_val_refusal, n_val_good: safety validation (pyrit refusals, good benign answers).
    n_test_harmful, n_test_benign: safety test prompts.
    quality_n_val, quality_n_test, low_quality_ratio: ``quality`` splits and share of corrupted
      pool pairs.
    math_n_pool, math_wrong_ratio, math_n_val: ``math`` pool size, share with a wrong final
      number, GSM8K rows for validation (the rest of the 256 are the test set).
    include_sharegpt, sharegpt_path, sharegpt_n: opt-in ShareGPT good pairs.
  """

  seed: int = 0
  n_good: int = 150
  n_harmful: int = 150
  matched_val_per_topic: int = 2
  match_tokens: tuple[int, int] = (12, 36)
  length_unit: str = "smollm2_tokens"
  n_val_refusal: int = 28
  n_val_good: int = 28
  n_test_harmful: int = 100
  n_test_benign: int = 50
  quality_n_val: int = 30
  quality_n_test: int = 40
  low_quality_ratio: float = 0.3
  math_n_pool: int = 300
  math_wrong_ratio: float = 0.5
  math_n_val: int = 64
  include_sharegpt: bool = False
  sharegpt_path: str = ""
  sharegpt_n: int = 200


@dataclasses.dataclass
class Pool:
  """A built pool: records per split (``pool`` sorted by ``example_id``; ``index`` = position)."""

  name: str
  splits: dict[str, list[Record]]
  skipped: collections.Counter
  notes: dict

  def index_map(self) -> dict[str, int]:
    """``example_id -> row`` of the weight vector (pool records sorted by ``example_id``)."""
    return assign_indices(self.splits["pool"])


class _Taker:
  """Draws records whose normalized question is not taken yet, counting what it skips.

  Each draw shuffles with its own stream (seed and ``what``), so changing one draw (say, the
  validation refusals of the easy variant) leaves the others as they were.
  """

  def __init__(self, seed: int, skipped: collections.Counter):
    self.seed, self.skipped, self.taken, self.used_ids = seed, skipped, set(), set()

  def take(self, cands: Sequence[Record], n: int | None, split: str, what: str,
           exclude: frozenset = frozenset()) -> list[Record]:
    """Up to ``n`` (all if None) candidates with fresh questions not in ``exclude``."""
    kept = [r for r in cands if normalize_text(r.question) not in exclude]
    if len(kept) < len(cands):
      self.skipped[f"{what}: question also in another safety source (excluded)"] += \
          len(cands) - len(kept)
    cands = kept
    cands = sorted(cands, key=lambda r: r.example_id)
    random.Random(f"{self.seed}:{what}").shuffle(cands)
    out = []
    for rec in cands:
      if n is not None and len(out) == n:
        break
      key = normalize_text(rec.question)
      if rec.example_id in self.used_ids:
        continue  # already drawn into another split: not a duplicate
      if key in self.taken:
        self.skipped[f"{what}: question already used (normalized duplicate)"] += 1
        continue
      self.taken.add(key)
      self.used_ids.add(rec.example_id)
      out.append(dataclasses.replace(rec, split=split))
    if n is not None and len(out) < n:
      raise ValueError(f"{what}: only {len(out)} records available for {n} requested; "
                       f"lower the size in PoolParams")
    return out


def _benign_goods(p: PoolParams, skipped: collections.Counter) -> tuple[list[Record],
                                                                      list[Record]]:
  """Good benign pairs of every enabled source, and pyrit's refusals (read in the same pass)."""
  recs, s = packages.forgelm()
  skipped.update(s)
  more, s = packages.ifbench()
  recs += more
  skipped.update(s)
  good, refusals, s = packages.pyrit_scorer_rows()
  recs += good
  skipped.update(s)
  if p.include_sharegpt:
    more, s = packages.sharegpt_first_turns(p.sharegpt_path, p.sharegpt_n)
    recs += more
    skipped.update(s)
  return recs, refusals


def _uncensorbench_record(row: dict, label: str) -> Record:
  resp = row["uncensored_response"] if label == "harmful" else row["censored_response"]
  return Record(stable_id("uncensorbench", row["id"], label), row["prompt"].strip(),
                resp.strip(), "uncensorbench", label,
                meta={"id": row["id"], "topic": row["topic"], "subtopic": row["subtopic"]})


def _safety_eval(p: PoolParams, taker: _Taker, goods: list[Record], val_refusals: list[Record]):
  """Validation (given refusals + good benign answers) and test (AdvBench + benign prompts).

  AdvBench prompts that are also pyrit refusal-scorer or uncensorbench questions are never test
  prompts, whichever validation set a variant uses, so all safety pools share one test set.
  """
  _, pyrit_refusals, _ = packages.pyrit_scorer_rows()
  seen_elsewhere = frozenset(normalize_text(q) for q in
                             [r.question for r in pyrit_refusals] +
                             [row["prompt"] for row in packages.uncensorbench()])
  val = taker.take(val_refusals, None, "validation", "validation refusals")
  val += taker.take(goods, p.n_val_good, "validation", "validation good")
  benign_test = taker.take(goods, p.n_test_benign, "test", "test benign")
  adv = [Record(stable_id("advbench", str(i)), q, "", "advbench", "harmful",
                meta={"row": i, "prompt_only": True}) for i, q in enumerate(packages.advbench())]
  test = taker.take(adv, p.n_test_harmful, "test", "test harmful", exclude=seen_elsewhere)
  test += benign_test
  return val, test


def _safety_matched(p: PoolParams, easy: bool) -> Pool:
  rng, skipped = random.Random(p.seed), collections.Counter()
  taker = _Taker(p.seed, skipped)
  by_topic = collections.defaultdict(list)
  for row in packages.uncensorbench():
    by_topic[row["topic"]].append(row)
  harmful, refusal, easy_val = [], [], []
  for topic in sorted(by_topic):
    rows = sorted(by_topic[topic], key=lambda r: r["id"])
    rng.shuffle(rows)
    k = p.matched_val_per_topic
    easy_val += [_uncensorbench_record(r, "refusal") for r in rows[:k]]
    half = (len(rows) - k) // 2
    harmful += [_uncensorbench_record(r, "harmful") for r in rows[k:k + half]]
    refusal += [_uncensorbench_record(r, "refusal") for r in rows[k + half:]]
  lo, hi = p.match_tokens
  fn, unit = lengths.length_fn(p.length_unit)
  harmful, refusal = match_lengths([harmful, refusal], lo, hi, rng, fn)
  pool = taker.take(harmful + refusal, None, "pool", "pool")
  goods, pyrit_refusals = _benign_goods(p, skipped)
  val_refusals = easy_val if easy else pyrit_refusals[:p.n_val_refusal]
  val, test = _safety_eval(p, taker, goods, val_refusals)
  name = "safety_matched_easy" if easy else "safety_matched"
  return _finish(name, pool, val, test, skipped, {"match_lengths": [lo, hi], "length_unit": unit})


def _safety(p: PoolParams) -> Pool:
  rng, skipped = random.Random(p.seed), collections.Counter()
  taker = _Taker(p.seed, skipped)
  goods, refusals = _benign_goods(p, skipped)
  val, test = _safety_eval(p, taker, goods, refusals[:p.n_val_refusal])
  harmful, s = packages.pyrit_many_shot()
  skipped.update(s)
  harmful += [_uncensorbench_record(r, "harmful") for r in packages.uncensorbench()]
  pool = taker.take(goods, p.n_good, "pool", "pool good")
  pool += taker.take(harmful, p.n_harmful, "pool", "pool harmful")
  return _finish("safety", pool, val, test, skipped, {})


def _quality(p: PoolParams, easy: bool) -> Pool:
  rng, skipped = random.Random(p.seed), collections.Counter()
  taker = _Taker(p.seed, skipped)
  goods, _ = _benign_goods(p, skipped)
  val = taker.take(goods, p.quality_n_val, "validation", "validation good")
  test = taker.take(goods, p.quality_n_test, "test", "test good")
  side = taker.take(goods, None, "pool", "pool")
  side.sort(key=lambda r: r.example_id)
  rng.shuffle(side)
  n_bad = round(p.low_quality_ratio * len(side))
  kinds = HARD_KINDS + EASY_KINDS if easy else HARD_KINDS
  bad, counts = corrupt_many(side[:n_bad], kinds, rng, donors=side)
  name = "quality_easy" if easy else "quality"
  return _finish(name, side[n_bad:] + bad, val, test, skipped, {"corruptions": counts})


def _math(p: PoolParams) -> Pool:
  rng, skipped = random.Random(p.seed), collections.Counter()
  taker = _Taker(p.seed, skipped)
  rows = packages.gsm8k()
  gsm = [Record(stable_id("gsm8k", str(i)), r["problem"].strip(),
                packages.clean_gsm8k_solution(r["reference"]).strip(), "gsm8k", "good",
                meta={"row": i, "answer": r["reference"].rsplit("####", 1)[-1].strip()})
         for i, r in enumerate(rows, start=1)]
  val = taker.take(gsm, p.math_n_val, "validation", "validation gsm8k")
  test = taker.take(gsm, None, "test", "test gsm8k")
  gen, s = packages.gsm_symbolic(p.math_n_pool, seed=p.seed)  # meta["answer"]: text after ####
  skipped.update(s)
  side = taker.take(gen, None, "pool", "pool gsm_symbolic")
  n_bad = round(p.math_wrong_ratio * len(side))
  bad, counts = corrupt_many(side[:n_bad], ("wrong_number",), rng)
  return _finish("math", side[n_bad:] + bad, val, test, skipped, {"corruptions": counts})


def assert_no_leak(splits: dict[str, list[Record]]):
  """Raises if a test question is in the pool or validation set, or a validation question is in
  the pool (exact or normalized text)."""
  norm = {s: {normalize_text(r.question) for r in recs} for s, recs in splits.items()}
  for a, b in (("test", "pool"), ("test", "validation"), ("validation", "pool")):
    leak = norm.get(a, set()) & norm.get(b, set())
    if leak:
      raise AssertionError(f"{len(leak)} {a} question(s) also in {b}, e.g. {sorted(leak)[0][:60]!r}")


def _finish(name, pool, val, test, skipped, notes) -> Pool:
  splits = {"pool": pool, "validation": val, "test": test}
  for split, recs in splits.items():
    seen = set()
    for i, r in enumerate(recs):
      validate_record(r, f"<pool {name}:{split}>", i)
      if r.example_id in seen:
        raise DataError(f"<pool {name}:{split}>", i, "example_id", "duplicate_id",
                        f"duplicate example_id {r.example_id!r}")
      seen.add(r.example_id)
    splits[split] = sorted(recs, key=lambda r: r.example_id)
  assert_no_leak(splits)
  return Pool(name, splits, skipped, notes)


BUILDERS: dict[str, Callable[[PoolParams], Pool]] = {
    "safety_matched": lambda p: _safety_matched(p, easy=False),
    "safety_matched_easy": lambda p: _safety_matched(p, easy=True),
    "safety": _safety,
    "quality": lambda p: _quality(p, easy=False),
    "quality_easy": lambda p: _quality(p, easy=True),
    "math": _math,
}
POOL_NAMES = tuple(BUILDERS)


def build_pool(name: str, params: PoolParams | None = None) -> Pool:
  """Builds one embedded pool from the installed data packages (about a second).

  Args:
    name: one of :data:`POOL_NAMES`.
    params: sizes and seed; defaults fit a CPU demo.
  Returns:
    The :class:`Pool`; every record validated, no leaks between splits.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown pool {name!r} (available: {', '.join(POOL_NAMES)})")
  return BUILDERS[name](params or PoolParams())
