#!/usr/bin/env bash
# README command 1: the whole Early-Bird pipeline (search -> prune -> retrain) on Fashion-MNIST
# with a CPU-sized VGG11 (every width x 0.25); --measure-speed times dense and pruned training for the
# table's "train speed" column. Extra flags are passed on to `earlybird run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-data
exec earlybird run --dataset fashion-mnist --arch vgg --depth 11 --width 0.25 \
  --epochs 26 --schedule 6 18 --batch-size 256 --ratios 0.5 0.7 --measure-speed \
  --save "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
