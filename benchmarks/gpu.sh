#!/usr/bin/env bash
# On a GPU machine, in under 8 minutes: the tests marked cuda (one-GPU search -> prune -> retrain in
# bf16 and fp16, --compile, --deterministic, a GPU checkpoint resumed on the CPU; torchrun with NCCL
# where there are 2+ GPUs), then the GPU figures of benchmarks/README.md: the trainer against the
# reference-style loop, the step's fraction of the bf16 matrix rate, pruned against dense VGG16.
# Each log goes to $OUT (default: ./gpu-results).
#
# Needs torch with CUDA, numpy, tqdm, matplotlib, pillow and pytest (a CUDA image has them) and
# torch-pruning. A GPU machine without registry access gets torch-pruning as a wheel in .whl/,
# which one command prepares where pip reaches PyPI (then carry .whl along):
#   bash benchmarks/gpu-wheels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/earlybird-site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/earlybird-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$out/device.txt" || exit 1
import importlib.util, sys
import torch
missing = [m for m in ("torch_pruning", "pytest", "tqdm", "matplotlib") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing {', '.join(missing)}: run `bash benchmarks/gpu-wheels.sh` where pip reaches PyPI, "
             "then carry .whl to this machine")
if not torch.cuda.is_available():
    sys.exit("no GPU visible (check CUDA_VISIBLE_DEVICES)")
print(torch.__version__, *(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                           for i in range(torch.cuda.device_count())))
PY
run() {  # name, limit in seconds, then the command
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "$name failed or timed out (rc $rc)"
  return "$rc"
}
status=0
run tests 180 python3 -m pytest -p no:cacheprovider -q -rs -m cuda tests/test_cuda.py || status=1
run trainer_vs_reference 90 python3 benchmarks/trainer_vs_reference.py --device cuda --images 16384 --batch 256 || status=1
run step_efficiency 90 python3 benchmarks/step_efficiency.py --device cuda --amp --images 50000 || status=1
run prune_speedup 90 python3 benchmarks/prune_speedup.py --device cuda --width 1 --batch-sizes 1 64 256 \
  --train-batch 256 --repeats 10 || status=1
exit $status
