"""Probe: can a ratio-1 loss beat the three-pass byte floor by re-reading each row from L2?

    python bench/probes/probe_fused_ratio1.py [N V]

At ratio 1 cggr reads the logits twice in two kernels (statistics, then gradient) and writes
the gradient once: (2 + 1)·N·V·2 bytes. A kernel that reads a row twice in one program, the
second time right after the first, may find part of the row still in L2. This minimal kernel
(log-sum-exp, then the plain cross-entropy gradient; none of cggr's statistics) times that
pattern for several block sizes and warp counts, against the floor and Liger's cross entropy
when it is installed. A measurement for bench/probes/NOTES.md, not library code. The kernel is
probe_fused_grad.py's with one program a row (steps 4 and 13 of the notes measured a variant
that kept a running maximum per lane).
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from probe_fused_grad import lse_then_grad_kernel  # noqa: E402

from _results import copy_bandwidth_gbs  # noqa: E402


def main():
    sizes = [int(a) for a in sys.argv[1:]]
    n, v = sizes if sizes else (8192, 128256)
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    grad = torch.empty_like(logits)
    lse = torch.empty(n, device="cuda")
    bandwidth = copy_bandwidth_gbs()
    floor_ms = 3 * logits.numel() * 2 / bandwidth / 1e6
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s, N={n} V={v}, three-pass floor {floor_ms:.3f} ms")
    for block, warps in [(4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32), (32768, 32)]:
        for out, label in ((grad, "new buffer"), (logits.clone(), "in place")):
            source = logits if label == "new buffer" else out

            def step():
                lse_then_grad_kernel[(n,)](source, out, targets, lse, n, v, 1.0 / n, BLOCK=block, num_warps=warps)
            ms = do_bench(step, return_mode="median")
            print(f"  BLOCK {block:>6} warps {warps:>2} {label:<10} {ms:7.3f} ms  {100 * floor_ms / ms:5.1f}% of floor")
    check = torch.empty_like(logits)
    lse_then_grad_kernel[(n,)](logits, check, targets, lse, n, v, 1.0 / n, BLOCK=8192, num_warps=16)
    want = torch.softmax(logits[:64].float(), 1) - torch.nn.functional.one_hot(targets[:64], v)
    print("  largest gradient error (64 rows, times N):", (check[:64].float() * n - want).abs().max().item())
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except ImportError:
        return
    liger = LigerCrossEntropyLoss()
    x = logits.clone().requires_grad_(True)

    def liger_step():
        liger(x, targets).backward()
        x.grad = None
    ms = do_bench(liger_step, return_mode="median")
    print(f"  Liger cross entropy forward+backward {ms:7.3f} ms  {100 * floor_ms / ms:5.1f}% of floor")


if __name__ == "__main__":
    main()
