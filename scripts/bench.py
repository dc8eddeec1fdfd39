"""The benchmark suite: one entry point, one sub-benchmark per part of the library.

  .venv/bin/python scripts/bench.py sft|hypergrad|sampling|demo|all [--rounds N] [--kinds lora,full]
      [--no-docs]

Each sub-benchmark prints medians of alternating runs and its ratios (against PyTorch on the same
work, against the plain SFT step where that applies, achieved FLOP/s against the f32 matmul peak
measured in the same run) and rewrites its own section of ``docs/benchmarks.md``.

Adding a sub-benchmark: write ``run(rounds: int = ..., write_docs: bool = True) -> dict`` in a module under
``scripts/`` (helpers in ``scripts/bench_common.py``) and add one line to :data:`REGISTRY` naming the
module and function. Modules are imported only when their benchmark runs, so a missing part does not
stop the others.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (module under scripts/, function, one-line description)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "sft": ("bench_sft_step", "run", "plain SFT step, full and LoRA, JAX vs PyTorch"),
    "hypergrad": ("bench_hypergrad", "run", "hypergradient estimators and unroll K=1,2,4"),
    "sampling": ("bench_sampling", "run", "KV-cache sampler vs transformers generate"),
    "demo": ("bench_demo", "run", "the demo end to end"),
}


def run_one(name: str, rounds: int | None, write_docs: bool, kinds: tuple[str, ...] | None = None) -> bool:
  module_name, fn_name, _ = REGISTRY[name]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name == module_name:
      print(f"[{name}] not written yet (scripts/{module_name}.py is missing); skipped", flush=True)
      return True
    raise
  start = time.perf_counter()
  kwargs = {"write_docs": write_docs}
  if rounds is not None:
    kwargs["rounds"] = rounds
  fn = getattr(module, fn_name)
  # Only the model benchmarks have a trainable set; the others ignore --kinds rather than fail.
  if kinds is not None and "kinds" in inspect.signature(fn).parameters:
    kwargs["kinds"] = kinds
  fn(**kwargs)
  print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
  return True


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("which", choices=[*REGISTRY, "all"], help="; ".join(f"{k}: {v[2]}" for k, v in REGISTRY.items()))
  p.add_argument("--rounds", type=int, default=None, help="timed runs per side (default: each benchmark's own)")
  p.add_argument("--kinds", default=None,
                 help="comma-separated trainable sets (lora, full) for sft and hypergrad (default: both)")
  p.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
  args = p.parse_args(argv)
  names = list(REGISTRY) if args.which == "all" else [args.which]
  failed = []
  for name in names:
    try:
      run_one(name, args.rounds, not args.no_docs,
              tuple(args.kinds.split(",")) if args.kinds else None)
    except Exception:  # one broken part must not hide the others' numbers
      traceback.print_exc()
      failed.append(name)
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
