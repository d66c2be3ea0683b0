#!/usr/bin/env bash
# Installs earlybird (editable) with its test tools into the current Python, pinned by
# constraints.txt so torch stays the tested CPU build; with --with-data also Debian's
# Fashion-MNIST package when it is absent (the demo's data; the tests make their own).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --root-user-action=ignore -c constraints.txt -e ".[test]"
if [ "${1:-}" = --with-data ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "note: could not install dataset-fashion-mnist; earlybird will try to download Fashion-MNIST"
fi
