"""Benchmark: the demo end to end, read from a finished run directory (the demo is not rerun).

``make demo`` (``bilevel-jax run --config configs/demo.py``) takes about a quarter of an hour on a
2-core CPU, too long to repeat inside a benchmark suite that is itself run on a shared machine. Its
run directory already holds the clock: every phase's TensorBoard event file (``<phase>/tb/``,
written by ``bilevel_jax.metrics.EventFileWriter``) stamps each logged step with its wall time, and
the first record of each file is stamped when the phase's logger opens. This reads them back:

* per phase (``select_*``, ``finetune_*``): wall time from the logger's first record to
  ``result.json``, steps, median seconds per step (consecutive step stamps; the median leaves out
  checkpoint saves and evaluation points), and the time before the first step (data set-up and
  compilation);
* the whole run: from ``config.json`` (written when the run starts) to the newest file of
  ``report/``;
* the selection's AUROC (good pairs above bad ones) from ``report/summary.json``, next to the wall
  time of the selection phase that produced it (issue 8's "good selection in under 5 minutes").

A resumed run has one event file per attempt; the stamps of all of them are merged, so a phase's
wall time then includes the gap between the attempts (said in the table).

  .venv/bin/python scripts/bench_demo.py [--workdir runs/demo] [--no-docs]

(``scripts/bench.py demo`` runs the same thing as part of the suite.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

DEFAULT_WORKDIR = bc.REPO / "runs" / "demo"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if not b & 0x80:
      return value, pos
    shift += 7


def event_stamp(payload: bytes) -> tuple[float, int | None]:
  """``(wall_time, step)`` of a serialized ``tensorflow.Event`` (fields 1: double, 2: int64).

  Only the two leading fields are read; ``EventFileWriter`` always writes them first (the step may
  be absent from the file-version record, as proto3 omits a zero).
  """
  if not payload or payload[0] != 0x09:  # field 1, wire type 1 (64-bit)
    raise ValueError("event without a leading wall_time field")
  (wall,) = struct.unpack("<d", payload[1:9])
  step = None
  if len(payload) > 9 and payload[9] == 0x10:  # field 2, wire type 0 (varint)
    step, _ = _varint(payload, 10)
  return wall, step


def phase_timing(pdir: Path) -> dict | None:
  """Wall time, steps and seconds per step of one phase, from its event files; None without any."""
  from bilevel_jax import metrics as metrics_lib  # the reader that matches the writer

  files = sorted((pdir / "tb").glob("events.out.tfevents.*"))
  if not files:
    return None
  opens, steps = [], {}
  for f in files:
    for i, payload in enumerate(metrics_lib.read_tfrecords(f)):
      wall, step = event_stamp(payload)
      if i == 0:
        opens.append(wall)  # the file-version record: the logger opened
      elif step is not None:
        steps[step] = wall  # a resumed attempt rewrites later steps: keep the last stamp
  if not steps:
    return None
  ordered = sorted(steps.items())
  per_step = [(w2 - w1) / (s2 - s1) for (s1, w1), (s2, w2) in zip(ordered, ordered[1:]) if s2 > s1]
  result = pdir / "result.json"
  end = result.stat().st_mtime if result.exists() else ordered[-1][1]
  return {"phase": pdir.name, "attempts": len(files), "steps": ordered[-1][0], "start": min(opens),
          "wall_s": end - min(opens), "first_step_s": ordered[0][1] - min(opens),
          "median_step_s": statistics.median(per_step) if per_step else None,
          "done": result.exists()}


def run_timing(workdir: Path) -> dict:
  """Per-phase timings and the whole run's wall time of the run directory ``workdir``."""
  phases = [t for p in sorted(workdir.iterdir()) if p.is_dir() and (t := phase_timing(p))]
  phases.sort(key=lambda t: t["start"])  # the order the run took them in
  config = workdir / "config.json"
  report_files = [f for f in (workdir / "report").rglob("*") if f.is_file()] if (
      workdir / "report").exists() else []
  total = None
  if config.exists() and report_files:
    total = max(f.stat().st_mtime for f in report_files) - config.stat().st_mtime
  quality = {}
  summary = workdir / "report" / "summary.json"
  if summary.exists():
    quality = {k: v.get("auroc") for k, v in json.loads(summary.read_text()).get(
        "selection_quality", {}).items() if isinstance(v, dict)}
  return {"workdir": str(workdir), "phases": phases, "total_s": total, "auroc": quality,
          "started": (datetime.datetime.fromtimestamp(config.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
                      if config.exists() else None)}


def run(rounds: int | None = None, write_docs: bool = True, workdir: Path | str = DEFAULT_WORKDIR
        ) -> dict:
  """Reads the demo's timings; ``rounds`` is accepted for the suite's signature and unused."""
  del rounds
  workdir = Path(workdir)
  if not workdir.is_dir():
    why = f"no run directory {workdir} (run `make demo` first; this benchmark does not rerun it)"
    print(f"[demo] skipped: {why}", flush=True)
    if write_docs:
      bc.update_markdown_section("demo", f"## The demo end to end (`scripts/bench.py demo`)\n\n"
                                          f"Not measured: {why}.\n")
    return {"skipped": why}
  res = run_timing(workdir)
  for t in res["phases"]:
    step = f"{t['median_step_s']:.2f} s/step" if t["median_step_s"] else "-"
    print(f"[demo] {t['phase']:24s} {t['wall_s']:7.0f} s, {t['steps']:4d} steps, {step}, "
          f"first step after {t['first_step_s']:.0f} s{'' if t['done'] else ' (unfinished)'}",
          flush=True)
  total = f"{res['total_s']:.0f} s" if res["total_s"] is not None else "unknown (no report yet)"
  print(f"[demo] whole run: {total}", flush=True)
  for line in _selection_lines(res):
    print(f"[demo] {line}", flush=True)
  if write_docs:
    bc.update_markdown_section("demo", render(res))
  return res


def _selection_lines(res: dict) -> list[str]:
  """AUROC of each selection method next to its selection phase's wall time."""
  walls = {t["phase"].removeprefix("select_"): t["wall_s"] for t in res["phases"]
           if t["phase"].startswith("select_") and t["done"]}
  lines = []
  for name, auc in res["auroc"].items():
    if auc is None:
      continue
    wall = f", selection phase {walls[name]:.0f} s" if name in walls else " (cheap score, no phase)"
    lines.append(f"selection `{name}`: AUROC {auc:.3f}{wall}")
  return lines


def render(res: dict) -> str:
  rows = [[t["phase"], f"{t['wall_s']:.0f}", t["steps"],
           f"{t['median_step_s']:.2f}" if t["median_step_s"] else "-", f"{t['first_step_s']:.0f}",
           t["attempts"], "yes" if t["done"] else "no"] for t in res["phases"]]
  table = bc.markdown_table(["phase", "wall s", "steps", "median s/step",
                             "s before first step (set-up, compile)", "attempts", "finished"], rows)
  total = f"{res['total_s']:.0f} s" if res["total_s"] is not None else "unknown (no report yet)"
  return f"""## The demo end to end (`scripts/bench.py demo`)

Read from the run directory `{Path(res['workdir']).relative_to(bc.REPO) if Path(res['workdir']).is_relative_to(bc.REPO) else res['workdir']}`
(started {res['started']}), not rerun: wall time per phase from the TensorBoard event stamps
(logger opened -> `result.json`), median seconds per step between consecutive step stamps. Phases
not listed (data preparation, pool scoring, evaluation, the report) are in the whole-run time only.
The load on the machine while the demo ran is not recorded in the run directory; this machine is
shared, so these are wall times under whatever load there was.

{table}

- whole run (`config.json` -> newest file of `report/`): {total}
{"".join(f"- {line}{chr(10)}" for line in _selection_lines(res))}
Read on:
{bc.machine_markdown(bc.machine_description())}
"""


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
  p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
  p.add_argument("--json", default="", help="also dump the timings to this file")
  args = p.parse_args(argv)
  res = run(write_docs=not args.no_docs, workdir=args.workdir)
  if args.json:
    Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
