"""Which host ops of a small loss step take the time, with the backward on autograd's device
thread (the default) and on the caller's thread: torch.profiler's self CPU time per op.

    python bench/probes/probe_autograd_thread.py

A 64 x 256 bf16 loss (ratio 0.25, targets checked off), against a plain differentiable sum.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cggr.functional import cggr_cross_entropy  # noqa: E402
from profile_step import cpu_op_table  # noqa: E402


def main():
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 256, (64,), device="cuda")

    def cggr_step():
        cggr_cross_entropy(x, t, 0.25, check_targets=False).backward()
        x.grad = None

    def plain_step():
        (x.float() * 2).sum().backward()
        x.grad = None

    for name, step, threads in [("cggr, device thread", cggr_step, True), ("cggr, caller's thread", cggr_step, False),
                                ("plain, device thread", plain_step, True)]:
        with torch.autograd.set_multithreading_enabled(threads):
            for _ in range(50):
                step()
            torch.cuda.synchronize()
            table = cpu_op_table(step, calls=50, rows=8, width=45)
        print(name)
        print(table)


if __name__ == "__main__":
    main()
