"""Profile of the ``unroll`` hypergradient on the real model (LoRA, the benchmark's shapes).

Two tools, both on SmolLM2-135M-Instruct, f32, B=4, T=128, LoRA rank 8 on every projection (the
setting of ``scripts/bench_hypergrad.py``):

* ``--cost``: compiles each variant (the SFT step, the validation gradient, ``unroll`` at K and remat
  policy given) and prints XLA's ``cost_analysis()`` FLOPs and bytes accessed and
  ``memory_analysis()``; no run, so it is cheap and independent of the machine's load.
* ``--trace VARIANT``: runs one variant ``--runs`` times under ``jax.profiler.trace`` and sums the
  trace's events by name (the HLO ops and fusions XLA:CPU's thunks report), printing the top ones.

Variants are named ``sft``, ``valgrad`` or ``unroll:K[:OPTION...]``, each OPTION one of ``adjoint`` /
``autodiff`` (``Unroll.backward``; the profile below was taken of autodiff, which every other
option implies), ``peel`` / ``nopeel`` (``Unroll.peel_first``), ``unroll=N`` or ``unroll=true``
(``Unroll.scan_unroll``), or a remat policy (a name from ``jax.checkpoint_policies``, or ``none``),
e.g. ``unroll:2:nopeel:dots_saveable``; ``unroll:2`` alone is the default (adjoint).

  .venv/bin/python scripts/profile_unroll.py --cost sft valgrad unroll:1 unroll:2 unroll:2:none
  .venv/bin/python scripts/profile_unroll.py --trace unroll:2 --runs 1 --dir /tmp/prof_k2
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hypergrad import INNER_LR, K_MAX, NUM_LOGITS, batches_np  # noqa: E402
from bench_sft_step import BATCH, LORA_ALPHA, LORA_RANK  # noqa: E402


def build():
  import jax
  import jax.numpy as jnp

  from bilevel_jax.core import hypergrad, select, sft
  from bilevel_jax.model import load, lora

  cfg, params, _ = load.load_smollm2()
  spec = lora.TrainableSpec(kind="lora", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)
  adapters = lora.init_lora(cfg, spec, jax.random.key(1))
  trainable, frozen = lora.split(spec, cfg, params, adapters)
  optimizer = sft.sgd_or_adam("sgd", INNER_LR)
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(spec, cfg))
  problem = hypergrad.Problem(loss_fn, optimizer)
  data = jax.tree.map(jnp.asarray, batches_np(K_MAX, cfg.vocab_size))
  key = jax.random.key(0)

  def variant(name: str):
    """``(jitted fn, args)`` for a variant name."""
    if name == "sft":
      step = sft.make_inner_step(loss_fn, optimizer, donate=False)
      train0 = jax.tree.map(lambda x: x[0], data["train"])
      return step, (trainable, frozen, optimizer.init(trainable), train0,
                    jnp.ones((BATCH,), jnp.float32))
    if name == "valgrad":
      f = jax.jit(jax.value_and_grad(hypergrad.mean_loss, argnums=1), static_argnums=0)
      return (lambda *a: f(loss_fn, *a)), (trainable, frozen, data["val"])
    parts = name.split(":")
    assert parts[0] == "unroll", name
    settings = {"k": int(parts[1])}
    for part in parts[2:]:
      settings.setdefault("backward", "autodiff")
      if part in ("adjoint", "autodiff"):
        settings["backward"] = part
      elif part in ("peel", "nopeel"):
        settings["peel_first"] = part == "peel"
      elif part.startswith("unroll="):
        value = part.split("=", 1)[1]
        settings["scan_unroll"] = True if value == "true" else int(value)
      else:
        settings["remat_policy"] = None if part == "none" else part
    est = hypergrad.make_estimator("unroll", **settings)
    logit_opt = select.make_logit_optimizer(est)
    state = select.init_state(problem, est, trainable, NUM_LOGITS, logit_opt)
    batches = {"train": jax.tree.map(lambda x: x[:est.train_batches], data["train"]),
               "val": data["val"]}
    return select.make_outer_step(problem, est, logit_opt, donate=False), (state, frozen, batches, key)

  return variant


def cost(variant, names, hlo_dir: str = ""):
  for name in names:
    fn, args = variant(name)
    t = time.perf_counter()
    compiled = fn.lower(*args).compile() if hasattr(fn, "lower") else None
    if compiled is None:
      import jax
      compiled = jax.jit(fn).lower(*args).compile()
    secs = time.perf_counter() - t
    if hlo_dir:
      Path(hlo_dir).mkdir(parents=True, exist_ok=True)
      (Path(hlo_dir) / f"{name.replace(':', '_')}.hlo.txt").write_text(compiled.as_text())
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    m = compiled.memory_analysis()
    print(json.dumps({"variant": name, "gflops": round(ca.get("flops", 0) / 1e9, 1),
                      "transcendentals_M": round(ca.get("transcendentals", 0) / 1e6, 1),
                      "gbytes_accessed": round(ca.get("bytes accessed", 0) / 1e9, 1),
                      "temp_gib": round(m.temp_size_in_bytes / 2**30, 2),
                      "arg_gib": round(m.argument_size_in_bytes / 2**30, 2),
                      "compile_s": round(secs, 1)}), flush=True)


def summarize_trace(trace_dir: str, top: int = 40) -> None:
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  files += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    print("no trace.json.gz under", trace_dir)
    return
  with gzip.open(sorted(files)[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  by_name = collections.defaultdict(lambda: [0.0, 0])
  by_thread = collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X":
      continue
    by_name[e["name"]][0] += e.get("dur", 0) / 1e6
    by_name[e["name"]][1] += 1
    by_thread[threads.get((e["pid"], e["tid"]), str(e["tid"]))] += e.get("dur", 0) / 1e6
  print("threads (summed event seconds):", {k: round(v, 1) for k, v in by_thread.items()})
  skip = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjRt", "TfrtCpu")
  ops = {k: v for k, v in by_name.items() if not k.startswith(skip)}
  by_kind = collections.defaultdict(float)
  for name, (secs, _) in ops.items():
    by_kind[name.split(".")[0]] += secs
  total = sum(by_kind.values())
  print(f"HLO op events: {total:.2f} s in all; by kind:")
  for kind, secs in sorted(by_kind.items(), key=lambda kv: -kv[1])[:15]:
    print(f"  {secs:9.3f} s  {100 * secs / max(total, 1e-9):5.1f}%  {kind}")
  print("top ops:")
  for name, (secs, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f"{secs:9.3f} s  {n:6d}x  {name[:150]}")


def trace(variant, name: str, runs: int, trace_dir: str) -> None:
  import jax

  fn, args = variant(name)
  if hasattr(fn, "lower"):
    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    (Path(trace_dir) / "hlo.txt").write_text(fn.lower(*args).compile().as_text())
  out = fn(*args)
  jax.block_until_ready(out)  # compile and warm up
  t = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(runs):
      jax.block_until_ready(fn(*args))
  print(f"{name}: {(time.perf_counter() - t) / runs:.2f} s per run (traced)", flush=True)
  summarize_trace(trace_dir)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cost", nargs="*", default=[])
  p.add_argument("--trace", default="")
  p.add_argument("--runs", type=int, default=1)
  p.add_argument("--hlo", default="", help="with --cost: write each variant's compiled HLO here")
  p.add_argument("--dir", default="/tmp/prof_unroll")
  p.add_argument("--summarize", default="", help="only summarize an existing trace directory")
  args = p.parse_args()
  if args.summarize:
    return summarize_trace(args.summarize)
  variant = build()
  if args.cost:
    cost(variant, args.cost, args.hlo)
  if args.trace:
    trace(variant, args.trace, args.runs, args.dir)


if __name__ == "__main__":
  main()
