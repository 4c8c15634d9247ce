#!/usr/bin/env bash
# The whole test suite: Rust kernel tests, then the Python suite (against the float64
# references, natten and fla). Extra arguments go to pytest. FASTATTN_EXTENDED=1 adds the
# long random sweeps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
. .venv/bin/activate

cargo test --release -p fastattn-kernels -q

set +e
python -m pytest tests -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
