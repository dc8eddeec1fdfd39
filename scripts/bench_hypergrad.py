"""Benchmark: every hypergradient estimator's outer step on the real model, against the SFT step.

For SmolLM2-135M-Instruct (f32, B=4, T=128, LoRA rank 8 on every projection of every layer, or
full fine-tuning) this measures, for each estimator's jitted outer step
(``select.make_outer_step``: the estimator plus the logits' Adam step) and for ``unroll`` at K = 1, 2,
4:

* wall time, median of ``rounds`` runs after one warm-up run, *alternating* each run with one plain
  SFT step (``sft.make_inner_step``, same inner optimizer: SGD) so that both see the same load; the
  ratio is the estimator's median over the SFT medians of the same block;
* ``compiled.memory_analysis()``: temp + argument + output bytes (and the aliased bytes that
  donation saves), and the ratio to the SFT step's;
* the process's peak resident memory during the timed runs.

Then ``unroll`` against the same computation in PyTorch (``torch.func.functional_call`` and nested
``torch.func.grad`` through K SGD steps, ``attn_implementation="eager"``: its fused attention has no
double backward) in ``.venv-torch``, where free memory allows. LoRA runs both sides alternately;
full fine-tuning runs JAX and PyTorch one after the other, never concurrently (each needs 7-16 GB),
and a run is skipped with its reason when ``free`` memory is short.

Checks printed and written: ``unroll`` step <= (3K + 1) x SFT step; memory growth per extra unrolled
step <= 1.2 x (trainable params + inner optimizer state) + one step's activations (the SFT step's
temp bytes stand in for one step's activations).

  .venv/bin/python scripts/bench_hypergrad.py [--kinds lora,full] [--rounds 3] [--no-torch]

(``scripts/bench.py hypergrad`` runs the same thing as part of the suite.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from bench_sft_step import BATCH, GGUF_NAME, LORA_ALPHA, LORA_RANK, SEQ, THREADS, gguf_dir, make_batch, torch_lora_linear  # noqa: E402

INNER_LR = 1e-3   # inner SGD (the library default for hypergradients: DESIGN.md section 7)
K_MAX = 4         # train batches prepared; logits cover B * K_MAX rows
NUM_LOGITS = BATCH * K_MAX
# label -> (estimator name, settings, initial estimator step). likelihood_ratio runs one branch of a
# lax.cond per call: fitting for its first fit_steps calls, scoring after; both are timed.
LAYER_REMAT = "_layer_remat"  # a settings key of the bench, not of the estimator
CONFIGS: dict[str, tuple[str, dict, int]] = {
    "unroll K=1": ("unroll", {"k": 1}, 0),
    "unroll K=2": ("unroll", {"k": 2}, 0),
    "unroll K=4": ("unroll", {"k": 4}, 0),
    "penalty": ("penalty", {}, 0),
    "penalty_vf (T=1)": ("penalty_vf", {"inner_steps": 1}, 0),
    "implicit (cg, 5 iters)": ("implicit", {"method": "cg", "iters": 5}, 0),
    "one_step": ("one_step", {"lr": INNER_LR}, 0),
    "likelihood_ratio (fit)": ("likelihood_ratio", {"fit_steps": 30}, 0),
    "likelihood_ratio (score)": ("likelihood_ratio", {"fit_steps": 30}, 30),
    # Opt-in (``--only``), for the profile of ``unroll`` (docs/benchmarks.md): the scanned inner
    # step without jax.checkpoint, other remat policies, the first step left in the scan
    # (``peel_first=False``, the layout before the profile) and an unrolled scan, all of them
    # autodiff through the scan (``Unroll.backward="autodiff"``; the default is "adjoint").
    "unroll K=2 (no remat)": ("unroll", {"k": 2, "remat_policy": None, "backward": "autodiff"}, 0),
}
_OPT_IN = {"no peel": {"peel_first": False}, "peel": {"peel_first": True},
           "no remat": {"remat_policy": None},
           "dots_saveable": {"remat_policy": "dots_saveable"},
           "dots_no_batch": {"remat_policy": "dots_with_no_batch_dims_saveable"},
           "scan unroll": {"scan_unroll": True},
           "adjoint": {"backward": "adjoint"}, "autodiff": {"backward": "autodiff"},
           # adjoint, keeping the first / every step's linearization (``Unroll.keep_linearization``)
           "keep none": {"backward": "adjoint", "keep_linearization": "none"},
           "keep first": {"backward": "adjoint", "keep_linearization": "first"},
           "keep all": {"backward": "adjoint", "keep_linearization": "all"},
           # per-layer jax.checkpoint in the model for this estimator only (the SFT step it
           # alternates with keeps the worker's setting)
           "layer remat": {LAYER_REMAT: True}}
for _k in (1, 2, 4):
  for _name in ("no peel", "peel", "peel+no remat", "peel+dots_saveable", "peel+dots_no_batch",
                "peel+scan unroll", "no peel+dots_no_batch", "peel+layer remat",
                "peel+layer remat+dots_no_batch", "no peel+layer remat", "adjoint", "autodiff",
                "adjoint+layer remat", "keep none", "keep first", "keep all"):
    # every option but "adjoint" and "keep ..." is a setting of autodiff through the scan
    _settings = {"k": _k, "backward": "autodiff"}
    for _part in _name.split("+"):
      _settings.update(_OPT_IN[_part])
    CONFIGS.setdefault(f"unroll K={_k} ({_name})", ("unroll", _settings, 0))
DEFAULT_LABELS = ["unroll K=1", "unroll K=2", "unroll K=4", "penalty", "penalty_vf (T=1)",
                  "implicit (cg, 5 iters)", "one_step", "likelihood_ratio (fit)",
                  "likelihood_ratio (score)"]
# Rough resident-memory needs (GB) used to decide whether a run may start (measured ones replace
# these in the doc). torch.func keeps every step's graph for the double backward: the LoRA K=1 step
# was seen at 7.3 GB resident, so about 6 GB per unrolled step on top of the model.
NEED_GB = {("jax", "lora"): 5, ("jax", "full"): 12,
           ("torch", "lora", 1): 8, ("torch", "lora", 2): 14, ("torch", "lora", 4): 26,
           ("torch", "full", 1): 10, ("torch", "full", 2): 17, ("torch", "full", 4): 30}
HEADROOM_GB = 3


def batches_np(k: int, vocab: int) -> dict:
  """``k`` train batches (rows ``i*B .. i*B+B-1`` of the logits) stacked, and one validation batch."""
  train = []
  for i in range(k):
    b = make_batch(vocab, seed=i)
    b["index"] = b["index"] + i * BATCH
    train.append(b)
  import numpy as np
  stacked = {key: np.stack([b[key] for b in train]) for key in train[0]}
  return {"train": stacked, "val": make_batch(vocab, seed=100)}


def available_gb() -> float:
  text = Path("/proc/meminfo").read_text()
  for line in text.splitlines():
    if line.startswith("MemAvailable:"):
      return int(line.split()[1]) / 2**20
  return 0.0


# ----------------------------------------------------------------------------- JAX side


def jax_worker(kind: str, layer_remat: bool, per_layer: bool = False) -> None:
  from bilevel_jax import allocator
  allocator.run_cpu_computations_inline()  # as the CLI does
  import jax
  import jax.numpy as jnp

  from bilevel_jax.core import hypergrad, select, sft
  from bilevel_jax.model import load, lora

  cfg, params, _ = load.load_smollm2()
  cfg = cfg.replace(remat=layer_remat)
  spec = lora.TrainableSpec(kind=kind, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA,
                            per_layer=per_layer)
  adapters = lora.init_lora(cfg, spec, jax.random.key(1)) if kind == "lora" else None
  trainable, frozen = lora.split(spec, cfg, params, adapters)
  del params
  optimizer = sft.sgd_or_adam("sgd", INNER_LR)
  loss_fn = sft.make_loss_fn(lora.make_logits_fn(spec, cfg))
  problem = hypergrad.Problem(loss_fn, optimizer)
  problems = {layer_remat: problem, not layer_remat: hypergrad.Problem(
      sft.make_loss_fn(lora.make_logits_fn(spec, cfg.replace(remat=not layer_remat))), optimizer)}
  data = jax.tree.map(jnp.asarray, batches_np(K_MAX, cfg.vocab_size))
  key = jax.random.key(0)
  trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(optimizer.init(trainable)))

  def mem_dict(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {f: int(getattr(m, f + "_size_in_bytes", 0) or 0)
           for f in ("temp", "argument", "output", "alias", "generated_code")}
    out["total"] = out["temp"] + out["argument"] + out["output"]
    return out

  # The plain SFT step (donated params and optimizer state), same loss and optimizer.
  sft_step = sft.make_inner_step(loss_fn, optimizer)
  train0 = jax.tree.map(lambda x: x[0], data["train"])
  ones = jnp.ones((BATCH,), jnp.float32)
  sft_state = {"params": jax.tree.map(jnp.copy, trainable), "opt": optimizer.init(trainable)}
  t0 = time.perf_counter()
  sft_compiled = sft_step.lower(sft_state["params"], frozen, sft_state["opt"], train0, ones).compile()
  sft_compile_s = time.perf_counter() - t0

  def sft_run():
    start = time.perf_counter()
    p, s, m = sft_compiled(sft_state["params"], frozen, sft_state["opt"], train0, ones)
    jax.block_until_ready((p, s, m))
    sft_state["params"], sft_state["opt"] = p, s
    return {"seconds": time.perf_counter() - start}

  compiled_cache: dict = {}
  live: dict = {}

  def prepare(label: str) -> dict:
    name, settings, start_step = CONFIGS[label]
    settings = dict(settings)
    prob = problems[settings.pop(LAYER_REMAT, layer_remat)]
    est = hypergrad.make_estimator(name, **settings)
    logit_opt = select.make_logit_optimizer(est)
    state = select.init_state(prob, est, trainable, NUM_LOGITS, logit_opt)
    if start_step:
      state = state._replace(est=state.est._replace(step=jnp.asarray(start_step, jnp.int32)))
    batches = {"train": jax.tree.map(lambda x: x[:est.train_batches], data["train"]),
               "val": data["val"]}
    compile_s = 0.0
    if (est, prob) not in compiled_cache:
      t = time.perf_counter()
      compiled_cache[(est, prob)] = select.make_outer_step(prob, est, logit_opt).lower(
          state, frozen, batches, key).compile()
      compile_s = time.perf_counter() - t
    compiled = compiled_cache[(est, prob)]
    live[label] = {"state": state, "compiled": compiled, "batches": batches}
    first = run_config(label)  # warm-up: allocations, thread pools
    bc.reset_peak_rss()
    return {"compile_s": compile_s, "first_s": first["seconds"], "memory": mem_dict(compiled),
            "metrics": first["metrics"]}

  def run_config(label: str) -> dict:
    c = live[label]
    start = time.perf_counter()
    state, metrics = c["compiled"](c["state"], frozen, c["batches"], key)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    c["state"] = state
    return {"seconds": seconds, "metrics": {k: float(v) for k, v in metrics.items()}}

  def drop(label: str) -> dict:
    peak = bc.peak_rss_bytes()
    live.pop(label, None)
    return {"peak_rss": peak}

  sft_run()
  bc.serve(
      {"sft": sft_run, "prepare": prepare, "step": lambda label: run_config(label), "drop": drop},
      ready={"side": "jax", "kind": kind, "jax": jax.__version__, "layer_remat": layer_remat,
             "sft_compile_s": sft_compile_s, "sft_memory": mem_dict(sft_compiled),
             "trainable_bytes": trainable_bytes, "opt_bytes": opt_bytes,
             "trainable_params": sum(x.size for x in jax.tree.leaves(trainable))})


# ----------------------------------------------------------------------------- PyTorch side


def torch_worker(kind: str) -> None:
  import torch
  import transformers
  from torch import nn
  from torch.func import functional_call, grad
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32,
                                               attn_implementation="eager")
  model.eval()  # no dropout; gradients flow all the same

  LoRALinear = torch_lora_linear()

  for p in model.parameters():
    p.requires_grad_(False)
  if kind == "lora":
    for layer in model.model.layers:
      for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                            (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
          setattr(parent, name, LoRALinear(getattr(parent, name)))
    params = {n: p.detach() for n, p in model.named_parameters() if n.endswith((".a", ".b"))}
  else:
    params = {n: p.detach() for n, p in model.named_parameters()}

  data = batches_np(K_MAX, model.config.vocab_size)

  def to_torch(b):
    return {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
            for k, v in b.items()}

  train = [to_torch({k: v[i] for k, v in data["train"].items()}) for i in range(K_MAX)]
  val = to_torch(data["val"])

  def per_example(ps, b):
    logits = functional_call(model, ps, (b["tokens"],), {"position_ids": b["positions"]}).logits
    nll = nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(),
                                      reduction="none").view(BATCH, SEQ)
    return (nll * b["loss_mask"]).sum(-1) / b["loss_mask"].sum(-1).clamp_min(1.0)

  def weighted(ps, w, b):
    return (w * per_example(ps, b)).mean()

  def make_outer(k):
    def outer(omega, ps):
      p = NUM_LOGITS * torch.softmax(omega, 0)
      for b in train[:k]:
        g = grad(weighted)(ps, p[b["index"]], b)
        ps = {n: ps[n] - INNER_LR * g[n] for n in ps}
      return per_example(ps, val).mean(), {n: v.detach() for n, v in ps.items()}
    return grad(outer, has_aux=True)

  state = {"params": params, "omega": torch.zeros(NUM_LOGITS), "hypergrad_norm": []}

  def step(k: int) -> dict:
    start = time.perf_counter()
    g, new = make_outer(k)(state["omega"], state["params"])
    state["params"] = new  # warm start, as the JAX estimator
    state["hypergrad_norm"].append(float(g.norm()))
    return {"seconds": time.perf_counter() - start}

  def stats() -> dict:
    return {"peak_rss": bc.peak_rss_bytes(), "hypergrad_norm": state["hypergrad_norm"]}

  bc.serve({"step": step, "reset": lambda: {"ok": bc.reset_peak_rss()}, "stats": stats},
           ready={"side": "torch", "kind": kind, "torch": torch.__version__,
                  "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                  "attention": model.config._attn_implementation,
                  "trainable_params": sum(v.numel() for v in params.values())})


# ----------------------------------------------------------------------------- orchestrator


def _fits(need_gb: float) -> tuple[bool, str]:
  avail = available_gb()
  ok = avail >= need_gb + HEADROOM_GB
  return ok, f"available {avail:.1f} GB, need ~{need_gb} GB + {HEADROOM_GB} GB headroom"


def _load() -> str:
  return "%.1f" % bc.load_average()[0]


def run_jax_configs(jw: bc.Worker, kind: str, labels: list[str], rounds: int,
                    torch_worker: bc.Worker | None, torch_ks: tuple[int, ...],
                    on_result=lambda out: None) -> dict:
  """Per config: compile, warm up, then ``rounds`` alternations of (SFT step, outer step[, torch]).

  The PyTorch side runs a K only when free memory allows it at that moment (the machine is shared:
  what was free at the start may not be now); a PyTorch worker that dies (out of memory) is dropped
  with its reason and the JAX side goes on. ``on_result`` gets the results so far after each config,
  so that a run cut short still leaves its finished rows.
  """
  out = {}
  for label in labels:
    print(f"[hypergrad/{kind}] {label}: compiling...", flush=True)
    prep = jw.call("prepare", label=label)
    k = CONFIGS[label][1].get("k") if CONFIGS[label][0] == "unroll" else None
    workers = {"sft": ("sft", {}), "est": ("step", {"label": label})}
    use_torch = torch_worker is not None and k in torch_ks
    torch_skip = None
    if use_torch:
      ok, why = _fits(NEED_GB[("torch", kind, k)])
      if not ok:
        use_torch, torch_skip = False, why
        print(f"[hypergrad/{kind}] torch K={k} skipped: {why}", flush=True)
    if use_torch:
      try:
        torch_worker.call("step", k=k)  # warm-up
        torch_worker.call("reset")
      except (bc.WorkerError, BrokenPipeError) as e:
        use_torch, torch_skip = False, f"PyTorch worker died in its warm-up step ({e})"
        torch_worker = None
        print(f"[hypergrad/{kind}] torch K={k}: {torch_skip}", flush=True)
    seconds = {"sft": [], "est": [], "torch": []}
    loads = [_load()]
    for r in range(rounds):
      order = ["sft", "est"] + (["torch"] if use_torch else [])
      for side in (order if r % 2 == 0 else order[::-1]):
        time.sleep(0.3)
        if side == "torch":
          seconds["torch"].append(torch_worker.call("step", k=k)["seconds"])
        else:
          cmd, kwargs = workers[side]
          seconds[side].append(jw.call(cmd, **kwargs)["seconds"])
      loads.append(_load())
    drop = jw.call("drop", label=label)
    res = {"sft": bc.Timing(seconds["sft"]), "est": bc.Timing(seconds["est"]), "loads": loads,
           "compile_s": prep["compile_s"], "memory": prep["memory"], "peak_rss": drop["peak_rss"],
           "metrics": prep["metrics"], "k": k}
    if use_torch:
      res["torch"] = bc.Timing(seconds["torch"])
      res["torch_rss"] = torch_worker.call("stats")["peak_rss"]
    elif torch_skip:
      res["skipped"] = torch_skip
    out[label] = res
    on_result(out)
    ratio = res["est"].median / res["sft"].median
    line = (f"[hypergrad/{kind}] {label}: {res['est'].median:.2f} s (range {res['est'].spread}) = "
            f"{ratio:.2f} x SFT {res['sft'].median:.2f} s; mem {bc.gib(prep['memory']['total'])}; "
            f"peak RSS {bc.gib(drop['peak_rss'])}; load {' '.join(loads)}")
    if use_torch:
      line += f"; torch {res['torch'].median:.2f} s, RSS {bc.gib(res['torch_rss'])}"
    print(line, flush=True)
  return out


def run_torch_only(kind: str, ks: tuple[int, ...], rounds: int, env: dict) -> dict:
  """PyTorch unroll runs alone (full fine-tuning: never next to the JAX process)."""
  script = Path(__file__).resolve()
  out = {}
  for k in ks:
    ok, why = _fits(NEED_GB[("torch", kind, k)])
    if not ok:
      out[k] = {"skipped": why}
      print(f"[hypergrad/{kind}] torch K={k} skipped: {why}", flush=True)
      continue
    with bc.Worker(f"torch-{kind}", [bc.TORCH_PYTHON, script, "--worker", "torch", "--kind", kind],
                   env) as tw:
      info = tw.info
      tw.call("step", k=k)
      tw.call("reset")
      loads = [_load()]
      secs = []
      for _ in range(rounds):
        time.sleep(0.3)
        secs.append(tw.call("step", k=k)["seconds"])
        loads.append(_load())
      stats = tw.call("stats")
    out[k] = {"torch": bc.Timing(secs), "torch_rss": stats["peak_rss"], "loads": loads, "info": info}
    print(f"[hypergrad/{kind}] torch K={k}: {out[k]['torch'].median:.2f} s (range "
          f"{out[k]['torch'].spread}), peak RSS {bc.gib(stats['peak_rss'])}, load {' '.join(loads)}",
          flush=True)
  return out


def run(kinds=("lora", "full"), rounds: int = 3, write_docs: bool = True, torch: bool = True,
        labels: list[str] | None = None, layer_remat: bool = False, per_layer: bool = False,
        torch_ks: tuple[int, ...] | None = None) -> dict:
  """Runs the benchmark; returns per-kind results and (optionally) rewrites the ``hypergrad`` section.

  ``torch_ks`` limits the PyTorch comparison to these K (default: every K of the ``unroll`` labels).
  The section is rewritten after every config, so a run cut short keeps its finished rows.
  """
  subset = labels is not None and list(labels) != DEFAULT_LABELS
  labels = labels or DEFAULT_LABELS
  # A run without LoRA (e.g. ``--kinds full`` alone, which needs the machine to itself) or of a subset
  # of the labels writes its own section, so it does not replace the tables of an earlier full run.
  section = "hypergrad" if "lora" in kinds else "hypergrad-" + "-".join(kinds)
  if subset:
    section = "hypergrad-only-" + "-".join(kinds)
  if per_layer:
    section += "-per-layer"
  results_labels = labels if subset else None
  if torch:
    import subprocess
    subprocess.run(["bash", str(bc.REPO / "scripts" / "setup_torch_env.sh")], check=True)
  script = Path(__file__).resolve()
  env = {**THREADS, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "TOKENIZERS_PARALLELISM": "false"}
  unroll_ks = {CONFIGS[l][1]["k"] for l in labels if CONFIGS[l][0] == "unroll"}
  torch_ks = tuple(sorted(unroll_ks & set(torch_ks) if torch_ks is not None else unroll_ks))
  results = {"_machine": bc.machine_description(), "_layer_remat": layer_remat,
             "_per_layer": per_layer,
             "_labels": results_labels}
  for kind in kinds:
    ok, why = _fits(NEED_GB[("jax", kind)])
    if not ok:
      results[kind] = {"skipped": why}
      print(f"[hypergrad/{kind}] JAX skipped: {why}", flush=True)
      continue
    argv = [bc.JAX_PYTHON, script, "--worker", "jax", "--kind", kind] + (
        ["--layer-remat"] if layer_remat else []) + (["--per-layer"] if per_layer else [])
    tw = None
    torch_side = {}
    if torch and kind == "lora":  # small enough to alternate with the JAX side
      ok, why = _fits(NEED_GB[("torch", kind, min(torch_ks))] if torch_ks else 0)
      if ok and torch_ks:  # each K is checked again before it runs
        tw = bc.Worker(f"torch-{kind}", [bc.TORCH_PYTHON, script, "--worker", "torch",
                                        "--kind", kind], env)
      elif torch_ks:
        torch_side = {k: {"skipped": why} for k in torch_ks}

    def partial(configs, kind=kind):
      if write_docs:
        results[kind] = {"info": info, "configs": configs}
        bc.update_markdown_section(section, render(results, rounds))

    try:
      print(f"[hypergrad/{kind}] starting JAX worker (load, SFT compile)...", flush=True)
      with bc.Worker(f"jax-{kind}", argv, env) as jw:
        info = jw.info
        res = run_jax_configs(jw, kind, labels, rounds, tw, torch_ks if tw else (), partial)
      if tw is not None:
        results["_torch_info"] = tw.info
    finally:
      if tw is not None:
        tw.close()
    if torch and kind != "lora" and torch_ks:
      torch_side = run_torch_only(kind, torch_ks, rounds, env)
      for v in torch_side.values():
        if "info" in v:
          results["_torch_info"] = v["info"]
    for k, v in torch_side.items():
      label = f"unroll K={k}"
      if label in res:
        res[label].update({key: val for key, val in v.items() if key != "info"})
    results[kind] = {"info": info, "configs": res}
  if write_docs:
    bc.update_markdown_section(section, render(results, rounds))
  return results


# ----------------------------------------------------------------------------- report


def _mem_target(info: dict, configs: dict) -> list[str]:
  """Growth per extra unrolled step vs 1.2 x (params + inner opt state) + one step's activations."""
  # Only rows of one variant compare ("unroll K=1" with "unroll K=2", "... (keep all)" with its K=2).
  by_variant: dict[str, dict[int, float]] = {}
  for label, c in configs.items():
    if c.get("k"):
      variant = re.sub(r"^unroll K=\d+\s*", "", label)
      by_variant.setdefault(variant, {})[c["k"]] = c["memory"]["total"]
  allowed = 1.2 * (info["trainable_bytes"] + info["opt_bytes"]) + info["sft_memory"]["temp"]
  lines = []
  for variant, mem in by_variant.items():
    for a, b in ((1, 2), (2, 4), (1, 4)):
      if a in mem and b in mem:
        growth = (mem[b] - mem[a]) / (b - a)
        lines.append(f"K={a}->{b}{' ' + variant if variant else ''}: {bc.gib(growth)} per extra "
                     f"step (allowed {bc.gib(allowed)}: {'met' if growth <= allowed else 'MISSED'})")
  return lines


def layout_words(results: dict) -> str:
  """How the trainable layers are stored, for the section's header."""
  if results.get("_per_layer"):
    return ("the model's layers stored per layer (`TrainableSpec(per_layer=True)`: run "
            "unrolled, not under `lax.scan`; the SFT step of the ratio uses the same layout)")
  return "layers stacked (run under `lax.scan`)"


def render(results: dict, rounds: int) -> str:
  sections = []
  for kind in ("lora", "full"):
    r = results.get(kind)
    if r is None:
      continue
    if "skipped" in r:
      sections.append(f"### {kind}\n\nSkipped: {r['skipped']}.\n")
      continue
    info, configs = r["info"], r["configs"]
    sft_mem = info["sft_memory"]["total"]
    rows = []
    for label, c in configs.items():
      ratio = c["est"].median / c["sft"].median
      target = ""
      if c.get("k"):
        target = f"<= {3 * c['k'] + 1}: {'met' if ratio <= 3 * c['k'] + 1 else 'MISSED'}"
      torch_cell = ""
      if "torch" in c:
        torch_cell = (f"{c['torch'].median:.2f} s / {bc.gib(c['torch_rss'])} "
                      f"(JAX/torch time {c['est'].median / c['torch'].median:.2f})")
      elif "skipped" in c:
        torch_cell = f"skipped ({c['skipped']})"
      m = c["memory"]
      rows.append([label, f"{c['est'].median:.2f} ({c['est'].spread})", f"{c['sft'].median:.2f}",
                   f"{ratio:.2f}", target, bc.gib(m["total"]), f"{m['total'] / sft_mem:.2f}",
                   f"{bc.gib(m['temp'])} / {bc.gib(m['alias'])}", bc.gib(c["peak_rss"]),
                   torch_cell, " ".join(c["loads"]), f"{c['compile_s']:.0f}"])
    table = bc.markdown_table(
        ["outer step", "median s (range)", "SFT step s (same block)", "x SFT", "unroll target (3K+1)",
         "memory: temp+arg+out", "x SFT memory", "temp / aliased", "peak RSS (JAX process)",
         "PyTorch torch.func: median / peak RSS", "load avg (1 min) during block", "compile s"],
        rows)
    growth = _mem_target(info, configs)
    sm = info["sft_memory"]
    sections.append(
        f"### {kind} ({info['trainable_params']:,} trainable params)\n\n{table}\n\n"
        f"- SFT step memory (temp+arg+out): {bc.gib(sft_mem)} (temp {bc.gib(sm['temp'])}); "
        f"trainable params {bc.gib(info['trainable_bytes'])}, inner optimizer state "
        f"{bc.gib(info['opt_bytes'])} (SGD)\n"
        + "".join(f"- memory growth, {g}\n" for g in growth))
  torch_info = results.get("_torch_info", {})
  extra = {"jax": next((results[k]["info"]["jax"] for k in ("lora", "full")
                        if k in results and "info" in results[k]), "?")}
  if torch_info:
    extra.update({"torch": torch_info.get("torch"), "transformers": torch_info.get("transformers"),
                  "torch attention": torch_info.get("attention")})
  desc = {**results["_machine"], **{k: str(v) for k, v in extra.items()}}
  kinds = [k for k in ("lora", "full") if k in results]
  title = ("Hypergradient estimators (`scripts/bench.py hypergrad`)" if "lora" in kinds else
           f"Hypergradient estimators, {' and '.join(kinds)} only "
           f"(`scripts/bench.py hypergrad --kinds {','.join(kinds)}`)")
  if results.get("_labels"):
    only = ",".join(results["_labels"])
    title = (f"Hypergradient estimators, {only} on {' and '.join(kinds)} "
             f"(`scripts/bench_hypergrad.py --kinds {','.join(kinds)} --only \"{only}\"`)")
  if results.get("_per_layer"):
    title += ", trainable layers stored per layer (`--per-layer`)"
  return f"""## {title}

SmolLM2-135M-Instruct (real weights), f32, B={BATCH}, T={SEQ}, inner optimizer SGD (lr {INNER_LR}),
logits optimizer Adam (`select.make_outer_step`, donated state), LoRA rank {LORA_RANK} on every
projection of every layer, or full fine-tuning; per-layer remat of the model
{'on' if results['_layer_remat'] else 'off'}; {layout_words(results)}; `unroll` is `Unroll(backward="adjoint")` (the reverse
pass written by hand, the default since 2026-11-30; labels in brackets are opt-in variants, and
`autodiff` ones are `jax.value_and_grad` through the scan with `jax.checkpoint` (`nothing_saveable`)
on the inner step, peeling the first step from K=3 on, as in tables of earlier runs: "Profile of
unroll" below). Each outer step is timed
{rounds} times after one warm-up, each run
alternating with one plain SFT step (`sft.make_inner_step`, same loss and SGD) so that both see the same
load; the ratio divides the medians of one block. Memory is `compiled.memory_analysis()` temp +
argument + output bytes (outputs aliased to donated arguments are counted twice there; the aliased
column shows how much). PyTorch: the same `unroll` (K SGD steps with `torch.func.functional_call` and
nested `torch.func.grad`, eager attention, 2 threads); for LoRA it alternates with the JAX runs, for
full fine-tuning it runs after the JAX process has exited (never both at once), when free memory allows.
The load average (2 cores) is recorded with each block; other processes may have run, so absolute
times are noisy and the same-block ratios are the numbers to read.

{chr(10).join(sections)}
Machine:
{bc.machine_markdown(desc)}
"""


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--kind", default="lora", choices=("full", "lora"), help=argparse.SUPPRESS)
  p.add_argument("--kinds", default="lora,full", help="comma-separated: lora, full")
  p.add_argument("--rounds", type=int, default=3, help="timed runs per outer step")
  p.add_argument("--only", default="", help="comma-separated config labels (default: all)")
  p.add_argument("--layer-remat", action="store_true", help="per-layer remat in the model")
  p.add_argument("--per-layer", action="store_true",
                 help="layers stored per layer (TrainableSpec(per_layer=True))")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
  p.add_argument("--torch-ks", default="", help="comma-separated K for the PyTorch side (default: all)")
  p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
  p.add_argument("--json", default="", help="also dump raw results to this file")
  args = p.parse_args(argv)
  if args.worker == "jax":
    return jax_worker(args.kind, args.layer_remat, args.per_layer)
  if args.worker == "torch":
    return torch_worker(args.kind)
  labels = [s.strip() for s in args.only.split(",") if s.strip()] or None
  results = run(tuple(args.kinds.split(",")), args.rounds, write_docs=not args.no_docs,
                torch=not args.no_torch, labels=labels, layer_remat=args.layer_remat,
                per_layer=args.per_layer,
                torch_ks=tuple(int(x) for x in args.torch_ks.split(",") if x) or None)
  if args.json:
    Path(args.json).write_text(json.dumps(results, default=lambda o: getattr(o, "seconds", str(o)),
                                          indent=1))


if __name__ == "__main__":
  main()
