#!/usr/bin/env bash
# The main job: a table of fastattn's ops against their peers on this CPU, default shapes
# built in. Extra arguments go to benches/table.py (try --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
. .venv/bin/activate
python benches/table.py "$@"
