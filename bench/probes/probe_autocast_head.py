"""The head under bf16 autocast with fp32 tensors (Trainer's bf16=True), against bf16 tensors:
with the default chunk (2**29 logits) and with chunks of 2**30 (half the float32
weight-gradient passes, twice the memory).
Methods alternated in every round; do_bench medians per round, then the fastest and the median
round (the GPU's clocks move by several percent between rounds at these sizes).

    python bench/probes/probe_autocast_head.py [--rounds 4]
"""
import argparse
import os
import statistics
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402

SHAPES = [(8192, 4096, 128256), (16384, 896, 151936), (32768, 576, 49152)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    for n, h_dim, v in SHAPES:
        hidden = torch.randn(n, h_dim, device="cuda")
        weight = torch.randn(v, h_dim, device="cuda") / h_dim ** 0.5
        targets = torch.randint(0, v, (n,), device="cuda")
        methods = (("bf16 tensors", torch.bfloat16, False, None),
                   ("fp32 + autocast", torch.float32, True, None),
                   ("fp32 + autocast, 2**30 chunk", torch.float32, True, (1 << 30) // v))
        results = {}
        for _ in range(args.rounds):
            for ratio in (1.0, 0.25):
                for name, dtype, autocast, chunk in methods:
                    h = hidden.to(dtype).requires_grad_(True)
                    w = weight.to(dtype).requires_grad_(True)

                    def step():
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                            loss = cggr_linear_cross_entropy(h, w, targets, ratio, check_targets=False,
                                                             chunk_size=chunk)
                        loss.backward()
                        h.grad = w.grad = None
                    results.setdefault((ratio, name), []).append(do_bench(step, warmup=5, rep=150,
                                                                          return_mode="median"))
        for (ratio, name), values in results.items():
            base = min(results[(ratio, methods[0][0])])
            print(f"{n}x{h_dim}x{v} ratio {ratio:<5} {name:<26} fastest {min(values):7.2f} "
                  f"({100 * (min(values) / base - 1):+5.1f}%) median {statistics.median(values):7.2f}  rounds "
                  + " ".join(f"{x:.2f}" for x in values))
        del hidden, weight
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
