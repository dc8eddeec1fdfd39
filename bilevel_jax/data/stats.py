"""Plain NumPy statistics shared by the data summary and evaluation: AUROC and confound baselines."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from jaxtyping import Float, Int


def _midranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x`` with ties given their average rank."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  ranks = np.empty(len(x), np.float64)
  # Boundaries of runs of equal values in sorted order.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = 0.5 * (s + 1 + e)
  return ranks


def auroc(scores: Float[np.ndarray, "n"] | Sequence[float],
          labels: Int[np.ndarray, "n"] | Sequence[int]) -> float:
  """Area under the ROC curve of ``scores`` for the positive class ``labels == 1``.

  Equals P(score of a random positive > score of a random negative) + 0.5 P(tie)
  (Mann-Whitney U / (n_pos n_neg)), so ties count half and a constant score gives exactly 0.5.

  Args:
    scores: [n] real scores (higher = more positive). NaN is rejected.
    labels: [n] 0/1 (or bool).
  Returns:
    The AUROC in [0, 1]; NaN if one class is empty.
  """
  s = np.asarray(scores, np.float64).reshape(-1)
  y = np.asarray(labels).reshape(-1)
  if s.shape != y.shape:
    raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
  if np.isnan(s).any():
    raise ValueError("scores contain NaN")
  if not np.isin(y, (0, 1)).all():
    raise ValueError("labels must be 0 or 1")
  y = y.astype(bool)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = _midranks(s)
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def separability(a: float) -> float:
  """``max(a, 1 - a)``: how well a feature separates the classes in either direction."""
  return float(max(a, 1.0 - a))


def source_scores(sources: Sequence[str], labels: Sequence[int]) -> np.ndarray:
  """Each example's score is the positive rate of its source: the best source-only classifier.

  Its AUROC is the *source confound*: 0.5 when every source has the same label mix, 1.0 when
  the source alone gives the label away.
  """
  y = np.asarray(labels, np.float64)
  src = np.asarray(sources)
  out = np.empty(len(y))
  for s in np.unique(src):
    m = src == s
    out[m] = y[m].mean()
  return out
