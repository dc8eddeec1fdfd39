"""The report: files, numbers, plots drawn, harmful text folded; a slow real-browser check."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bilevel_jax import report as R

HARMFUL_SECRET = "HARMFULPAYLOAD"


def _data(n=24):
  rng = np.random.default_rng(0)
  pool = []
  for i in range(n):
    harmful = i % 3 == 0
    pool.append({"example_id": f"ex{i:03d}", "source": "srcA" if i % 2 else "srcB",
                 "label": "harmful" if harmful else "good",
                 "question": f"question {i} " + "word " * 60,
                 "response": (HARMFUL_SECRET if harmful else "fine answer ") * 30})
  bad = np.asarray([r["label"] == "harmful" for r in pool])
  w = np.where(bad, 0.5, 1.25) + rng.normal(0, 0.05, n)
  traj = np.linspace(1.0, 0.0, 5)[:, None] * (1 - w)[None] + w[None]
  return R.ReportData(
      name="t", config={"data": {"pool": "toy"}}, pool=pool, weights={"bds": w},
      selected={"bds": w >= 1.0}, trajectories={"bds": traj},
      trajectory_steps={"bds": [0, 1, 2, 3, 4]},
      selection_quality={"bds": {"auroc": 1.0, "precision_at_k": 1.0},
                         "length": {"auroc": 0.52, "precision_at_k": 0.3, "auroc_std": 0.0}},
      curves={"bds": [(0, 2.0), (10, 1.5)], "direct_mixing": [(0, 2.0), (10, 1.7)]},
      eval_metrics={"bds": {"val_loss": 1.5, "refusal_rate_harmful": 0.75,
                            "over_refusal_benign": 0.10, "n_train": 16},
                    "direct_mixing": {"val_loss": 1.7, "refusal_rate_harmful": 0.5,
                                      "over_refusal_benign": 0.125, "n_train": 24},
                    "random_selection": {"val_loss": 1.8, "refusal_rate_harmful": float("nan"),
                                         "over_refusal_benign": 0.2, "n_train": 16}},
      notes=["toy run"])


def _not_blank(png: Path) -> bool:
  import matplotlib.image as mpimg
  img = mpimg.imread(png)
  return img.ndim == 3 and float(img[..., :3].std()) > 0.01


def test_report_files_and_numbers(tmp_path):
  data = _data()
  page = R.write_report(data, tmp_path / "report")
  out = page.parent
  for f in ("weights_hist.png", "kept_per_source.png", "trajectories.png", "val_curves.png",
            "selection_auroc.png"):
    assert _not_blank(out / f), f
  rows = list(csv.DictReader(open(out / "scores.csv")))
  assert [r["example_id"] for r in rows] == [p["example_id"] for p in data.pool]
  assert list(rows[0]) == ["example_id", "source", "label", "weight", "selected"]
  assert sum(int(r["selected"]) for r in rows) == int(data.selected["bds"].sum())
  assert float(rows[3]["weight"]) == pytest.approx(data.weights["bds"][3], rel=1e-5)
  summary = json.loads((out / "summary.json").read_text())
  m = summary["margins"]["direct_mixing"]
  assert m["refusal_rate_harmful"] == pytest.approx(0.25)
  assert m["over_refusal_benign"] == pytest.approx(-0.025)
  assert m["val_loss"] == pytest.approx(-0.2)
  assert "refusal_rate_harmful" not in summary["margins"]["random_selection"]  # NaN: not compared
  assert summary["eval_metrics"]["random_selection"]["refusal_rate_harmful"] is None
  assert summary["kept"]["bds"] == int(data.selected["bds"].sum())
  assert any("bds minus direct_mixing" in s and "+0.250" in s for s in summary["findings"])


def test_harmful_text_only_folded_and_truncated(tmp_path):
  page = R.write_report(_data(), tmp_path / "report").read_text()
  # Every occurrence of harmful text sits inside a folded <details> element.
  outside = page
  while "<details>" in outside:
    a, _, rest = outside.partition("<details>")
    _, _, b = rest.partition("</details>")
    outside = a + b
  assert HARMFUL_SECRET not in outside
  assert HARMFUL_SECRET in page  # folded, not removed
  assert HARMFUL_SECRET * 12 not in page  # truncated
  assert "<script" not in page and "http" not in page  # self-contained, no network
  bottom = [json.loads(l) for l in (tmp_path / "report" / "examples_bottom.jsonl").open()]
  assert all(b["label"] == "harmful" for b in bottom[:8])


def test_findings_state_margins_for_every_baseline():
  lines = R.findings(_data())
  assert len(lines) == 2
  assert lines[0].startswith("bds minus direct_mixing: validation loss -0.200")


def test_console_summary_numbers_only(tmp_path):
  data = _data()
  data.eval_metrics["bmo"] = {"n_train": 16, "harmful_questions_in_training": 0.95,
                              "refusal_rate_regenerated_harmful": 0.6}
  data.eval_metrics["bds"]["harmful_questions_in_training"] = 0.125
  out = R.write_report(data, tmp_path / "report").parent
  summary = json.loads((out / "summary.json").read_text())
  text = R.console_summary(summary)
  lines = text.splitlines()
  header = next(l for l in lines if l.lstrip().startswith("| val_loss") or "| val_loss" in l)
  cols = [c.strip() for c in header.split("|")[1:]]
  assert cols[:3] == ["val_loss", "refusal_rate_harmful", "over_refusal_benign"]
  row = {l.split("|")[0].strip(): [c.strip() for c in l.split("|")[1:]] for l in lines
         if "|" in l and l is not header}
  assert row["bmo"][cols.index("harmful_questions_in_training")] == "0.950"
  assert row["bmo"][cols.index("refusal_rate_regenerated_harmful")] == "0.600"
  assert row["bds"][cols.index("harmful_questions_in_training")] == "0.125"
  assert row["random_selection"][cols.index("refusal_rate_harmful")] == "–"  # NaN shown as missing
  assert "  bds            AUROC 1.000  precision@k 1.000" in lines
  assert any(l.startswith("bds minus direct_mixing") for l in lines)
  assert HARMFUL_SECRET not in text
  # A share of questions has no "better" direction: no margin is computed for it.
  assert "harmful_questions_in_training" not in summary["margins"]["bmo"]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  if browser is None:
    pytest.skip("chromium is not installed (scripts/setup_env.sh installs Debian's chromium "
                "where apt is available)")
  page = R.write_report(_data(), tmp_path / "report")
  shot = tmp_path / "shot.png"
  proc = subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
       "--window-size=1200,3000", f"--screenshot={shot}", page.as_uri()],
      capture_output=True, text=True, timeout=120)
  assert shot.exists(), proc.stderr[-2000:]
  console_errors = [l for l in proc.stderr.splitlines()
                    if "CONSOLE" in l and ("ERROR" in l or "Uncaught" in l)]
  assert not console_errors, console_errors
  assert "Failed to load resource" not in proc.stderr
  # The DOM after load: every image decoded (naturalWidth > 0).
  dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
  assert "Run report: t" in dom.stdout
  import matplotlib.image as mpimg
  img = mpimg.imread(shot)
  # Plots drawn: many distinct colours (a text-only or blank page has a handful).
  colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
  assert len(colours) > 200, len(colours)
