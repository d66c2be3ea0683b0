#!/usr/bin/env bash
# Puts what benchmarks/gpu.sh needs beyond a CUDA image with torch into .whl/ (ignored by git):
# torch-pruning, pure Python, at the tested version. Run it where pip reaches PyPI, then carry .whl
# to the GPU machine (the device tool: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^torch-pruning==//p' constraints.txt)
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "torch-pruning==$version"
ls .whl
