"""Which part of the small shapes' backward is slow: the Triton scaling kernel launched from
autograd's device thread, against PyTorch's in-place multiply, and the caller's thread.

    python bench/probes/probe_backward_scale.py
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy  # noqa: E402
from cggr.ops import triton_backend  # noqa: E402


def steps():
    h = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16) / 16).requires_grad_(True)
    t = torch.randint(0, 16384, (8192,), device="cuda")
    x = torch.randn(4096, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 32000, (4096,), device="cuda")

    def linear(ratio, selection="importance"):
        def step():
            cggr_linear_cross_entropy(h, w, t, ratio, selection=selection, check_targets=False).backward()
            h.grad = w.grad = None
        return step

    def logits(ratio, selection="importance"):
        def step():
            cggr_cross_entropy(x, y, ratio, selection=selection, check_targets=False).backward()
            x.grad = None
        return step
    return {"linear 8192x256x16384 r=1": linear(1.0), "linear r=0.25 importance": linear(0.25),
            "linear r=0.25 topk": linear(0.25, "topk"), "logits 4096x32000 r=1": logits(1.0),
            "logits r=0.25 importance": logits(0.25), "logits r=0.25 topk": logits(0.25, "topk"),
            "logits r=0.25 random": logits(0.25, "random")}


def main():
    cases = steps()
    triton_mul = triton_backend.mul_
    torch_mul = lambda t, s: t.mul_(s)  # noqa: E731
    results = {}
    for variant in ("triton scale", "torch mul_", "triton scale, one thread", "triton scale again"):
        triton_backend.mul_ = torch_mul if variant == "torch mul_" else triton_mul
        for name, step in cases.items():
            def run():
                with torch.autograd.set_multithreading_enabled("one thread" not in variant):
                    step()
            results.setdefault(name, []).append(do_bench(run, warmup=25, rep=200, return_mode="median"))
    print(f"{'case':<28} triton-scale torch-mul one-thread triton-again (ms)")
    for name, values in results.items():
        print(f"{name:<28} " + " ".join(f"{v:10.3f}" for v in values))


if __name__ == "__main__":
    main()
