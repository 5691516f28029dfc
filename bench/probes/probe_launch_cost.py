"""Probe: the host's microseconds for the pieces of one kernel launch (where a small call's time
goes on a slow host).

    python bench/probes/probe_launch_cost.py

Times, fastest of five rounds of 2000 calls each: an allocation, a PyTorch comparison kernel,
Triton's current device and stream lookups (through its driver object, and through torch),
the launch key of ``cggr.ops.launch`` for the statistics kernel's 20 arguments, ``launch`` of a
trivial kernel with as many arguments, the same kernel through ``kernel[grid](...)``, and its
compiled launcher called directly with prepared arguments.
"""
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.ops import launch as launch_module  # noqa: E402


@triton.jit
def noop_kernel(a, b, c, d, e, i0, i1, i2, i3, i4, f0, f1, f2, f3, f4, f5, f6, f7, BLOCK: tl.constexpr,
                FLAG: tl.constexpr):
    if tl.program_id(0) < 0:
        tl.store(a, BLOCK)


def us(fn, calls=2000, rounds=5):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main():
    x = torch.randn(64, 256, device="cuda")
    t = torch.randint(0, 256, (64,), device="cuda")
    stats = torch.empty(64, 9, device="cuda")
    args = (x, t, t, t, stats, 64, 256, 256, 0, 256, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    constexprs = dict(BLOCK=256, FLAG=True)
    device = driver.active.get_current_device()
    key_of = launch_module._specialisation
    launch_module.launch(noop_kernel, 64, *args, num_warps=1, **constexprs)
    compiled = next(iter(launch_module._compiled.values()))
    stream = driver.active.get_current_stream(device)
    params = (*args, *constexprs.values())
    cases = {
        "torch.empty(64)": lambda: torch.empty(64, device="cuda"),
        "targets != -100": lambda: t != -100,
        "driver.active.get_current_device()": lambda: driver.active.get_current_device(),
        "driver.active.get_current_stream(d)": lambda: driver.active.get_current_stream(device),
        "torch.cuda.current_device()": torch.cuda.current_device,
        "torch._C._cuda_getCurrentRawStream(d)": lambda: torch._C._cuda_getCurrentRawStream(device),
        "launch key": lambda: (noop_kernel, device, 1, None, *constexprs.items(), *map(key_of, args)),
        "compiled.run, prepared": lambda: compiled.run(64, 1, 1, stream, compiled.function, compiled.packed_metadata,
                                                       None, knobs.runtime.launch_enter_hook,
                                                       knobs.runtime.launch_exit_hook, *params),
        "cggr launch()": lambda: launch_module.launch(noop_kernel, 64, *args, num_warps=1, **constexprs),
        "kernel[grid](...)": lambda: noop_kernel[(64,)](*args, num_warps=1, **constexprs),
    }
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for _ in range(2):
        for name, fn in cases.items():
            print(f"{name:<40} {us(fn):7.2f} us")


if __name__ == "__main__":
    main()
