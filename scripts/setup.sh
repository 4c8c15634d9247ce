#!/usr/bin/env bash
# Creates (or reuses) ./.venv, installs what the tests and benchmarks need, and builds the
# extension in release mode. Sourced by test.sh and bench.sh; safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.deps-$(cat scripts/setup.sh pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch from PyPI (a CUDA build; the CUDA part is simply unused on a CPU machine).
  python -m pip install -q "torch>=2.4" "numpy>=1.24" "maturin>=1.7,<2" \
    "pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" "matplotlib>=3.7"
  # Peers the tests compare against: natten's CPU forward (it builds a pure-Python package
  # against the installed torch, hence no build isolation) and fla's naive references.
  python -m pip install -q --no-build-isolation "natten>=0.21,<0.22"
  python -m pip install -q "fla-core>=0.6,<0.7"
  rm -f .venv/.deps-*
  touch "$stamp"
fi

# Build quietly; show the whole log only if the build fails.
log=$(mktemp)
if ! maturin develop --release -q >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  echo "building fastattn failed" >&2
  exit 1
fi
rm -f "$log"
python -c "import fastattn" # fail here, loudly, if the build did not install
