"""Sweep launch configurations of the two Triton kernels and profile one forward+backward.

    python bench/tune_kernels.py [N V]

Prints the bandwidth each configuration reaches (bytes moved / median time) against the
copy bandwidth, and the profiler's kernel table for cggr_cross_entropy at ratio 0.25.
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from cggr.functional import cggr_cross_entropy  # noqa: E402
from cggr.ops import triton_backend  # noqa: E402

CONFIGS = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]


def main():
    n, v = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (8192, 128256)
    logits = torch.randn(1, n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    valid = torch.ones(n, dtype=torch.bool, device="cuda")
    lse = torch.randn(n, device="cuda")
    coef = torch.rand(n, device="cuda")
    mask = torch.rand(n, device="cuda") < 0.25
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    del src, dst
    print(f"copy bandwidth {bandwidth:.0f} GB/s; N={n} V={v} bf16")
    nbytes = n * v * 2
    print(f"{'BLOCK_V':>8} {'warps':>5} {'stats ms':>9} {'%bw':>5} {'stats+sq+x':>10} {'grad ms':>8} {'%bw':>5}")
    for block, warps in CONFIGS:
        os.environ["CGGR_BLOCK_V"], os.environ["CGGR_NUM_WARPS"] = str(block), str(warps)
        t_stats = do_bench(lambda: triton_backend.row_stats_op(logits, targets, valid, True, False, False),
                           return_mode="median")
        t_all = do_bench(lambda: triton_backend.row_stats_op(logits, targets, valid, True, True, True),
                         return_mode="median")
        t_grad = do_bench(lambda: triton_backend.logits_grad_op(logits, targets, lse, coef, mask, 0.0, 0.0),
                          return_mode="median")
        grad_bytes = nbytes * (1 + mask.float().mean().item())
        print(f"{block:>8} {warps:>5} {t_stats:9.3f} {100 * nbytes / t_stats / 1e6 / bandwidth:5.0f} "
              f"{t_all:10.3f} {t_grad:8.3f} {100 * grad_bytes / t_grad / 1e6 / bandwidth:5.0f}")
    del os.environ["CGGR_BLOCK_V"], os.environ["CGGR_NUM_WARPS"]

    x = logits[0].clone().requires_grad_(True)

    def step():
        cggr_cross_entropy(x, targets, 0.25, check_targets=False).backward()
        x.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
