#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md in one short run (about 5 minutes on one H200): the trainer
# against the reference-style loop (target >= 3x), the step's fraction of the bf16 matrix rate, and
# pruned against dense VGG16 at batch 256. Each log goes to $OUT (default: ./gpu-results).
#
# On a machine without network access, carry torch-pruning as a wheel in .whl/ (pure Python):
#   python3 -m pip download --no-deps -d .whl torch-pruning==1.6.1
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/earlybird-site .whl/*.whl
  export PYTHONPATH="/tmp/earlybird-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee "$out/device.txt"
run() {  # name, then the script and its arguments
  local name=$1; shift
  echo "== $name: $*"
  timeout 240 python3 "$@" 2>&1 | tee "$out/$name.txt" || echo "$name failed or timed out (rc $?)"
}
run trainer_vs_reference benchmarks/trainer_vs_reference.py --device cuda --images 16384 --batch 256
run step_efficiency benchmarks/step_efficiency.py --device cuda --amp --images 50000
run prune_speedup benchmarks/prune_speedup.py --device cuda --width 1 --batch-sizes 1 64 256 --train-batch 256 --repeats 10
