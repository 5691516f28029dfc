"""Probe: does the linear path at ratio 1 gain from larger chunks of logits?

    python bench/probes/probe_chunk_ratio1.py [--rounds 3]

At ratio 1 every chunk runs three matmuls over its rows, and the weight gradient's accumulator
[V, H] is read and written once per chunk: at 16384 x 896 -> 151,936 (19 chunks of 896 rows)
about 10 GB of traffic beside the matmuls. Chunks of 2x and 4x the default rows cut that
and the number of launches, for more memory (one chunk of logits alive). bf16, forward+backward,
alternated rounds, do_bench medians in ms and the peak memory above the inputs.
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.functional import _default_chunk_rows, cggr_linear_cross_entropy  # noqa: E402

SHAPES = [(16384, 896, 151936), (8192, 2048, 128256), (32768, 576, 49152)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for n, h, v in SHAPES:
        hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h ** 0.5).requires_grad_(True)
        targets = torch.randint(0, v, (n,), device="cuda")
        base = _default_chunk_rows(v)
        cases = {}
        for ratio in (1.0, 0.25):
            for factor in (1, 2, 4):
                def step(ratio=ratio, rows=base * factor):
                    cggr_linear_cross_entropy(hidden, weight, targets, ratio, chunk_size=rows,
                                              check_targets=False).backward()
                    hidden.grad = weight.grad = None
                cases[(ratio, factor)] = step
        times = {key: [] for key in cases}
        peaks = {}
        for key, step in cases.items():
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peaks[key] = (torch.cuda.max_memory_allocated() - start) / 2**30
        for _ in range(args.rounds):
            for key, step in cases.items():
                times[key].append(do_bench(step, warmup=5, rep=60, return_mode="median"))
        for (ratio, factor), values in times.items():
            print(f"{n} x {h} -> {v} ratio {ratio:<4} chunk {base * factor:>5} rows: "
                  + " ".join(f"{t:7.2f}" for t in values) + f" ms  peak +{peaks[(ratio, factor)]:.2f} GB")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
