"""The run report: ``report/index.html`` with PNG plots beside it, ``summary.json`` and ``scores.csv``.

The page is self-contained (no script, no network: the plots are PNG files in the same directory)
and shows what DESIGN.md section 6 asks for: weight histograms per source, kept and rejected pairs
per source, weight trajectories over the selection steps, validation curves per method, a table of
the judge-free metrics of BDS (and BMO) against every baseline with the margins as measured, the
selection AUROC of every score next to the confound baselines, and the top- and bottom-weighted
examples, truncated. Pairs labelled harmful are shown only folded and truncated in the page; their
full text goes to the ``examples_*.jsonl`` files, and nothing here prints example text.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TRUNCATE = 160
METRIC_NAMES = (("val_loss", "validation loss", "lower"),
                ("refusal_rate_harmful", "refusal rate, held-out harmful prompts", "higher"),
                ("over_refusal_benign", "over-refusal, benign prompts", "lower"),
                ("gsm8k_exact_match", "GSM8K exact match", "higher"),
                ("n_train", "training pairs", None),
                # BDS keeps a harmful pool question only with its original answer; BMO keeps it
                # with regenerated answers (refine's last round).
                ("harmful_questions_in_training", "share of harmful pool questions trained on", None),
                ("refusal_rate_regenerated_harmful",
                 "refusal rate of regenerated answers to harmful pool questions", "higher"))


@dataclasses.dataclass
class ReportData:
  """Everything the report shows (plain Python and NumPy; built by ``bilevel_jax.loops``).

  Attributes:
    name: run name.
    config: the resolved config as a dict.
    pool: one dict per pool example in weight-vector order, with ``example_id``, ``source``,
      ``label``, ``question``, ``response`` (text only goes to files and the folded page rows).
    weights: final weight ``p_i`` per selection method (e.g. ``{"bds": [N]}``).
    selected: kept mask per selection method.
    trajectories: weights over the selection steps per method, ``[S, N]``, with their ``steps``.
    selection_quality: score name -> ``{"auroc", "precision_at_k", ...}`` (methods and confound
      baselines such as length and base-model loss), optionally with ``auroc_std`` and ``seeds``.
    curves: method -> list of ``(step, val_loss)`` during fine-tuning.
    eval_metrics: method -> judge-free metrics of its fine-tuned model (and ``n_train``).
    data_summary: pool counts and confound AUROCs from the data package.
    notes: free lines shown at the top (timings, what ran).
  """

  name: str
  config: dict
  pool: list[dict]
  weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  selected: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  trajectories: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  trajectory_steps: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  selection_quality: dict[str, dict] = dataclasses.field(default_factory=dict)
  curves: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
  eval_metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
  data_summary: dict = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)


def _truncate(text: str, n: int = TRUNCATE) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= n else text[:n - 1] + "…"


def _num(v: Any) -> Any:
  if isinstance(v, (np.floating, np.integer)):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  return _num(obj)


# ----------------------------------------------------------------------------- plots


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_weight_histograms(data: ReportData, method: str, path: Path) -> None:
  plt = _plt()
  w = np.asarray(data.weights[method], np.float64)
  sources = sorted({r["source"] for r in data.pool})
  src = np.asarray([r["source"] for r in data.pool])
  fig, ax = plt.subplots(figsize=(7, 4))
  bins = np.linspace(w.min(), w.max() + 1e-12, 30)
  for s in sources:
    ax.hist(w[src == s], bins=bins, alpha=0.55, label=f"{s} (n={int((src == s).sum())})")
  ax.axvline(1.0, color="k", ls=":", lw=1, label="uniform weight")
  ax.set_xlabel(f"weight p_i ({method})")
  ax.set_ylabel("pairs")
  ax.set_title("Weight histogram per source")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_kept_per_source(data: ReportData, method: str, path: Path) -> None:
  plt = _plt()
  keep = np.asarray(data.selected[method], bool)
  groups = sorted({(r["source"], r["label"]) for r in data.pool})
  keys = np.asarray([f"{r['source']}/{r['label']}" for r in data.pool])
  names = [f"{s}/{l}" for s, l in groups]
  kept = [int((keep & (keys == n)).sum()) for n in names]
  rejected = [int((~keep & (keys == n)).sum()) for n in names]
  fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
  y = np.arange(len(names))
  ax.barh(y, kept, color="tab:green", label="kept")
  ax.barh(y, rejected, left=kept, color="tab:red", label="rejected")
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xlabel("pairs")
  ax.set_title(f"Kept and rejected per source/label ({method})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_trajectories(data: ReportData, method: str, path: Path, max_lines: int = 60) -> None:
  plt = _plt()
  traj = np.asarray(data.trajectories[method], np.float64)
  steps = data.trajectory_steps.get(method) or list(range(traj.shape[0]))
  labels = [r["label"] for r in data.pool]
  rng = np.random.default_rng(0)
  idx = rng.choice(traj.shape[1], size=min(max_lines, traj.shape[1]), replace=False)
  colours = {}
  fig, ax = plt.subplots(figsize=(7, 4))
  for i in idx:
    lab = labels[i]
    c = colours.setdefault(lab, f"C{len(colours)}")
    ax.plot(steps, traj[:, i], color=c, alpha=0.5, lw=0.8)
  for lab, c in colours.items():
    ax.plot([], [], color=c, label=lab)
  for lab in sorted(set(labels)):
    m = np.asarray([l == lab for l in labels])
    c = colours.setdefault(lab, f"C{len(colours)}")
    ax.plot(steps, traj[:, m].mean(axis=1), color=c, lw=2.5)
  ax.set_xlabel("selection step")
  ax.set_ylabel("weight p_i")
  ax.set_title(f"Weight trajectories ({method}; thick: mean per label)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_curves(data: ReportData, path: Path) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  for method, pts in sorted(data.curves.items()):
    if pts:
      s, v = zip(*pts)
      ax.plot(s, v, marker="o", ms=3, label=method)
  ax.set_xlabel("fine-tuning step")
  ax.set_ylabel("validation loss")
  ax.set_title("Validation loss during fine-tuning, per method")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_selection_quality(data: ReportData, path: Path) -> None:
  plt = _plt()
  names = [n for n, q in data.selection_quality.items() if _num(q.get("auroc")) is not None]
  vals = [data.selection_quality[n]["auroc"] for n in names]
  errs = [data.selection_quality[n].get("auroc_std", 0.0) or 0.0 for n in names]
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
  y = np.arange(len(names))
  ax.barh(y, vals, xerr=errs, color=["tab:blue" if n in data.weights else "tab:gray" for n in names])
  ax.axvline(0.5, color="k", ls=":", lw=1)
  ax.set_xlim(0, 1)
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xlabel("AUROC of the score against the labels (good above bad)")
  ax.set_title("Selection quality: methods (blue) and cheap/confound baselines (grey)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------- tables and text


def _fmt(v: Any, nd: int = 3) -> str:
  v = _num(v)
  if v is None:
    return "–"
  if isinstance(v, float):
    return f"{v:.{nd}f}"
  return str(v)


def margins(eval_metrics: dict[str, dict], primary: str) -> dict[str, dict[str, float]]:
  """``primary`` minus every other method, per metric (as measured, signs not interpreted)."""
  out: dict[str, dict[str, float]] = {}
  base = eval_metrics.get(primary, {})
  for method, m in eval_metrics.items():
    if method == primary:
      continue
    out[method] = {}
    for key, _, better in METRIC_NAMES:
      a, b = _num(base.get(key)), _num(m.get(key))
      if isinstance(a, (int, float)) and isinstance(b, (int, float)) and better is not None:
        out[method][key] = float(a) - float(b)
  return out


def findings(data: ReportData, primary: str = "bds") -> list[str]:
  """Plain sentences with the measured margins of ``primary`` over each baseline."""
  lines = []
  em = data.eval_metrics
  if primary not in em:
    return lines
  for other, d in margins(em, primary).items():
    parts = []
    for key, label, better in METRIC_NAMES:
      if key in d:
        sign = "+" if d[key] >= 0 else ""
        parts.append(f"{label} {sign}{d[key]:.3f} ({better} is better)")
    if parts:
      lines.append(f"{primary} minus {other}: " + "; ".join(parts) + ".")
  return lines


def console_summary(summary: dict) -> str:
  """The numbers of ``summary.json`` as plain-text tables for the console (no example text)."""
  em, lines = summary.get("eval_metrics", {}), []
  keys = [(k, lab) for k, lab, _ in METRIC_NAMES
          if any(_num(m.get(k)) is not None for m in em.values())]
  if keys:
    lines.append("fine-tuned models: " + "; ".join(f"{lab} = {k}" for k, lab in keys))
    width = max(len(m) for m in em)
    lines.append(" " * width + " | " + " | ".join(k for k, _ in keys))
    for m in sorted(em, key=lambda m: (m not in ("bds", "bmo"), m)):
      lines.append(m.ljust(width) + " | " + " | ".join(
          _fmt(em[m].get(k)).rjust(len(k)) for k, _ in keys))
  quality = summary.get("selection_quality", {})
  if quality:
    lines.append("selection quality against the pool labels (AUROC, precision@k with k = #bad):")
    for name, q in quality.items():
      std = _num(q.get("auroc_std"))
      lines.append(f"  {name:<14} AUROC {_fmt(q.get('auroc'))}"
                   + (f" ± {_fmt(std)}" if std else "")
                   + f"  precision@k {_fmt(q.get('precision_at_k'))}")
  lines += summary.get("findings", [])
  return "\n".join(lines)


def _metrics_table(data: ReportData) -> str:
  methods = sorted(data.eval_metrics, key=lambda m: (m not in ("bds", "bmo"), m))
  keys = [(k, lab) for k, lab, _ in METRIC_NAMES
          if any(_num(data.eval_metrics[m].get(k)) is not None for m in methods)]
  head = "".join(f"<th>{html.escape(lab)}</th>" for _, lab in keys)
  rows = []
  for m in methods:
    cells = "".join(f"<td>{_fmt(data.eval_metrics[m].get(k))}</td>" for k, _ in keys)
    rows.append(f"<tr><th>{html.escape(m)}</th>{cells}</tr>")
  return f"<table id='metrics'><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def _quality_table(data: ReportData) -> str:
  rows = []
  for name, q in data.selection_quality.items():
    kind = "method" if name in data.weights else "baseline"
    std = q.get("auroc_std")
    auc = _fmt(q.get("auroc")) + (f" ± {_fmt(std)}" if _num(std) else "")
    rows.append(f"<tr><th>{html.escape(name)}</th><td>{kind}</td><td>{auc}</td>"
                f"<td>{_fmt(q.get('precision_at_k'))}</td><td>{_fmt(q.get('seeds', 1))}</td></tr>")
  return ("<table id='selection'><tr><th>score</th><th>kind</th><th>AUROC</th>"
          "<th>precision@k (k = #bad)</th><th>seeds</th></tr>" + "".join(rows) + "</table>")


def _examples_table(data: ReportData, method: str, order: np.ndarray, title: str) -> str:
  w = np.asarray(data.weights[method])
  rows = []
  for i in order:
    r = data.pool[int(i)]
    q, a = html.escape(_truncate(r["question"])), html.escape(_truncate(r["response"]))
    if r.get("label") == "harmful":
      # Folded: a reader opens it on purpose; the full text is only in the jsonl files.
      text = f"<details><summary>labelled harmful (folded)</summary>{q}<br>→ {a}</details>"
    else:
      text = f"{q}<br>→ {a}"
    rows.append(f"<tr><td>{_fmt(float(w[i]))}</td><td>{html.escape(r['source'])}</td>"
                f"<td>{html.escape(r['label'])}</td><td class='t'>{text}</td></tr>")
  return (f"<h3>{html.escape(title)}</h3><table><tr><th>weight</th><th>source</th><th>label</th>"
          f"<th>question → response (truncated)</th></tr>{''.join(rows)}</table>")


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3;text-align:left}td.t{max-width:650px;font-size:12px}img{max-width:100%;border:1px solid #eee}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}code{background:#f5f5f5}"""


def write_report(data: ReportData, out_dir: str | Path, primary: str = "bds",
                 n_examples: int = 10) -> Path:
  """Writes ``index.html``, ``summary.json``, ``scores.csv``, the PNGs and example files.

  Args:
    data: what to show.
    out_dir: the report directory (created).
    primary: the method whose weights drive the weight plots and example lists (falls back to the
      first method with weights).
    n_examples: how many top- and bottom-weighted examples the page lists.
  Returns:
    The path of ``index.html``.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if primary not in data.weights and data.weights:
    primary = sorted(data.weights)[0]
  figures: list[tuple[str, str]] = []
  if primary in data.weights:
    plot_weight_histograms(data, primary, out / "weights_hist.png")
    figures.append(("weights_hist.png", "Weight histogram per source"))
  if primary in data.selected:
    plot_kept_per_source(data, primary, out / "kept_per_source.png")
    figures.append(("kept_per_source.png", "Kept and rejected per source"))
  if primary in data.trajectories and np.asarray(data.trajectories[primary]).shape[0] > 1:
    plot_trajectories(data, primary, out / "trajectories.png")
    figures.append(("trajectories.png", "Weight trajectories"))
  if any(data.curves.values()):
    plot_curves(data, out / "val_curves.png")
    figures.append(("val_curves.png", "Validation curves per method"))
  if data.selection_quality:
    plot_selection_quality(data, out / "selection_auroc.png")
    figures.append(("selection_auroc.png", "Selection AUROC"))

  # scores.csv: one row per pool example.
  with open(out / "scores.csv", "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(["example_id", "source", "label", "weight", "selected"])
    w = np.asarray(data.weights.get(primary, np.full(len(data.pool), np.nan)))
    sel = np.asarray(data.selected.get(primary, np.zeros(len(data.pool), bool)))
    for i, r in enumerate(data.pool):
      wr.writerow([r["example_id"], r["source"], r["label"], f"{float(w[i]):.6g}", int(bool(sel[i]))])

  examples_html = ""
  if primary in data.weights:
    w = np.asarray(data.weights[primary])
    order = np.argsort(-w, kind="stable")
    top, bottom = order[:n_examples], order[::-1][:n_examples]
    for name, idx in (("top", top), ("bottom", bottom)):
      with open(out / f"examples_{name}.jsonl", "w") as f:
        for i in idx:
          r = data.pool[int(i)]
          f.write(json.dumps({"weight": float(w[i]), **{k: r[k] for k in (
              "example_id", "source", "label")}, "question": _truncate(r["question"], 1000),
              "response": _truncate(r["response"], 1000)}, ensure_ascii=False) + "\n")
    examples_html = (_examples_table(data, primary, top, f"Top-weighted pairs ({primary})")
                     + _examples_table(data, primary, bottom, f"Bottom-weighted pairs ({primary})"))

  found = findings(data, primary)
  summary = {"name": data.name, "primary": primary, "eval_metrics": data.eval_metrics,
             "margins": margins(data.eval_metrics, primary), "findings": found,
             "selection_quality": data.selection_quality, "data_summary": data.data_summary,
             "n_pool": len(data.pool), "notes": data.notes, "figures": [f for f, _ in figures],
             "kept": {m: int(np.asarray(s).sum()) for m, s in data.selected.items()},
             "config": data.config}
  (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")

  figs = "".join(f"<figure><img src='{f}' alt='{html.escape(t)}'><figcaption>{html.escape(t)}"
                 "</figcaption></figure>" for f, t in figures)
  notes = "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
  finds = "".join(f"<li>{html.escape(s)}</li>" for s in found) or "<li>no baseline to compare</li>"
  ds = html.escape(json.dumps(_jsonable(data.data_summary), indent=1)[:4000])
  page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>bilevel_jax report: {html.escape(data.name)}</title><style>{_CSS}</style></head><body>
<h1>Run report: {html.escape(data.name)}</h1>
<p>Pool <code>{html.escape(str(data.config.get('data', {}).get('pool', '?')))}</code>,
{len(data.pool)} pairs. Files: <a href="summary.json">summary.json</a>,
<a href="scores.csv">scores.csv</a>, <a href="examples_top.jsonl">examples_top.jsonl</a>,
<a href="examples_bottom.jsonl">examples_bottom.jsonl</a>.</p><ul>{notes}</ul>
<h2>Fine-tuned models: judge-free metrics</h2>{_metrics_table(data)}
<h3>Margins of {html.escape(primary)}, as measured</h3><ul id="findings">{finds}</ul>
<h2>Selection quality against the pool labels</h2>{_quality_table(data)}
<h2>Plots</h2><div class="grid">{figs}</div>
<h2>Examples</h2>{examples_html}
<h2>Data summary</h2><pre>{ds}</pre>
</body></html>"""
  (out / "index.html").write_text(page, encoding="utf-8")
  return out / "index.html"
