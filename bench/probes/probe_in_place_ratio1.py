"""Ratio 1 with ``weight_grad_in_place`` and the gradients kept: where its time goes against the
plain path in the same setting (N=8192, H=4096, V=128256, bf16).

    python bench/probes/probe_in_place_ratio1.py

Per method: the do_bench median, the allocator's device mallocs and frees and retries during
it (a cudaFree synchronises), the GPU kernel time per step from the profiler, and the
costliest kernels.
"""
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402
from profile_step import kernel_profile  # noqa: E402


def main(n=8192, h_dim=4096, v=128256):
    torch.manual_seed(0)
    hidden = torch.randn(n, h_dim, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, h_dim, device="cuda", dtype=torch.bfloat16) / h_dim ** 0.5).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device="cuda")
    methods = {
        "plain": lambda: F.cross_entropy(hidden @ weight.T, targets),
        "cggr r=1.0": lambda: cggr_linear_cross_entropy(hidden, weight, targets, 1.0, check_targets=False),
        "cggr r=1.0 in place": lambda: cggr_linear_cross_entropy(hidden, weight, targets, 1.0, check_targets=False,
                                                                 weight_grad_in_place=True),
    }
    for name, loss in methods.items():
        hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)

        def step():
            loss().backward()
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        ms = do_bench(step, warmup=25, rep=300, return_mode="median")
        after = torch.cuda.memory_stats()
        moves = {key: after[key] - before[key] for key in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
        gpu, count, top = kernel_profile(step, calls=3)
        print(f"{name:<22} bench {ms:6.2f} ms  gpu {gpu:6.2f} ms in {count:5.1f} kernels  {moves}", flush=True)
        for kernel, t in top:
            print(f"      {t:7.3f}  {kernel}")


if __name__ == "__main__":
    main()
