"""Documented ways to make low-quality pairs from good ones, and length matching.

The *hard* corruptions keep the response's length (within a few characters), so that length
cannot give the label away: ``swap`` (another question's answer from the same source, the one of
nearest length), ``wrong_number`` (one digit of the last number changed), ``shuffle_sentences``,
``repeat_sentences`` (the first sentences repeated to the original length). The *easy* ones change
the length: ``truncate`` (first quarter of the answer) and ``near_empty``.

Every function takes an explicit ``random.Random`` so pools are reproducible from a seed.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Callable, Sequence

from bilevel_jax.data.records import Record, stable_id

HARD_KINDS = ("swap", "wrong_number", "shuffle_sentences", "repeat_sentences")
EASY_KINDS = ("truncate", "near_empty")
NEAR_EMPTY = ("I don't know.", "OK.", "Sure.", "Yes.", "No.", "Maybe.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# GPT-2-style pre-tokenizer pieces with single digits (as SmolLM2's BPE splits them).
_PIECE = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+(?!\S)|\s+|_+")


def approx_tokens(text: str) -> int:
  """A tokenizer-free estimate of a byte-level BPE token count (SmolLM2-like).

  One token per pre-tokenizer piece (words, single digits, punctuation runs, whitespace), plus
  one per 4 letters past the sixth of a long word and one per 2 characters of a long punctuation
  run. On uncensorbench answers it correlates 0.996 with SmolLM2's token counts (median ratio
  1.02). Pools cut to a length in these units, so that the label cannot hide in the token count.
  """
  n = 0
  for m in _PIECE.finditer(text):
    piece = m.group(0).strip()
    if piece[:1].isalpha():
      n += 1 + max(0, len(piece) - 6) // 4
    else:
      n += 1 + max(0, len(piece) - 1) // 2
  return n


def sentences(text: str) -> list[str]:
  return [s for s in _SENTENCE_END.split(text.strip()) if s]


def cut_at_word(text: str, max_chars: int) -> str:
  """The longest prefix of ``text`` of at most ``max_chars`` that ends at a word boundary."""
  if len(text) <= max_chars:
    return text
  cut = text[:max_chars + 1]
  space = cut.rstrip().rfind(" ")
  return (cut[:space] if space > 0 else text[:max_chars]).rstrip()


def change_digit(number: str, rng: random.Random) -> str:
  """``number`` with one digit changed (same length, never a leading zero, never equal)."""
  positions = [i for i, c in enumerate(number) if c.isdigit()]
  pos = rng.choice(positions)
  lead = pos == positions[0] and len(positions) > 1
  choices = [d for d in "0123456789" if d != number[pos] and not (lead and d == "0")]
  return number[:pos] + rng.choice(choices) + number[pos + 1:]


def wrong_final_number(text: str, rng: random.Random, answer: str | None = None) -> str | None:
  """Changes the final answer: every occurrence of it on the last two lines (GSM style
  ``... = 448\\n#### 448``), else the last number in the text. ``None`` if there is no number."""
  if answer is not None and answer in text:
    new = change_digit(answer, rng)
    lines = text.split("\n")
    tail = "\n".join(lines[-2:])
    pattern = re.compile(r"(?<![\d.])" + re.escape(answer) + r"(?![\d])")
    if pattern.search(tail):
      return "\n".join(lines[:-2] + [pattern.sub(new, tail)]) if len(lines) > 2 else \
          pattern.sub(new, tail)
  matches = list(_NUMBER.finditer(text))
  if not matches:
    return None
  m = matches[-1]
  return text[:m.start()] + change_digit(m.group(0), rng) + text[m.end():]


def shuffle_sentences(text: str, rng: random.Random) -> str | None:
  sents = sentences(text)
  if len(sents) < 3:
    return None
  order = list(range(len(sents)))
  while order == sorted(order):
    rng.shuffle(order)
  return " ".join(sents[i] for i in order)


def repeat_sentences(text: str, rng: random.Random) -> str | None:
  sents = sentences(text)
  if len(sents) < 2:
    return None
  k = rng.randint(1, max(1, len(sents) // 2))
  out, i = [], 0
  while len(" ".join(out)) < len(text):
    out.append(sents[i % k])
    i += 1
  return cut_at_word(" ".join(out), len(text))


def corrupt(rec: Record, kind: str, rng: random.Random,
            donors: Sequence[Record] = ()) -> Record | None:
  """A low-quality copy of ``rec`` made by ``kind``; ``None`` if ``kind`` does not apply.

  Args:
    rec: a good pair.
    kind: one of :data:`HARD_KINDS` or :data:`EASY_KINDS`.
    rng: the random stream.
    donors: candidate answers for ``swap`` (records of the same source; ``rec`` itself skipped).
  Returns:
    A record with label ``low_quality``, a new ``example_id`` and ``meta["corruption"] = kind``.
  """
  text = rec.response
  if kind == "swap":
    cands = [d for d in donors if d.source == rec.source and d.question != rec.question
             and d.response != text]
    if not cands:
      return None
    new = min(cands, key=lambda d: (abs(len(d.response) - len(text)), d.example_id)).response
  elif kind == "wrong_number":
    new = wrong_final_number(text, rng, rec.meta.get("answer"))
  elif kind == "shuffle_sentences":
    new = shuffle_sentences(text, rng)
  elif kind == "repeat_sentences":
    new = repeat_sentences(text, rng)
  elif kind == "truncate":
    new = cut_at_word(text, max(8, len(text) // 4))
    new = None if new == text else new
  elif kind == "near_empty":
    new = rng.choice(NEAR_EMPTY)
  else:
    raise ValueError(f"unknown corruption {kind!r} (use {HARD_KINDS + EASY_KINDS})")
  if new is None or new.strip() == text.strip():
    return None
  meta = {**rec.meta, "corruption": kind, "original_id": rec.example_id}
  return dataclasses.replace(rec, example_id=stable_id(rec.source, rec.example_id, kind),
                             response=new, label="low_quality", meta=meta)


def corrupt_many(recs: Sequence[Record], kinds: Sequence[str], rng: random.Random,
                 donors: Sequence[Record] = ()) -> tuple[list[Record], dict[str, int]]:
  """Corrupts every record, kinds in turn (the next kind where one does not apply).

  Returns:
    ``(corrupted, counts by kind)``. Raises if no kind applies to a record.
  """
  out, counts = [], {}
  for i, rec in enumerate(recs):
    for j in range(len(kinds)):
      kind = kinds[(i + j) % len(kinds)]
      bad = corrupt(rec, kind, rng, donors)
      if bad is not None:
        out.append(bad)
        counts[kind] = counts.get(kind, 0) + 1
        break
    else:
      raise ValueError(f"no corruption of {kinds} applies to {rec.example_id}")
  return out, counts


def cut_near(text: str, target: int, length_fn: Callable[[str], int] = len) -> str:
  """``text`` cut at the word boundary whose prefix length (``length_fn``) is nearest to
  ``target``, before or after it, so that texts with long and short words end up equally long
  on average."""
  if length_fn(text) <= target:
    return text
  bounds = [m.start() for m in re.finditer(r"\s+", text) if m.start() > 0]
  if not bounds:
    return text
  best = min(bounds, key=lambda b: (abs(length_fn(text[:b]) - target), b))
  return text[:best].rstrip()


def match_lengths(groups: Sequence[Sequence[Record]], lo: int, hi: int, rng: random.Random,
                  length_fn: Callable[[str], int] = approx_tokens) -> list[list[Record]]:
  """Cuts the responses of every group to the *same* list of target lengths.

  Targets are drawn uniformly from ``[lo, hi]`` (in ``length_fn`` units) once, for the largest group, and each group
  gets a random permutation of them; each response is cut at the word boundary nearest its
  target. The groups' length distributions then differ only by the word-boundary rounding.
  """
  n = max(len(g) for g in groups)
  targets = [rng.randint(lo, hi) for _ in range(n)]
  out = []
  for g in groups:
    ts = targets[:len(g)]
    rng.shuffle(ts)
    cut = []
    for rec, t in zip(g, ts):
      new = cut_near(rec.response, t, length_fn)
      cut.append(rec if new == rec.response else dataclasses.replace(
          rec, response=new, meta={**rec.meta, "cut_from_chars": len(rec.response)}))
    out.append(cut)
  return out
