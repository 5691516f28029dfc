"""Can one kernel form a chunk's statistics and its gradient in place for less than the two
passes of the linear path at ratio 1 (bench/probes/NOTES.md, step 20)? The second read of a row
is free only if it still sits in L2, so the rows in flight must fit there: a persistent grid
of a few programs per SM, each walking its rows one at a time.

    python bench/probes/probe_fused_grad.py [ROWS] [V]

Prints the time of cggr's statistics kernel followed by its gradient kernel (in place) and of
a minimal fused kernel (log-sum-exp, then the gradient ``softmax - onehot``) per grid and
block; the fused kernel's reads and writes against copy bandwidth.
"""
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.core import LossOptions  # noqa: E402
from cggr.ops import triton_backend  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _results import copy_bandwidth_gbs  # noqa: E402


@triton.jit
def lse_then_grad_kernel(x_ptr, grad_ptr, targets_ptr, lse_ptr, n_rows, vocab_size, scale, BLOCK: tl.constexpr):
    """Each row (a grid-stride loop, so any grid: one program a row, or a few an SM): its
    log-sum-exp from one read, then ``scale * (softmax - onehot)`` from a second read into
    ``grad_ptr`` (``x_ptr`` itself for in place), and the log-sum-exp into ``lse_ptr``."""
    cols = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        ptr = x_ptr + row.to(tl.int64) * vocab_size
        grad_row = grad_ptr + row.to(tl.int64) * vocab_size
        m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), 0)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, vocab_size, BLOCK):
            x = tl.load(ptr + start + cols, mask=start + cols < vocab_size, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - new_m) + tl.exp(x - new_m)
            m = new_m
        lse = m + tl.log(tl.sum(s, 0))
        target = tl.load(targets_ptr + row)
        for start in range(0, vocab_size, BLOCK):
            offs = start + cols
            x = tl.load(ptr + offs, mask=offs < vocab_size, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)) * scale
            tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < vocab_size)
        tl.store(lse_ptr + row, lse)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    v = int(sys.argv[2]) if len(sys.argv) > 2 else 128256
    bandwidth = copy_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    valid = t != -100
    opts = LossOptions(scoring="loss")
    coef = torch.full((n,), 1.0 / n, device="cuda")

    rows = x[None]

    def separate():
        stats = triton_backend.row_stats(rows, t, valid, opts)
        triton_backend.logits_grad(rows, t, stats.lse, coef, valid, 0.0, 0.0, out=rows)
    ms = do_bench(separate, return_mode="median")
    moved = 4 * n * v  # bytes a fused pass must move: one read, one write
    print(f"{torch.cuda.get_device_name()}  copy {bandwidth:.0f} GB/s  {n} x {v} bf16, {sms} SMs")
    print(f"separate (stats, then gradient in place): {ms:.3f} ms, {100 * 1.5 * moved / ms / 1e6 / bandwidth:.0f}% "
          f"of copy bandwidth for its three passes")
    lse = torch.empty(n, device="cuda")
    print(f"{'programs':>9} {'warps':>6} {'block':>6} {'ms':>8} {'% copy (2 passes)':>18}")
    for per_sm in (1, 2, 4, None):
        grid = n if per_sm is None else min(n, per_sm * sms)
        for warps in (4, 8, 16):
            for block in (2048, 4096, 8192):
                def fused(block=block, warps=warps):
                    lse_then_grad_kernel[(grid,)](x, x, t, lse, n, v, 1.0, BLOCK=block, num_warps=warps)
                ms = do_bench(fused, return_mode="median")
                label = "one a row" if per_sm is None else f"{per_sm}/SM"
                print(f"{label:>9} {warps:>6} {block:>6} {ms:8.3f} {100 * moved / ms / 1e6 / bandwidth:18.0f}")


if __name__ == "__main__":
    main()
