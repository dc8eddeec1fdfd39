"""The ``bilevel-jax`` command line (thin: parsing here, work in ``bilevel_jax.experiment``).

    bilevel-jax select   --config configs/X.py [--config.key=value ...]
    bilevel-jax finetune --config configs/X.py ...   (selection first when needed)
    bilevel-jax evaluate --config configs/X.py ...
    bilevel-jax run      --config configs/X.py ...   (everything, then the report)
    bilevel-jax report   --config configs/X.py ...   (from finished phases; trains nothing)
    bilevel-jax refine   --config configs/X.py ...   (BDS, then online self-refinement: BMO)
    bilevel-jax plan     --config configs/X.py ...   (memory plan of the jitted steps)
    bilevel-jax data summary --pool NAME

Every command resumes what an earlier call with the same config left unfinished.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

COMMANDS = ("select", "finetune", "evaluate", "run", "report", "refine", "plan")


def _parse(argv: Sequence[str]) -> tuple[str, str, list[str]]:
  parser = argparse.ArgumentParser(prog="bilevel-jax", description=__doc__.split("\n\n")[0])
  parser.add_argument("command", choices=COMMANDS)
  parser.add_argument("--config", required=True, help="configs/X.py or configs/X.py:variant")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
    overrides.append(item[len("--config."):])
  return args.command, args.config, overrides


def main(argv: Sequence[str] | None = None) -> int:
  # Before JAX starts its threads: reuse freed step temporaries instead of page-faulting them in
  # again every step (bilevel_jax/allocator.py).
  from bilevel_jax import allocator
  allocator.keep_freed_memory()
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["data"]:
    if argv[1:2] != ["summary"]:
      print("usage: bilevel-jax data summary --pool NAME", file=sys.stderr)
      return 2
    from bilevel_jax.data import summary
    return int(summary.main(argv[2:]) or 0)
  command, spec, overrides = _parse(argv)
  from bilevel_jax import config as config_lib
  try:
    cfg = config_lib.load(spec, overrides)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  import jax
  # Before the first computation starts JAX's CPU client: run computations on this thread, whose
  # arena is the main heap (bilevel_jax/allocator.py). Not earlier: `data` and a config error do
  # not need JAX.
  allocator.run_cpu_computations_inline()
  if cfg.mesh.distributed:
    from bilevel_jax import distributed
    distributed.initialize(cfg.mesh)
  # Compiled steps are cached on disk, so a resumed or repeated run does not compile again.
  cache = os.environ.get("BILEVEL_JAX_COMPILE_CACHE",
                         str(Path.home() / ".cache" / "bilevel_jax" / "jax_compile"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if command == "plan":
    from bilevel_jax import sharding
    if not hasattr(sharding, "plan_from_config"):
      print("plan: bilevel_jax.sharding has no plan_from_config(cfg) yet", file=sys.stderr)
      return 2
    sharding.plan_from_config(cfg)
    return 0
  from bilevel_jax import experiment
  from bilevel_jax.checkpoint import FingerprintMismatch
  from bilevel_jax.metrics import TooManyNonFinite
  until = {"select": "select", "finetune": "finetune", "evaluate": "evaluate", "run": "report",
           "report": "report", "refine": "report"}[command]
  methods = ("bds", "bmo") if command == "refine" else None
  try:
    workdir = experiment.run(cfg, until=until, train=command != "report", methods=methods)
  except (FingerprintMismatch, TooManyNonFinite) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary_path = workdir / "report" / "summary.json"
  if until == "report" and summary_path.exists():
    import json
    from bilevel_jax import report as report_lib
    print(report_lib.console_summary(json.loads(summary_path.read_text())))
  print(f"done: {workdir}" + (f" (report: {workdir / 'report' / 'index.html'})"
                              if until == "report" else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
