"""Rows whose start is not 16-byte aligned (V odd, or not a multiple of 8 in bf16), read
shifted to 16-byte boundaries: the statistics pass and forward+backward against aligned
neighbours of about the same size (bench/probes/NOTES.md, steps 18 and 20).

    python bench/probes/probe_vocab.py [N]

Prints, per V and layout, the scoring pass's share of copy bandwidth and the forward+backward
time at ratio 0.25 and 1.0 (bf16, combined), with Liger's cross entropy when importable.
Layouts: 'rows' (a contiguous [N, V]) and, for odd V, 'one row in' (``x[1:]`` of [N + 1, V]:
the view's pointer is not 16-byte aligned either). Gradients are taken with respect to the
tensor passed, so a view costs no copy into its base.
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.core import LossOptions  # noqa: E402
from cggr.functional import cggr_cross_entropy  # noqa: E402
from cggr.ops import triton_backend  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _results import copy_bandwidth_gbs  # noqa: E402

VOCABS = (32000, 32001, 50257, 50304, 128256, 128257, 151935)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    bandwidth = copy_bandwidth_gbs()
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        liger = LigerCrossEntropyLoss()
    except ImportError:
        liger = None
    print(f"{torch.cuda.get_device_name()}  copy {bandwidth:.0f} GB/s  N={n} bf16")
    print(f"{'V':>7} {'layout':>10} {'stats ms':>9} {'% copy':>7} {'r=0.25 ms':>10} {'r=1.0 ms':>9} {'liger ms':>9}")
    for v in VOCABS:
        for layout in ("rows", "one row in") if v % 2 else ("rows",):
            skip = 1 if layout == "one row in" else 0
            x = torch.randn(n + skip, v, device="cuda", dtype=torch.bfloat16)[skip:]
            t = torch.randint(0, v, (n,), device="cuda")
            valid = t != -100
            stats_ms = do_bench(lambda: triton_backend.row_stats(x[None], t, valid, LossOptions()),
                                return_mode="median")
            xg = x.detach().requires_grad_(True)[:]  # a view, as x is: gradients stop at it

            def step(loss_fn):
                return lambda: torch.autograd.grad(loss_fn(xg, t), xg)
            times = [do_bench(step(lambda a, b, r=ratio: cggr_cross_entropy(a, b, r, check_targets=False)),
                              return_mode="median") for ratio in (0.25, 1.0)]
            liger_ms = float("nan") if liger is None else do_bench(step(liger), return_mode="median")
            pct = 100 * n * v * 2 / stats_ms / 1e6 / bandwidth
            print(f"{v:>7} {layout:>10} {stats_ms:9.3f} {pct:7.1f} {times[0]:10.3f} {times[1]:9.3f} {liger_ms:9.3f}")
            x = xg = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
