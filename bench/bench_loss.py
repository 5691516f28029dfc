"""Forward+backward time and peak extra memory of language-model losses on one CUDA GPU.

    python bench/bench_loss.py [--out bench/results/loss_<gpu>.json] [--quick]

Compares cggr's Triton path (ratio 0.25 for every selection with the default gradnorm scoring,
and for each scoring with topk; ``CGGRLoss`` with its defaults; ratio 1.0; in-place backward)
with F.cross_entropy (eager and torch.compile), Liger-Kernel's cross entropy and cggr 0.5.0's
CGGRLoss when those are importable, plus the GPU's copy bandwidth and the scoring pass alone.
Inputs: logits ``randn * 2`` in bf16 with 10% of the targets ``ignore_index``.
Times are medians from triton.testing.do_bench; "extra memory" is the peak allocated during one
forward+backward minus what was allocated before it (inputs), so it includes the logits gradient.
"""
import argparse
import inspect
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from cggr import CGGRLoss  # noqa: E402
from cggr.functional import cggr_cross_entropy  # noqa: E402
from cggr.ops import triton_backend  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _results import copy_bandwidth_gbs, loss_row_note, time_and_peak, write_result  # noqa: E402

# V=50257 (GPT-2): rows of odd length, so they start anywhere and are read shifted to 16-byte boundaries.
SHAPES = [(8192, 128256), (4096, 32000), (8192, 32000), (8192, 50257), (8192, 151936), (4096, 128256),
          (32768, 128256)]
SCORINGS = ("combined", "entropy", "margin", "loss", "gradnorm")
SELECTIONS = ("topk", "importance", "random", "stratified", "sequence_aware")
SEQ_LEN = 2048  # sequence_aware sees the rows as [N / 2048, 2048]


def measure(loss_fn, logits, targets):
    """(median ms, peak extra bytes) of loss_fn(x, targets).backward() with x a leaf."""
    x = logits.clone().requires_grad_(True)
    return time_and_peak(lambda: loss_fn(x, targets).backward(), [x])


def _selective(selection, scoring="gradnorm", **kw):
    def loss(x, t):
        if selection == "sequence_aware":
            x, t = x.view(-1, SEQ_LEN, x.shape[-1]), t.view(-1, SEQ_LEN)
        return cggr_cross_entropy(x, t, 0.25, scoring=scoring, selection=selection, check_targets=False, **kw)
    return loss


def our_methods(full):
    methods = {f"cggr r=0.25 {sel} gradnorm": _selective(sel) for sel in SELECTIONS}
    for scoring in SCORINGS if full else ("combined",):
        methods[f"cggr r=0.25 topk {scoring}"] = _selective("topk", scoring)
    methods["cggr r=0.25 importance gradnorm inplace"] = _selective("importance", inplace_backward=True)
    methods["cggr r=1.0"] = lambda x, t: cggr_cross_entropy(x, t, 1.0, check_targets=False)
    # CGGRLoss against the functional call with the same options (the target check included).
    methods["cggr r=0.25 importance gradnorm, target check"] = lambda x, t: cggr_cross_entropy(x, t, 0.25)
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0)
    methods["cggr CGGRLoss(0.25) defaults"] = lambda x, t: crit(x, t)
    return methods


def baseline_methods():
    methods = {"F.cross_entropy": lambda x, t: F.cross_entropy(x, t)}
    compiled = torch.compile(lambda x, t: F.cross_entropy(x, t))
    methods["torch.compile(F.cross_entropy)"] = compiled
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        methods["liger CE"] = LigerCrossEntropyLoss()
    except ImportError as error:
        print("liger-kernel not available:", error)
    return methods


def cggr05_in_subprocess(n, v, path):
    """cggr 0.5.0's top-level module is also called ``cggr``: time it in its own process."""
    code = "\n".join([
        f"import sys, json, torch; sys.path.insert(0, {path!r}); sys.path.insert(1, {os.path.dirname(__file__)!r})",
        "from _results import time_and_peak",
        "from cggr import CGGRLoss",
        inspect.getsource(measure),
        "crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0).cuda()",
        f"x = torch.randn({n}, {v}, device='cuda', dtype=torch.bfloat16)",
        f"t = torch.randint(0, {v}, ({n},), device='cuda')",
        "print('RESULT', json.dumps(measure(lambda a, y: crit(a, y), x, t)))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=""))
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    print("cggr 0.5.0 failed:", out.stderr[-2000:])
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="the two main shapes only")
    parser.add_argument("--cggr05", default=os.environ.get("CGGR05_PATH"), help="folder holding cggr 0.5.0")
    args = parser.parse_args()
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbs()
    print(f"{device_name}: copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    baselines = baseline_methods()
    for index, (n, v) in enumerate(SHAPES[:2] if args.quick else SHAPES):
        main_shape = index <= 1
        logits = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16)
        targets = torch.randint(0, v, (n,), device="cuda")
        targets[torch.rand(n, device="cuda") < 0.1] = -100
        valid = targets != -100
        ms = do_bench(lambda: triton_backend.row_stats_op(logits[None], targets, valid, None, "combined", 0.0, 0.0,
                                                          1.0, 0.0),
                      warmup=25, rep=200, return_mode="median")
        rows.append(dict(N=n, V=v, method="scoring pass only", ms=ms, extra_bytes=None,
                         pct_copy_bw=100 * (n * v * 2 / ms / 1e6) / bandwidth))
        methods = dict(our_methods(main_shape), **baselines)
        for name, fn in methods.items():
            try:
                t, peak = measure(fn, logits, targets)
            except Exception as error:  # report, keep measuring the rest
                print(f"{name} at N={n} V={v} failed: {error!r}")
                continue
            rows.append(dict(N=n, V=v, method=name, ms=t, extra_bytes=peak))
        if args.cggr05:
            result = cggr05_in_subprocess(n, v, args.cggr05)
            if result:
                rows.append(dict(N=n, V=v, method="cggr 0.5.0 CGGRLoss(0.25)", ms=result[0], extra_bytes=result[1]))
        for ratio in (0.25, 1.0):
            floor = (2 + ratio) * n * v * 2 / (bandwidth * 1e6)
            for row in rows:
                if row["N"] == n and row["V"] == v and row["method"].startswith(f"cggr r={ratio}"):
                    row["floor_ms"] = floor
                    row["pct_of_floor"] = 100 * floor / row["ms"]
        logits = targets = None  # freed before the next shape
        torch.cuda.empty_cache()

    print(f"\n{'N':>6} {'V':>7}  {'method':<40} {'ms':>8} {'extra GB':>9}  note")
    for row in rows:
        extra = "" if row["extra_bytes"] is None else f"{row['extra_bytes'] / 1e9:9.2f}"
        print(f"{row['N']:>6} {row['V']:>7}  {row['method']:<40} {row['ms']:8.3f} {extra:>9}  {loss_row_note(row)}")
    write_result("loss", args.out, rows, ("triton", "liger-kernel"), copy_bandwidth_gbs=bandwidth, dtype="bfloat16")


if __name__ == "__main__":
    main()
