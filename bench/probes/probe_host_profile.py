"""cProfile of a tiny fused head (64 rows, H=64, V=256, bf16) on the GPU: cggr's call against the
same work done with the backend's functions directly (probe_head_host.python_node).

    python bench/probes/probe_host_profile.py
"""
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import probe_head_host as probe  # noqa: E402

from cggr.functional import cggr_linear_cross_entropy  # noqa: E402


def main():
    h = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 256, (64,), device="cuda")
    cases = {"cggr": lambda: cggr_linear_cross_entropy(h, w, t, 0.25, check_targets=False),
             "direct": lambda: probe.python_node(h, w, t, 0.25)}
    for backward in (False, True):
        for name, fn in cases.items():
            def step():
                loss = fn()
                if backward:
                    loss.backward()
                h.grad = w.grad = None
            for _ in range(50):
                step()
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(300):
                    step()
                torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - start) / 300 * 1e6)
            print(f"{name:<8} backward={backward}: {best:7.1f} us per call (best of 5)")
            if backward:
                continue
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(300):
                step()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
