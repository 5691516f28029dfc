"""A small head with its gradients formed in the forward: the backward as cggr's Python node (two
prepared scaling launches on autograd's device thread) against a backward of PyTorch's own C++
nodes, reached through a surrogate term that is zero in value and whose gradient is the formed
one: ``loss + (s - s.detach())`` with ``s = sum(x * G)`` over hidden and weight (float32 sum, so
the upstream gradient multiplies in float32), or ``s = dot(x, G)`` (in the inputs' dtype).

    python bench/probes/probe_cpp_backward.py [--rounds 3]

Host µs of a 64-row head (H = 256, V = 256) and do_bench ms at 8192 x 256 -> 16,384 (bf16, 10%
ignored rows, ratio 0.25 topk and 1), cases alternated; fastest and median round.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cggr.core import LossOptions, select_and_reduce  # noqa: E402
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402
from cggr.ops import triton_backend as tb  # noqa: E402
from profile_step import backward_step, head_inputs, host_and_bench_rounds  # noqa: E402

OPTS = {s: LossOptions(selection=s) for s in ("topk", "importance")}


def formed(h, w, t, ratio, selection):
    opts = OPTS[selection]
    with torch.no_grad():
        logits = F.linear(h, w)
        stats, valid = tb.row_stats_and_valid(logits, t, opts, None, False)
        red = select_and_reduce(stats, valid, ratio, opts, None, tb.select)
        g = tb.logits_grad(logits, t, stats.lse, red.coef, red.mask, opts, out=logits)
        gh, gw = g @ w, g.t() @ h
    return red.loss, gh, gw


def surrogate_sum(h, w, t, ratio, selection):
    loss, gh, gw = formed(h, w, t, ratio, selection)
    s = (h * gh).sum(dtype=torch.float32) + (w * gw).sum(dtype=torch.float32)
    return loss + (s - s.detach())


def surrogate_dot(h, w, t, ratio, selection):
    loss, gh, gw = formed(h, w, t, ratio, selection)
    s = torch.dot(h.view(-1), gh.view(-1)) + torch.dot(w.view(-1), gw.view(-1))
    return loss + (s - s.detach()).float()


def cases(n, hd, v):
    h, w, t = head_inputs(n, hd, v, ignored=0.1)

    def make(fn):
        return backward_step(fn, h, w)
    out = {"plain": make(lambda: F.cross_entropy(h @ w.T, t))}
    for ratio, sel in ((0.25, "topk"), (1.0, "importance")):
        out[f"cggr r={ratio}"] = make(lambda r=ratio, s=sel: cggr_linear_cross_entropy(h, w, t, r, selection=s,
                                                                                       check_targets=False))
        out[f"sum surrogate r={ratio}"] = make(lambda r=ratio, s=sel: surrogate_sum(h, w, t, r, s))
        out[f"dot surrogate r={ratio}"] = make(lambda r=ratio, s=sel: surrogate_dot(h, w, t, r, s))
    return out, (h, w, t)


def check(h, w, t):
    """The surrogates' gradients against cggr's, with an upstream gradient of 0.37."""
    for fn in (surrogate_sum, surrogate_dot):
        grads = []
        for f in (lambda: cggr_linear_cross_entropy(h, w, t, 0.25, selection="topk", check_targets=False),
                  lambda: fn(h, w, t, 0.25, "topk")):
            h.grad = w.grad = None
            (f() * 0.37).backward()
            grads.append((h.grad.float(), w.grad.float()))
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads))
        print(f"{fn.__name__}: largest gradient difference {err:.2e} of the largest gradient")
    h.grad = w.grad = None


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    print(torch.cuda.get_device_name(), torch.__version__)
    tiny, _ = cases(64, 256, 256)
    big, tensors = cases(8192, 256, 16384)
    check(*tensors)
    host_and_bench_rounds(tiny, big, rounds, "8192x256x16384", width=24)


if __name__ == "__main__":
    main()
