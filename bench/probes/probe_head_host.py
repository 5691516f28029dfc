"""Host time of a small head's forward+backward: which part of the fused path's excess over the
plain path is the Python autograd node (its hand-off to the engine's device thread), and what a
head that forms its gradients in the forward and leaves autograd only C++ nodes would cost.

    python bench/probes/probe_head_host.py
"""
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cggr.core import LossOptions, select_and_reduce  # noqa: E402
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402
from cggr.ops import triton_backend as tb  # noqa: E402
from profile_step import backward_step, head_inputs, host_ms  # noqa: E402


class PyIdentity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Precomputed(torch.autograd.Function):
    """A Python node whose backward only scales gradients formed in the forward."""
    @staticmethod
    def forward(ctx, h, w, loss, gh, gw):
        ctx.save_for_backward(gh, gw)
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return gh * g, gw * g, None, None, None


def formed(h, w, t, ratio):
    opts = LossOptions()
    with torch.no_grad():
        logits = F.linear(h, w)[None]
        valid = t != -100
        stats = tb.row_stats(logits, t, valid, opts)
        red = select_and_reduce(stats, valid, ratio, opts, None, tb.select)
        g = tb.logits_grad(logits, t, stats.lse, red.coef, red.mask, opts, out=logits)[0]
        gh, gw = g @ w, g.t() @ h
    return red.loss, gh, gw


def surrogate(h, w, t, ratio):
    loss, gh, gw = formed(h, w, t, ratio)
    s = torch.dot(h.view(-1), gh.view(-1)) + torch.dot(w.view(-1), gw.view(-1))
    return loss + (s - s.detach())


def python_node(h, w, t, ratio):
    loss, gh, gw = formed(h, w, t, ratio)
    return Precomputed.apply(h, w, loss, gh, gw)


def cases(n, hd, v):
    h, w, t = head_inputs(n, hd, v)

    def make(fn, one_thread=False):
        return backward_step(fn, h, w, one_thread=one_thread)
    plain = lambda: F.cross_entropy(h @ w.T, t)  # noqa: E731
    return {
        "plain": make(plain),
        "plain, one thread": make(plain, True),
        "plain + python identity node": make(lambda: PyIdentity.apply(plain())),
        "plain + python identity, one thread": make(lambda: PyIdentity.apply(plain()), True),
        "fused r=1 (now)": make(lambda: cggr_linear_cross_entropy(h, w, t, 1.0, check_targets=False)),
        "fused r=0.25 (now)": make(lambda: cggr_linear_cross_entropy(h, w, t, 0.25, check_targets=False)),
        "fused r=0.25 (now), one thread": make(
            lambda: cggr_linear_cross_entropy(h, w, t, 0.25, check_targets=False), True),
        "formed in forward, python node r=0.25": make(lambda: python_node(h, w, t, 0.25)),
        "formed in forward, C++ nodes r=0.25": make(lambda: surrogate(h, w, t, 0.25)),
        "formed in forward, C++ nodes r=1": make(lambda: surrogate(h, w, t, 1.0)),
    }


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    tiny = cases(64, 64, 256)
    times = {name: [] for name in tiny}
    for _ in range(3):
        for name, step in tiny.items():
            times[name].append(1e3 * host_ms(step, calls=400, warmup=20))
    big = cases(8192, 256, 16384)
    for name, step in big.items():
        ms = do_bench(step, warmup=25, rep=200, return_mode="median")
        print(f"{name:<42} host " + " ".join(f"{x:6.0f}" for x in times[name]) + f" us   8192x256x16384 {ms:.3f} ms")


if __name__ == "__main__":
    main()
