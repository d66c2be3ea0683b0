"""Start-up of `earlybird search --dataset folder` on a large folder of small images: seconds from
the command's start to its "search:" line (the folder scanned, surveyed and its decoded-image cache
read; the first, decoding run is not timed). With --against SRC, the same command from another
source tree (e.g. an older checkout's src/) runs alternately with this one, so both are measured
side by side in one run.

    python benchmarks/folder_startup.py [--files 100000 --repeats 3 --against /path/to/old/src]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
SRC = Path(__file__).resolve().parent.parent / "src"


def write_folder(root: Path, files: int) -> None:
    """train/ and val/ (9:1) class folders of 16x16 PNGs, one image per class written many times."""
    blobs = []
    for c in range(CLASSES):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), c * 25, np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    for split, n in (("train", files * 9 // 10), ("val", files - files * 9 // 10)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / split / f"c{i % CLASSES}" / f"{i}.png").write_bytes(blobs[i % CLASSES])


def startup(src: Path, data: Path, save: Path, cache: Path) -> float:
    """Seconds until the search's "search:" line, the process then stopped."""
    env = {**os.environ, "PYTHONPATH": str(src), "EARLYBIRD_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import sys; from earlybird.cli import main; sys.exit(main())", "search",
           "--dataset", "folder", "--data", str(data), "--arch", "vgg", "--depth", "11", "--width", "0.0625",
           "--epochs", "1", "--device", "cpu", "--amp", "off", "--channels-last", "off", "--cpu-kernels", "off",
           "--save", str(save), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("search:"):
            elapsed = time.perf_counter() - t0
            proc.kill()
            proc.wait()
            return elapsed
    raise SystemExit(f"no 'search:' line from {src}: exit {proc.wait()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another source tree's src/ to time side by side")
    args = parser.parse_args()
    trees = {"this tree": SRC, **({"--against": args.against} if args.against else {})}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_folder(tmp / "data", args.files)
        print(f"{args.files:,} files written in {time.perf_counter() - t0:.1f} s")
        times = {name: [] for name in trees}
        caches = {name: tmp / f"cache-{i}" for i, name in enumerate(trees)}
        for name, src in trees.items():  # the first run of each decodes the images into its cache: not timed
            startup(src, tmp / "data", tmp / "run", caches[name])
        for _ in range(args.repeats):
            for name, src in trees.items():
                times[name].append(startup(src, tmp / "data", tmp / "run", caches[name]))
        for name, ts in times.items():
            print(f"{name:>10}: start-up {statistics.median(ts):.2f} s (median of {', '.join(f'{t:.2f}' for t in ts)})")
        if args.against:
            print(f"ratio --against / this tree: {statistics.median(times['--against']) / statistics.median(times['this tree']):.2f}x")


if __name__ == "__main__":
    main()
