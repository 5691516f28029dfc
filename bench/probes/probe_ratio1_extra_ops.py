"""Probe: which ops of the linear path at ratio 1 (bf16 tensors) launch float32 adds and copies
of the weight's size? (``probe_autocast_kernels.py`` showed a float add and a copy of [V, H]
elements in the bf16 path, absent under autocast.)

    python bench/probes/probe_ratio1_extra_ops.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.functional import cggr_linear_cross_entropy  # noqa: E402


def main():
    n, h_dim, v = 16384, 896, 151936
    h = torch.randn(n, h_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h_dim, device="cuda") / h_dim ** 0.5).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")

    def step():
        cggr_linear_cross_entropy(h, w, t, 1.0, check_targets=False).backward()
        h.grad = w.grad = None
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                record_shapes=True, with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="device_time_total", row_limit=25,
                                                             max_name_column_width=40, max_shapes_column_width=70))
    for event in prof.events():
        if event.name in ("aten::add", "aten::add_", "aten::copy_", "aten::to", "aten::_to_copy", "aten::clone") \
                and event.device_time_total > 100:
            print(event.name, event.input_shapes, f"{event.device_time_total / 1e3:.3f} ms")
            print("   ", "\n    ".join(event.stack[:12]))


if __name__ == "__main__":
    main()
