"""Rows whose start is not 16-byte aligned (V odd, or not a multiple of 8 in bf16), read
shifted to 16-byte boundaries: the statistics pass and forward+backward against aligned
neighbours of about the same size (bench/NOTES.md, step 18).

    python bench/probe_vocab.py [N]

Prints, per V, the scoring pass's share of copy bandwidth and the forward+backward time at
ratio 0.25 and 1.0 (bf16, combined), with Liger's cross entropy when importable.
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from cggr.core import LossOptions  # noqa: E402
from cggr.functional import cggr_cross_entropy  # noqa: E402
from cggr.ops import triton_backend  # noqa: E402

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
    print(f"{'V':>7} {'stats ms':>9} {'% copy':>7} {'r=0.25 ms':>10} {'r=1.0 ms':>9} {'liger ms':>9}")
    for v in VOCABS:
        x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda")
        valid = t != -100
        stats_ms = do_bench(lambda: triton_backend.row_stats(x[None], t, valid, LossOptions()), return_mode="median")
        xg = x.clone().requires_grad_(True)
        times = []
        for ratio in (0.25, 1.0):
            times.append(do_bench(lambda: cggr_cross_entropy(xg, t, ratio, check_targets=False).backward(),
                                  grad_to_none=[xg], return_mode="median"))
        liger_ms = float("nan")
        if liger is not None:
            liger_ms = do_bench(lambda: liger(xg, t).backward(), grad_to_none=[xg], return_mode="median")
        pct = 100 * n * v * 2 / stats_ms / 1e6 / bandwidth
        print(f"{v:>7} {stats_ms:9.3f} {pct:7.1f} {times[0]:10.3f} {times[1]:9.3f} {liger_ms:9.3f}")
        del x, xg
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
