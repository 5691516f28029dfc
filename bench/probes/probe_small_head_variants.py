"""The small fused head (8192 x 256 -> 16,384, bf16, ratio 0.25) against the prototype of
probe_head_host.py, one difference at a time, alternated: what makes cggr's call slower when the
backward runs on autograd's device thread.

    python bench/probes/probe_small_head_variants.py
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import probe_head_host as probe  # noqa: E402

from cggr.core import LossOptions  # noqa: E402
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402
from cggr.ops import autograd  # noqa: E402
from cggr.ops import triton_backend as tb  # noqa: E402
from cggr.ops.autograd import HeadPlan, small_head_apply  # noqa: E402


class Saved(torch.autograd.Function):
    """_ScaledGradients with save_for_backward instead of a ctx attribute."""
    @staticmethod
    def forward(ctx, loss, formed, *inputs):
        ctx.save_for_backward(*[g for g in formed if g is not None])
        ctx.present = [g is not None for g in formed]
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        return None, None, *((next(saved) * grad_loss) if p else None for p in ctx.present)


def main():
    h = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16) / 16).requires_grad_(True)
    t = torch.randint(0, 16384, (8192,), device="cuda")
    plan = HeadPlan(8192, 2049, "native", whole=True)
    opts = LossOptions()
    original = autograd._ScaledGradients

    def saved_variant():
        autograd._ScaledGradients = Saved
        try:
            return small_head_apply(h, w, None, t, None, tb, 0.25, opts, None, plan, False)[0]
        finally:
            autograd._ScaledGradients = original
    cases = {
        "cggr call": lambda: cggr_linear_cross_entropy(h, w, t, 0.25, check_targets=False),
        "small_head_apply directly": lambda: small_head_apply(h, w, None, t, None, tb, 0.25, opts, None, plan,
                                                              False)[0],
        "small_head_apply, save_for_backward": saved_variant,
        "prototype": lambda: probe.python_node(h, w, t, 0.25),
        "plain": lambda: torch.nn.functional.cross_entropy(h @ w.T, t),
    }
    results = {name: [] for name in cases}
    for _ in range(3):
        for name, fn in cases.items():
            def step():
                fn().backward()
                h.grad = w.grad = None
            results[name].append(do_bench(step, warmup=25, rep=200, return_mode="median"))
    for name, values in results.items():
        print(f"{name:<40} " + " ".join(f"{v:6.3f}" for v in values) + " ms")


if __name__ == "__main__":
    main()
