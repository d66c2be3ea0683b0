"""What a budget target costs per epoch: one solve of `--target-macs` / `--target-params` 0.5.

Every epoch of a search, each budget is solved on that epoch's scores: a bisection over the ratio
(13 candidate masks), each candidate planned and its pruned network's MACs or parameters counted.
This times one solve on ResNet-50 at 224x224 (random BN scales and shifts), as the search does it
(the graph traced once beforehand, as the search's first epoch does), and prints the ratio found and
the fraction reached, which must not depend on how the candidates are counted. Then the next epoch's
solve, which starts at that ratio, side by side with a solve from scratch, for scores that did not
move and that moved by 1% and 5% per channel.

    python benchmarks/budget_solve.py [--metric macs params] [--image-size 224]
"""
from __future__ import annotations

import argparse
import time

import torch

from earlybird import ModelSpec, create_model, prunable_layers
from earlybird.budget import solve_budget
from earlybird.importance import BNScale
from earlybird.prune import channel_ties


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metric", nargs="+", default=["macs", "params"], choices=["macs", "params"])
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()
    torch.manual_seed(0)
    model = create_model(ModelSpec("resnet", 50, 1.0, 3, 1000, args.image_size)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    x = torch.randn(2, 3, args.image_size, args.image_size, generator=g)
    layers = prunable_layers(model, x)
    scores = dict(zip(layers, BNScale().scores(model, layers)))
    ties = channel_ties(model, x)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-50 at {args.image_size} px")
    for metric in args.metric:
        t = time.perf_counter()
        found = solve_budget(model, scores, x, metric, 0.5, ties, round_to=8)
        print(f"--target-{metric} 0.5: one solve {time.perf_counter() - t:.1f} s, ratio {found.ratio:.4f}, "
              f"reached {found.reached:.4f}", flush=True)
        # the next epoch's solve starts at this ratio: scores unchanged, and moved by 1% and 5% per channel
        for noise in (0.0, 0.01, 0.05):
            moved = {k: v * (1 + noise * torch.randn(v.shape, generator=g)) for k, v in scores.items()}
            t = time.perf_counter()
            warm = solve_budget(model, moved, x, metric, 0.5, ties, round_to=8, near=found.ratio)
            warm_s = time.perf_counter() - t
            t = time.perf_counter()
            cold = solve_budget(model, moved, x, metric, 0.5, ties, round_to=8)
            cold_s = time.perf_counter() - t
            same = warm.ratio == cold.ratio and warm.reached == cold.reached
            print(f"  scores moved {noise:.0%}: from the last ratio {warm_s:.1f} s, from scratch {cold_s:.1f} s "
                  f"({cold_s / warm_s:.2f}x), ratio {found.ratio:.4f} -> {warm.ratio:.4f}, "
                  f"{'the same answer' if same else 'DIFFERENT ANSWERS'}", flush=True)


if __name__ == "__main__":
    main()
