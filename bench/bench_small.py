"""Small shapes, where the host's time per call, not the GPU's, sets the pace: alternated rounds.

    python bench/bench_small.py [--rounds 5] [--out bench/results/small_<gpu>.json]

At these sizes a call's GPU work is shorter than the Python, launches and autograd hand-off that
start it, so a do_bench median moves with whatever else the host's CPU is doing (±30% between
runs on the same machine). Each method is timed in every round, the methods alternated, and each
row reports the fastest round (the host at its quietest), the median round and all rounds.
Shapes: logits 4096 x 32,000 (bf16, 10% ignored rows) with ratio 0.25 for each selection, ratio
1, ``topk`` with the default target check (a host sync), ``CGGRLoss`` and
``torch.compile(F.cross_entropy)``; the head of a small model, 8192 tokens,
H = 256, V = 16,384, with ratio 1 and 0.25 for each selection against ``h @ W.T`` +
``F.cross_entropy``.
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from _results import write_result  # noqa: E402
from cggr import CGGRLoss  # noqa: E402
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy  # noqa: E402
from cggr.selection import SELECTIONS  # noqa: E402
from profile_step import backward_step, head_inputs  # noqa: E402

SEQ_LEN = 2048  # sequence_aware sees the rows as [N / 2048, 2048]


def _rows(selection, x, t):
    """Inputs as ``selection`` needs them (sequence_aware: [B, T, ...])."""
    if selection != "sequence_aware":
        return x, t
    return x.view(-1, SEQ_LEN, x.shape[-1]), t.view(-1, SEQ_LEN)


def logits_cases():
    n, v = 4096, 32000
    x = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")
    t[torch.rand(n, device="cuda") < 0.1] = -100
    compiled = torch.compile(lambda a, b: F.cross_entropy(a, b))
    criterion = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0)

    def step(loss_fn):
        return backward_step(loss_fn, x)
    cases = {f"cggr r=0.25 {sel}": step(lambda sel=sel: cggr_cross_entropy(*_rows(sel, x, t), 0.25, selection=sel,
                                                                             check_targets=False))
             for sel in SELECTIONS}
    cases["cggr r=1.0"] = step(lambda: cggr_cross_entropy(x, t, 1.0, check_targets=False))
    cases["cggr r=0.25 topk, target check"] = step(lambda: cggr_cross_entropy(x, t, 0.25, selection="topk"))
    cases["CGGRLoss(0.25) defaults"] = step(lambda: criterion(x, t))
    cases["torch.compile(F.cross_entropy)"] = step(lambda: compiled(x, t))
    cases["F.cross_entropy"] = step(lambda: F.cross_entropy(x, t))
    return dict(N=n, V=v), cases


def head_cases():
    n, h_dim, v = 8192, 256, 16384
    h, w, t = head_inputs(n, h_dim, v, ignored=0.1)

    def step(loss_fn):
        return backward_step(loss_fn, h, w)
    cases = {f"cggr linear r=0.25 {sel}": step(
        lambda sel=sel: cggr_linear_cross_entropy(*_rows(sel, h, t)[:1], w, _rows(sel, h, t)[1], 0.25, selection=sel,
                                                  check_targets=False)) for sel in SELECTIONS}
    cases["cggr linear r=1.0"] = step(lambda: cggr_linear_cross_entropy(h, w, t, 1.0, check_targets=False))
    cases["h @ W.T + F.cross_entropy"] = step(lambda: F.cross_entropy(h @ w.T, t))
    return dict(N=n, H=h_dim, V=v), cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape, cases in (logits_cases(), head_cases()):
        for run in cases.values():  # compilation and autotuning out of the rounds
            run()
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, run in cases.items():
                times[name].append(do_bench(run, warmup=10, rep=100, return_mode="median"))
        for name, values in times.items():
            rows.append(dict(shape, method=name, ms=min(values), median_ms=statistics.median(values),
                             rounds_ms=values))
        torch.cuda.empty_cache()
    print(f"\n{'shape':<22} {'method':<32} {'fastest':>8} {'median':>8}  rounds (ms)")
    for row in rows:
        shape = " x ".join(str(row[k]) for k in ("N", "H", "V") if k in row)
        print(f"{shape:<22} {row['method']:<32} {row['ms']:8.3f} {row['median_ms']:8.3f}  "
              + " ".join(f"{v:.3f}" for v in row["rounds_ms"]))
    write_result("small", args.out, rows, ("triton",), rounds=args.rounds)


if __name__ == "__main__":
    main()
