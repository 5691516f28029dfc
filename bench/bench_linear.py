"""Forward+backward of the LM head plus loss: cggr_linear_cross_entropy against the plain path.

    python bench/bench_linear.py [--out bench/results/linear_<gpu>.json]
    python bench/bench_linear.py --held    # ratio 1 in place: time and memory per held share

Methods: ``h @ W.T`` + F.cross_entropy (bf16 logits, and fp32-upcast logits), cggr's linear path
at ratio 0.25 and 1.0, Liger-Kernel's fused linear cross entropy and cut-cross-entropy when
importable. Gradients flow to hidden and weight. "Extra memory" is the peak allocated during
one forward+backward minus what was allocated before it, so it includes weight.grad and hidden.grad.

Every method is measured with the gradients created by the step (``grads kept: no``; there the
in-place mode has no weight.grad to add into and returns the gradient as the default mode does),
and with ``--kept`` also with them already allocated and accumulated into (``grads kept: yes``,
the steady state of gradient accumulation). Targets: 10% ``ignore_index``.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _results import time_and_peak, write_result  # noqa: E402

# The last: a narrow model with a 16k vocabulary (the quality benchmark's shape).
SHAPES = [(8192, 4096, 128256), (16384, 896, 151936), (8192, 256, 16384)]


SEQ_LEN = 2048  # sequence_aware sees the rows as sequences of this length


def _linear(ratio, selection="importance"):
    if selection == "sequence_aware":
        return lambda h, w, t: cggr_linear_cross_entropy(h.view(-1, SEQ_LEN, h.shape[-1]), w, t.view(-1, SEQ_LEN),
                                                         ratio, selection=selection, check_targets=False)
    return lambda h, w, t: cggr_linear_cross_entropy(h, w, t, ratio, selection=selection, check_targets=False)


def methods():
    result = {
        "h @ W.T + F.cross_entropy (bf16)": lambda h, w, t: F.cross_entropy(h @ w.T, t),
        "h @ W.T + F.cross_entropy (fp32)": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t),
        "cggr linear r=0.25 importance": _linear(0.25),
        "cggr linear r=0.25 topk": _linear(0.25, "topk"),
        "cggr linear r=0.25 random": _linear(0.25, "random"),
        "cggr linear r=0.25 stratified": _linear(0.25, "stratified"),
        "cggr linear r=0.25 sequence_aware": _linear(0.25, "sequence_aware"),
        "cggr linear r=0.5 importance": _linear(0.5),
        "cggr linear r=1.0": _linear(1.0),
    }
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        result["liger fused linear CE"] = lambda h, w, t: liger(w, h, t)
    except ImportError as error:
        print("liger-kernel not available:", error)
    try:
        from cut_cross_entropy import linear_cross_entropy
        result["cut-cross-entropy"] = lambda h, w, t: linear_cross_entropy(h, w, t)
        # Its default skips gradient blocks whose entries are all below 2**-12 or so; this is the exact gradient.
        result["cut-cross-entropy exact"] = lambda h, w, t: linear_cross_entropy(h, w, t, filter_eps=None)
    except ImportError as error:
        print("cut-cross-entropy not available:", error)
    return result


IN_PLACE = {
    "cggr linear r=0.25 weight_grad_in_place": lambda h, w, t: cggr_linear_cross_entropy(
        h, w, t, 0.25, check_targets=False, weight_grad_in_place=True),
    "cggr linear r=1.0 weight_grad_in_place": lambda h, w, t: cggr_linear_cross_entropy(
        h, w, t, 1.0, check_targets=False, weight_grad_in_place=True),
}


# The head of a Trainer(bf16=True) run: fp32 hidden and weight under bf16 autocast, gradients
# back in fp32; against the same call on bf16 tensors, it isolates what autocast costs the head.
AUTOCAST = {
    "cggr linear r=1.0 fp32 + autocast": _linear(1.0),
    "cggr linear r=0.25 importance fp32 + autocast": _linear(0.25),
    "h @ W.T + F.cross_entropy fp32 + autocast": lambda h, w, t: F.cross_entropy(h @ w.T, t),
}


def measure(fn, hidden, weight, targets, keep_grads, autocast=False):
    dtype = torch.float32 if autocast else hidden.dtype
    h = hidden.to(dtype, copy=True).requires_grad_(True)
    w = weight.to(dtype, copy=True).requires_grad_(True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, w, targets)
        loss.backward()
    return time_and_peak(step, [h, w], rep_ms=300, keep_grads=keep_grads)


def sweep_held(n=8192, h_dim=4096, v=128256):
    """Ratio 1 with ``weight_grad_in_place``: the forward holds the gradient of the last weight
    rows (``_HELD_CHUNKS`` chunks of logits' worth), the backward recomputes the other columns.
    Time and peak extra memory per (chunk, held chunks), against the plain path."""
    from cggr.ops import autograd

    hidden = torch.randn(n, h_dim, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(v, h_dim, device="cuda", dtype=torch.bfloat16) / h_dim ** 0.5
    targets = torch.randint(0, v, (n,), device="cuda")
    plain_ms, plain_peak = measure(methods()["h @ W.T + F.cross_entropy (bf16)"], hidden, weight, targets, True)
    print(f"plain (grads kept) {plain_ms:.2f} ms {plain_peak / 1e9:.2f} GB")
    print(f"{'chunk rows':>10} {'held chunks':>11} {'held rows':>9} {'ms':>8} {'x plain':>8} {'extra GB':>9} "
          f"{'% plain':>8}")
    default = autograd._HELD_CHUNKS
    for chunk_rows, held_options in ((1024, (0, 2, 2.25, 2.5)), (1152, (1.75,))):
        for held in held_options:
            autograd._HELD_CHUNKS = held
            held_rows = v - autograd._recomputed_columns(v, h_dim, chunk_rows, "in_place")
            ms, peak = measure(lambda h, w, t: cggr_linear_cross_entropy(
                h, w, t, 1.0, check_targets=False, weight_grad_in_place=True, chunk_size=chunk_rows),
                hidden, weight, targets, True)
            print(f"{chunk_rows:>10} {held:>11} {held_rows:>9} {ms:8.2f} {ms / plain_ms:8.3f} {peak / 1e9:9.2f} "
                  f"{100 * peak / plain_peak:8.1f}")
    autograd._HELD_CHUNKS = default


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--held", action="store_true", help="sweep the held share of ratio 1 in place")
    parser.add_argument("--kept", action="store_true", help="also measure with the gradients kept and added into")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.held:
        return sweep_held()
    rows = []
    for n, h_dim, v in SHAPES:
        hidden = torch.randn(n, h_dim, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(v, h_dim, device="cuda", dtype=torch.bfloat16) / h_dim ** 0.5
        targets = torch.randint(0, v, (n,), device="cuda")
        targets[torch.rand(n, device="cuda") < 0.1] = -100
        every = {**methods(), **IN_PLACE, **AUTOCAST}
        runs = [(name, fn, keep_grads) for keep_grads in ((False, True) if args.kept else (False,))
                for name, fn in every.items()]
        for name, fn, keep_grads in runs:
            try:
                ms, peak = measure(fn, hidden, weight, targets, keep_grads, autocast=name in AUTOCAST)
            except Exception as error:  # report, keep measuring the rest
                print(f"{name} at N={n} H={h_dim} V={v} failed: {error!r}")
                continue
            rows.append(dict(N=n, H=h_dim, V=v, method=name, grads_kept=keep_grads, ms=ms, extra_bytes=peak))
        del hidden, weight
        torch.cuda.empty_cache()
    print(f"\n{'N':>6} {'H':>5} {'V':>7}  {'method':<42} {'grads kept':>10} {'ms':>8} {'extra GB':>9}")
    for row in rows:
        print(f"{row['N']:>6} {row['H']:>5} {row['V']:>7}  {row['method']:<42} "
              f"{'yes' if row['grads_kept'] else 'no':>10} {row['ms']:8.2f} {row['extra_bytes'] / 1e9:9.2f}")
    write_result("linear", args.out, rows, ("triton", "liger-kernel", "cut-cross-entropy"), dtype="bfloat16")


if __name__ == "__main__":
    main()
