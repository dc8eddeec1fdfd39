"""The benchmark harness's own plumbing (scripts/bench_common.py): docs sections and workers."""

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_common as bc  # noqa: E402


def test_update_section_keeps_other_sections(tmp_path):
  path = tmp_path / "benchmarks.md"
  bc.update_markdown_section("sft", "sft table v1", path)
  bc.update_markdown_section("sampling", "sampling table", path)
  bc.update_markdown_section("sft", "sft table v2", path)
  text = path.read_text()
  assert "sft table v2" in text and "sft table v1" not in text
  assert "sampling table" in text
  assert text.index("<!-- bench:sft -->") < text.index("<!-- bench:sampling -->")
  assert text.count("<!-- bench:sft -->") == 1


def test_timing_median_and_spread():
  t = bc.Timing([3.0, 1.0, 2.0, 10.0, 2.5])
  assert t.median == 2.5
  assert t.spread == "1.000-10.000"


WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {scripts!r})
    import bench_common as bc
    calls = []
    def step(scale=1.0):
      calls.append(scale)
      print("library noise on stdout")  # must not confuse the protocol
      return {{"seconds": {seconds} * scale}}
    def fail():
      raise ValueError("broken on purpose")
    bc.serve({{"step": step, "count": lambda: {{"n": len(calls)}}, "fail": fail}}, ready={{"side": {name!r}}})
""")


def _worker(tmp_path, name, seconds):
  script = tmp_path / f"{name}.py"
  script.write_text(WORKER.format(scripts=str(Path(bc.__file__).parent), seconds=seconds, name=name))
  return bc.Worker(name, [sys.executable, script])


def test_alternate_runs_every_worker_each_round(tmp_path):
  with _worker(tmp_path, "a", 1.0) as a, _worker(tmp_path, "b", 2.0) as b:
    assert a.info == {"side": "a"}
    timings = bc.alternate({"a": a, "b": b}, rounds=3, pause_s=0.0, scale=0.5)
    assert timings["a"].seconds == [0.5] * 3 and timings["b"].seconds == [1.0] * 3
    assert a.call("count") == {"n": 3} and b.call("count") == {"n": 3}


def test_worker_error_is_reported(tmp_path):
  with _worker(tmp_path, "c", 1.0) as c:
    with pytest.raises(bc.WorkerError, match="broken on purpose"):
      c.call("fail")


def test_demo_timings_from_event_stamps(tmp_path, monkeypatch):
  """bench_demo reads phase wall times back from the stamps EventFileWriter writes."""
  import json
  import os

  import bench_demo
  from bilevel_jax import metrics as metrics_lib

  clock = iter([1000.0, 1010.0, 1012.0, 1014.0, 1020.0])  # open, then steps 1, 2, 3, 4
  monkeypatch.setattr(metrics_lib.time, "time", lambda: next(clock))
  pdir = tmp_path / "run" / "select_bds"
  writer = metrics_lib.EventFileWriter(pdir / "tb")
  for step in (1, 2, 3, 4):
    writer.scalars(step, {"loss": 1.0})
  writer.close()
  (pdir / "result.json").write_text(json.dumps({}))
  os.utime(pdir / "result.json", (1025.0, 1025.0))
  (tmp_path / "run" / "not_a_phase").mkdir()

  t = bench_demo.phase_timing(pdir)
  assert t["steps"] == 4 and t["attempts"] == 1 and t["done"]
  assert t["wall_s"] == 25.0  # logger opened at 1000, result.json at 1025
  assert t["first_step_s"] == 10.0
  assert t["median_step_s"] == 2.0  # gaps 2, 2, 6: the checkpoint-like outlier is left out
  res = bench_demo.run_timing(tmp_path / "run")
  assert [p["phase"] for p in res["phases"]] == ["select_bds"]
  assert res["total_s"] is None  # no report yet

  (tmp_path / "run" / "config.json").write_text("{}")
  report = tmp_path / "run" / "report"
  report.mkdir()
  (report / "summary.json").write_text(json.dumps(
      {"selection_quality": {"bds": {"auroc": 0.875}, "length": {"auroc": 0.5, "note": "x"}}}))
  res = bench_demo.run_timing(tmp_path / "run")
  assert res["total_s"] is not None
  assert bench_demo._selection_lines(res) == [
      "selection `bds`: AUROC 0.875, selection phase 25 s",
      "selection `length`: AUROC 0.500 (cheap score, no phase)"]


def test_demo_skips_without_run_directory(tmp_path):
  import bench_demo

  res = bench_demo.run(write_docs=False, workdir=tmp_path / "missing")
  assert "no run directory" in res["skipped"]
