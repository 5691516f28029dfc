"""Probe: which GPU kernels make the head under fp32 + bf16 autocast slower than with bf16 tensors?

    python bench/probes/probe_autocast_kernels.py

For 16384 x 896 -> 151,936 and 8192 x 4096 -> 128,256 at ratio 0.25 and 1, profiles one
forward+backward (five calls) with bf16 tensors and with fp32 tensors under autocast, and prints
each kernel's GPU ms per call in both, the largest differences first; then times the weight
gradient's matmul alone: bf16 output, float32 output (``out_dtype``), and the float32
accumulating ``addmm``.
"""
import collections
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cggr.functional import _default_chunk_rows, cggr_linear_cross_entropy  # noqa: E402
from profile_step import cuda_kernels  # noqa: E402

SHAPES = [(16384, 896, 151936), (8192, 4096, 128256)]


def kernel_ms(step, calls=5):
    """GPU ms per call of each kernel name."""
    per_kernel = collections.Counter()
    for event in cuda_kernels(step, calls):
        per_kernel[event.key[:90]] += event.self_device_time_total / 1e3 / calls
    return per_kernel


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    for n, h_dim, v in SHAPES:
        hidden = torch.randn(n, h_dim, device="cuda")
        weight = torch.randn(v, h_dim, device="cuda") / h_dim ** 0.5
        targets = torch.randint(0, v, (n,), device="cuda")
        for ratio in (0.25, 1.0):
            profiles = {}
            for name, dtype, autocast in (("bf16", torch.bfloat16, False), ("autocast", torch.float32, True)):
                h = hidden.to(dtype).requires_grad_(True)
                w = weight.to(dtype).requires_grad_(True)

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        loss = cggr_linear_cross_entropy(h, w, targets, ratio, check_targets=False)
                    loss.backward()
                    h.grad = w.grad = None
                profiles[name] = kernel_ms(step)
                profiles[name + " do_bench"] = do_bench(step, warmup=5, rep=100, return_mode="median")
            bf16, auto = profiles["bf16"], profiles["autocast"]
            print(f"\n{n} x {h_dim} -> {v} ratio {ratio}: do_bench bf16 {profiles['bf16 do_bench']:.2f} ms, "
                  f"autocast {profiles['autocast do_bench']:.2f} ms; kernel sums {sum(bf16.values()):.2f} / "
                  f"{sum(auto.values()):.2f}")
            for key in sorted(set(bf16) | set(auto), key=lambda k: -abs(auto.get(k, 0) - bf16.get(k, 0)))[:12]:
                print(f"  {bf16.get(key, 0):7.3f} {auto.get(key, 0):7.3f}  {key}")
        rows = _default_chunk_rows(v)
        grad = torch.randn(rows, v, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(rows, h_dim, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(v, h_dim, device="cuda")
        acc16 = torch.zeros(v, h_dim, device="cuda", dtype=torch.bfloat16)
        cases = {"bf16 mm": lambda: grad.t() @ h,
                 "mm out_dtype=float32": lambda: torch.mm(grad.t(), h, out_dtype=torch.float32),
                 "bf16 addmm_": lambda: acc16.addmm_(grad.t(), h),
                 "addmm out_dtype=float32 into float32": lambda: torch.addmm(acc, grad.t(), h, out_dtype=torch.float32,
                                                                             out=acc),
                 "weight.to(bf16)": lambda: weight.to(torch.bfloat16)}
        for name, fn in cases.items():
            print(f"  [{v}, {rows}] @ [{rows}, {h_dim}] {name:<40} {do_bench(fn, return_mode='median'):.3f} ms")


if __name__ == "__main__":
    main()
