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
