"""``fp32_grad_accumulation``: the weight gradient written in float32 by the matmul from bf16
inputs, against casting each chunk's inputs to float32 for a float32 matmul (the earlier way),
and against the default bf16 accumulation. 8192 x 4096 -> 128,256, bf16, alternated.

    python bench/probes/probe_fp32_accumulation.py
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402
from cggr.ops import autograd  # noqa: E402


def cast_then_matmul(acc, a, b, dtype):
    a, b = a.to(dtype), b.to(dtype)
    return a @ b if acc is None else acc.addmm_(a, b)


def main():
    torch.manual_seed(0)
    h = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(128256, 4096, device="cuda", dtype=torch.bfloat16) / 64).requires_grad_(True)
    t = torch.randint(0, 128256, (8192,), device="cuda")
    new = autograd._mm_into
    results = {}
    for _ in range(2):
        for ratio in (0.25, 1.0):
            for name, fp32, mm in (("bf16 default", False, new), ("fp32, out_dtype matmul", True, new),
                                   ("fp32, cast + fp32 matmul", True, cast_then_matmul)):
                autograd._mm_into = mm

                def step():
                    cggr_linear_cross_entropy(h, w, t, ratio, check_targets=False,
                                              fp32_grad_accumulation=fp32).backward()
                    h.grad = w.grad = None
                results.setdefault((ratio, name), []).append(do_bench(step, warmup=5, rep=100,
                                                                      return_mode="median"))
                autograd._mm_into = new
    for (ratio, name), values in results.items():
        print(f"ratio {ratio:<5} {name:<26} " + " ".join(f"{v:7.2f}" for v in values) + " ms")


if __name__ == "__main__":
    main()
