"""Host time of a tiny fused head (64 rows, H = 256, V = 256, bf16) on the GPU's host, by
selection, against the plain path; the same with the backward on the caller's thread; then a
cProfile and torch.profiler CPU table of one selection's step.

    python bench/probes/probe_head_host_profile.py [SELECTION_TO_PROFILE]
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402
from profile_step import backward_step, head_inputs, host_profile, host_us  # noqa: E402


def main():
    profiled = sys.argv[1] if len(sys.argv) > 1 else "topk"
    h, w, t = head_inputs(64, 256, 256)

    def make(fn, one_thread=False):
        return backward_step(fn, h, w, one_thread=one_thread)

    def fused(selection, ratio=0.25):
        hh, tt = (h.view(1, 64, 256), t.view(1, 64)) if selection == "sequence_aware" else (h, t)
        return lambda: cggr_linear_cross_entropy(hh, w, tt, ratio, selection=selection, check_targets=False)

    cases = {"plain": make(lambda: F.cross_entropy(h @ w.T, t))}
    for s in ("topk", "importance", "random", "stratified", "sequence_aware"):
        cases[s] = make(fused(s))
    cases["r=1"] = make(fused("importance", 1.0))
    cases["plain, one thread"] = make(lambda: F.cross_entropy(h @ w.T, t), True)
    cases["topk, one thread"] = make(fused("topk"), True)

    def forward_only():
        with torch.no_grad():
            fused("topk")()
    cases["topk forward, no grad"] = forward_only
    times = {k: [] for k in cases}
    for _ in range(3):
        for k, step in cases.items():
            times[k].append(host_us(step, calls=200, rounds=3))
    for k, v in times.items():
        print(f"host {k:<24} " + " ".join(f"{x:7.1f}" for x in v) + " us", flush=True)
    host_profile(cases[profiled], calls=300)


if __name__ == "__main__":
    main()
