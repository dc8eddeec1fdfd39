"""``bilevel-jax data summary --pool NAME``: counts, confound AUROCs and rejects of a pool.

Prints counts only, never text: the safety pools hold harmful text, which goes to files
(``--examples-out``, truncated) and never to the console.

Also runnable as ``python -m bilevel_jax.data.summary --pool NAME``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Sequence

import numpy as np

from bilevel_jax.data import lengths
from bilevel_jax.data.records import Record
from bilevel_jax.data.sources import POOL_NAMES, Pool, PoolParams, build_pool
from bilevel_jax.data.stats import auroc, separability, source_scores


def confounds(records: Sequence[Record], tokenizer=None) -> dict:
  """AUROC of response length and of source identity against the labels (bad = 1).

  Args:
    records: pool records (labels ``harmful``/``low_quality`` are the positive class).
    tokenizer: optional; length is then also measured in its tokens, and that is the headline
      ``length_auroc`` (the unit the model sees); otherwise ``length_auroc`` is in characters.
  Returns:
    ``{"length_auroc", "length_unit", "length_separability", "chars_auroc", "words_auroc",
    "source_auroc", ...}``. ``length_separability = max(a, 1 - a)`` is the number the ``<= 0.6``
    rule applies to. NaN when one label is absent.
  """
  y = np.array([r.is_bad for r in records], np.int64)
  chars = np.array([len(r.response) for r in records], np.float64)
  words = np.array([len(r.response.split()) for r in records], np.float64)
  out = {"n": len(records), "n_bad": int(y.sum()),
         "chars_auroc": auroc(chars, y), "words_auroc": auroc(words, y),
         "source_auroc": auroc(source_scores([r.source for r in records], y), y)}
  if tokenizer is not None:
    toks = np.array([len(tokenizer.encode(r.response)) for r in records], np.float64)
    out["tokens_auroc"] = auroc(toks, y)
    out["length_auroc"], out["length_unit"] = out["tokens_auroc"], "tokens"
  else:
    out["length_auroc"], out["length_unit"] = out["chars_auroc"], "chars"
  out["length_separability"] = separability(out["length_auroc"])
  return out


def describe(pool: Pool, tokenizer=None) -> dict:
  """Everything the summary prints, as a JSON-serializable dict."""
  counts = {}
  for split, recs in pool.splits.items():
    counts[split] = {
        "total": len(recs),
        "by_label": dict(sorted(collections.Counter(r.label for r in recs).items())),
        "by_source": dict(sorted(collections.Counter(r.source for r in recs).items())),
        "by_source_label": dict(sorted(collections.Counter(
            f"{r.source}/{r.label}" for r in recs).items())),
    }
  return {"pool": pool.name, "counts": counts,
          "confounds": confounds(pool.splits["pool"], tokenizer),
          "skipped": dict(sorted(pool.skipped.items())), "notes": pool.notes}


def write_examples(pool: Pool, path: str, per_label: int = 5, max_chars: int = 300) -> str:
  """A few examples per split and label, text truncated, to a JSONL *file* (never the console)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for split, recs in pool.splits.items():
      shown = collections.Counter()
      for r in recs:
        if shown[r.label] < per_label:
          shown[r.label] += 1
          f.write(json.dumps({"split": split, "example_id": r.example_id, "label": r.label,
                              "source": r.source, "question": r.question[:max_chars],
                              "response": r.response[:max_chars]}, ensure_ascii=False) + "\n")
  return path


def format_text(d: dict) -> str:
  lines = [f"pool {d['pool']}"]
  for split, c in d["counts"].items():
    labels = ", ".join(f"{k} {v}" for k, v in c["by_label"].items())
    lines.append(f"  {split:<10} {c['total']:>4}  ({labels})")
    for key, v in c["by_source_label"].items():
      lines.append(f"      {key:<32} {v:>4}")
  cf = d["confounds"]
  lines.append(f"  confounds on the pool (bad = harmful/low_quality, n={cf['n']}, "
               f"bad={cf['n_bad']}):")
  lines.append(f"      length AUROC ({cf['length_unit']}) {cf['length_auroc']:.3f} "
               f"(separability {cf['length_separability']:.3f})")
  lines.append(f"      chars AUROC {cf['chars_auroc']:.3f}, words AUROC {cf['words_auroc']:.3f}")
  lines.append(f"      source AUROC {cf['source_auroc']:.3f}")
  if d["notes"]:
    lines.append(f"  notes: {json.dumps(d['notes'])}")
  lines.append("  rows left out, by reason:" if d["skipped"] else "  rows left out: none")
  for k, v in d["skipped"].items():
    lines.append(f"      {k:<70} {v:>4}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point: ``--pool NAME`` (or ``all``), ``--seed``, ``--json``, ``--examples-out FILE``."""
  ap = argparse.ArgumentParser(prog="bilevel-jax data summary", description=__doc__.split("\n")[0])
  ap.add_argument("--pool", required=True, choices=(*POOL_NAMES, "all"))
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", action="store_true", help="print JSON instead of text")
  ap.add_argument("--examples-out", default=None,
                  help="write a few truncated examples per label to this JSONL file")
  args = ap.parse_args(argv)
  names = POOL_NAMES if args.pool == "all" else (args.pool,)
  try:
    tokenizer = lengths.smollm2_tokenizer()
  except (FileNotFoundError, ImportError):
    tokenizer = None  # lengths in characters only
  out = []
  for name in names:
    pool = build_pool(name, PoolParams(seed=args.seed))
    d = describe(pool, tokenizer)
    if args.examples_out:
      path = args.examples_out if len(names) == 1 else f"{args.examples_out}.{name}.jsonl"
      d["examples_file"] = write_examples(pool, path)
    out.append(d)
  if args.json:
    print(json.dumps(out if len(out) > 1 else out[0], indent=2))
  else:
    print("\n\n".join(format_text(d) for d in out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
