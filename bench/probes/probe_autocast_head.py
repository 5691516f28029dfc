"""The head under bf16 autocast with fp32 tensors (Trainer's bf16=True), against bf16 tensors:
the fp32 weight cast inside the loss with its gradient formed in fp32 (now), against the weight
cast by the caller and its bf16 gradient cast back (before). Alternated, do_bench medians.

    python bench/probes/probe_autocast_head.py
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import cggr.functional as functional  # noqa: E402
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402

SHAPES = [(8192, 4096, 128256), (16384, 896, 151936)]


def main():
    torch.manual_seed(0)
    now = functional._autocast

    def before(hidden, weight, bias, cast_weight_inside=True):
        return now(hidden, weight, bias, cast_weight_inside=False)
    for n, h_dim, v in SHAPES:
        hidden = torch.randn(n, h_dim, device="cuda")
        weight = torch.randn(v, h_dim, device="cuda") / h_dim ** 0.5
        targets = torch.randint(0, v, (n,), device="cuda")
        results = {}
        for _ in range(2):
            for ratio in (1.0, 0.25):
                for name, dtype, autocast in (("bf16 tensors", torch.bfloat16, False),
                                              ("fp32 + autocast, now", torch.float32, True),
                                              ("fp32 + autocast, before", torch.float32, True)):
                    functional._autocast = before if name.endswith("before") else now
                    h = hidden.to(dtype).requires_grad_(True)
                    w = weight.to(dtype).requires_grad_(True)

                    def step():
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                            loss = cggr_linear_cross_entropy(h, w, targets, ratio, check_targets=False)
                        loss.backward()
                        h.grad = w.grad = None
                    results.setdefault((ratio, name), []).append(do_bench(step, warmup=5, rep=100,
                                                                          return_mode="median"))
                    functional._autocast = now
        for (ratio, name), values in results.items():
            print(f"{n}x{h_dim}x{v} ratio {ratio:<5} {name:<26} " + " ".join(f"{x:7.2f}" for x in values) + " ms")
        del hidden, weight
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
