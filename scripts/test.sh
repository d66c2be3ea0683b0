#!/usr/bin/env bash
# The test suite: two workers with one thread each (two threads each would oversubscribe 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OMP_NUM_THREADS=1 python3 -m pytest -n 2 tests "$@"
