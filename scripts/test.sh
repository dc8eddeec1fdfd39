#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the tests. Extra arguments go to pytest
# (e.g. `scripts/test.sh -m slow`). A run that collects no test fails (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || { echo "set-up failed" >&2; exit 1; }
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no test: failing." >&2
  exit 1
fi
exit "$rc"
