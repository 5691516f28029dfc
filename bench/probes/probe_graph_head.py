"""What a CUDA graph of the small head's forward would save: the forward (logits, statistics,
selection, logits gradient, the hidden and weight gradients) captured once and replayed on
static copies of hidden and targets, then cggr's one-launch backward node, against cggr's call
and the plain path.

    python bench/probes/probe_graph_head.py [--rounds 5]

Host µs of a 64-row head (H = 256, V = 256) and do_bench ms at 8192 x 256 -> 16,384 (bf16, 10%
ignored rows, ratio 0.25 topk), cases alternated; fastest and median round.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_cpp_backward import formed  # noqa: E402

from cggr.functional import cggr_linear_cross_entropy  # noqa: E402
from cggr.ops import triton_backend as tb  # noqa: E402
from cggr.ops.autograd import _ScaledGradients  # noqa: E402
from profile_step import backward_step, head_inputs, host_and_bench_rounds  # noqa: E402


class GraphedHead:
    def __init__(self, h, w, t, ratio):
        self.h, self.t, self.w, self.ratio = h.detach().clone(), t.clone(), w, ratio
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                formed(self.h, self.w.detach(), self.t, ratio, "topk")
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out = formed(self.h, self.w.detach(), self.t, ratio, "topk")

    def __call__(self, h, w, t):
        with torch.no_grad():
            self.h.copy_(h)
            self.t.copy_(t)
            self.graph.replay()
            loss, gh, gw = self.out
            loss = loss.clone()
        return _ScaledGradients.apply(loss, tb.scaled_later(gh, gw), h, w)


def cases(n, hd, v):
    h, w, t = head_inputs(n, hd, v, ignored=0.1)
    cggr_linear_cross_entropy(h, w, t, 0.25, selection="topk", check_targets=False)  # compile the kernels
    graphed = GraphedHead(h, w, t, 0.25)

    def make(fn):
        return backward_step(fn, h, w)
    return {"plain": make(lambda: F.cross_entropy(h @ w.T, t)),
            "cggr r=0.25 topk": make(lambda: cggr_linear_cross_entropy(h, w, t, 0.25, selection="topk",
                                                                        check_targets=False)),
            "graphed forward r=0.25 topk": make(lambda: graphed(h, w, t))}, (h, w, t, graphed)


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    print(torch.cuda.get_device_name(), torch.__version__)
    tiny, _ = cases(64, 256, 256)
    big, (h, w, t, graphed) = cases(8192, 256, 16384)
    for fn in (lambda: cggr_linear_cross_entropy(h, w, t, 0.25, selection="topk", check_targets=False),
               lambda: graphed(h, w, t)):
        (fn() * 0.37).backward()
        print("grad sums", h.grad.float().abs().sum().item(), w.grad.float().abs().sum().item())
        h.grad = w.grad = None
    host_and_bench_rounds(tiny, big, rounds, "8192x256x16384")


if __name__ == "__main__":
    main()
