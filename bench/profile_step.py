"""Where one forward+backward spends its time: host (Python and launches) against GPU kernels.

    python bench/profile_step.py [--linear] [--host]

For each case prints the do_bench median (what bench_loss.py reports), the host time per call
(measured on a tiny vocabulary, so the GPU never holds the host back), the summed GPU kernel
time per call from the profiler, the kernel count, and the costliest kernels. ``--host`` first
prints the host microseconds of each backend entry point and of a whole call (64 rows, V=256:
only the host counts), with the backward on the autograd engine's thread and on the caller's,
then a cProfile of a small step.
"""
import argparse
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy  # noqa: E402

LOSS_CASES = [
    (8192, 128256, dict(ratio=0.25, selection="importance")),
    (8192, 128256, dict(ratio=0.25, selection="topk")),
    (8192, 128256, dict(ratio=0.25, selection="stratified")),
    (8192, 128256, dict(ratio=1.0, selection="importance")),
    (4096, 32000, dict(ratio=0.25, selection="importance")),
    (4096, 32000, dict(ratio=0.25, selection="topk")),
    (4096, 32000, dict(ratio=1.0, selection="importance")),
]
LINEAR_CASES = [
    (8192, 4096, 128256, dict(ratio=0.25, selection="importance")),
    (8192, 4096, 128256, dict(ratio=1.0, selection="importance")),
    (8192, 256, 16384, dict(ratio=0.25, selection="importance")),
    (8192, 256, 16384, dict(ratio=1.0, selection="importance")),
]


def host_us(step, calls=200, rounds=3, warmup=20) -> float:
    """Host µs per call of ``step``: the fastest of ``rounds`` rounds of ``calls`` calls, timed
    up to the GPU's end (on a tiny shape, where the GPU never holds the host back)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6 / calls)
    return min(times)


def host_ms(step, calls=200, warmup=10):
    """Host ms per call of ``step``, one round (see :func:`host_us`)."""
    return host_us(step, calls, rounds=1, warmup=warmup) / 1e3


def host_and_bench_rounds(tiny: dict, big: dict, rounds: int, shape: str, width: int = 30) -> None:
    """Alternated rounds over named cases: host µs of each ``tiny`` step and do_bench ms of the
    ``big`` one of the same name; prints the fastest and median round of each."""
    import statistics

    host = {k: [] for k in tiny}
    bench = {k: [] for k in big}
    for _ in range(rounds):
        for k in tiny:
            host[k].append(host_us(tiny[k]))
            bench[k].append(do_bench(big[k], warmup=10, rep=100, return_mode="median"))
    for k in tiny:
        print(f"{k:<{width}} host fastest {min(host[k]):7.1f} median {statistics.median(host[k]):7.1f} us | "
              f"{shape} fastest {min(bench[k]):6.3f} median {statistics.median(bench[k]):6.3f} ms")


def cuda_kernels(step, calls=5):
    """The profiler's averaged GPU kernel events over ``calls`` calls of ``step`` (after one more)."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_profile(step, calls=5):
    """(GPU kernel ms per call, kernels per call, [(name, ms per call)] costliest first)."""
    kernels = cuda_kernels(step, calls)
    total = sum(e.self_device_time_total for e in kernels) / 1e3 / calls
    count = sum(e.count for e in kernels) / calls
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:5]
    return total, count, [(e.key[:60], e.self_device_time_total / 1e3 / calls) for e in top]


def report(label, step, tiny_step):
    ms = do_bench(step, warmup=25, rep=200, return_mode="median")
    host = host_ms(tiny_step)
    gpu, count, top = kernel_profile(step)
    print(f"{label:<70} bench {ms:6.3f}  host {host:6.3f}  gpu {gpu:6.3f} ms in {count:5.1f} kernels")
    for name, t in top:
        print(f"      {t:7.3f}  {name}")


def backward_step(loss_fn, *leaves, one_thread=False):
    """A step: ``loss_fn().backward()`` (with ``one_thread``, on the caller's thread rather than
    autograd's device thread), then the ``leaves``' gradients dropped, as ``zero_grad`` does."""
    def step():
        if one_thread:
            with torch.autograd.set_multithreading_enabled(False):
                loss_fn().backward()
        else:  # no context to enter: its Python would count in every host time
            loss_fn().backward()
        for leaf in leaves:
            leaf.grad = None
    return step


def head_inputs(n, h, v, ignored=0.0):
    """A small model's head on the GPU: bf16 hidden ``[n, h]`` and weight ``[v, h]`` (scaled by
    ``h ** -0.5``), both needing gradients, and int64 targets ``[n]``, about ``ignored`` of them
    -100."""
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h ** 0.5).requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")
    if ignored:
        t[torch.rand(n, device="cuda") < ignored] = -100
    return hidden, weight, t


def loss_step(n, v, kw):
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (n,), device="cuda")
    return backward_step(lambda: cggr_cross_entropy(x, t, check_targets=False, **kw), x)


def linear_step(n, h, v, kw):
    hidden, weight, t = head_inputs(n, h, v)
    return backward_step(lambda: cggr_linear_cross_entropy(hidden, weight, t, check_targets=False, **kw), hidden,
                         weight)


def training_head_step(n, h, v, ratio):
    """The head of a small model's training step: fp32 weight, bf16 autocast, a curriculum ratio
    (``ratio`` None: ``hidden @ W.T`` and ``F.cross_entropy``, the plain path)."""
    from cggr import Curriculum

    hidden = torch.randn(n, h, device="cuda", requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") / h ** 0.5).requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")
    curriculum = None if ratio is None else Curriculum(ratio, 0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if curriculum is None:
                loss = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), t)
            else:
                loss = cggr_linear_cross_entropy(hidden, weight, t, curriculum, check_targets=False)
        loss.backward()
        hidden.grad = weight.grad = None
    return step


def head_host_breakdown(rounds=3):
    """Host ms of the pieces of a small head's call (64 rows, H=64, V=256), alternated."""
    n, h, v = 64, 64, 256
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (n,), device="cuda")

    def fused(ratio, backward=True):
        def step():
            loss = cggr_linear_cross_entropy(hidden, weight, t, ratio, check_targets=False)
            if backward:
                loss.backward()
            hidden.grad = weight.grad = None
        return step

    def plain():
        torch.nn.functional.cross_entropy((hidden @ weight.T).float(), t).backward()
        hidden.grad = weight.grad = None

    def one_thread(step):
        def wrapped():
            with torch.autograd.set_multithreading_enabled(False):
                step()
        return wrapped

    def no_grad(step):
        def wrapped():
            with torch.no_grad():
                step()
        return wrapped

    cases = {"plain bf16": plain, "fused r=1": fused(1.0), "fused r=0.25": fused(0.25),
             "fused r=0.25 forward only": fused(0.25, backward=False),
             "fused r=0.25 no grad": no_grad(fused(0.25, backward=False)),
             "fused r=0.25 one thread": one_thread(fused(0.25)), "fused r=1 one thread": one_thread(fused(1.0)),
             "autocast fp32 head r=0.25": training_head_step(n, h, v, 0.25),
             "autocast fp32 head plain": training_head_step(n, h, v, None)}
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, step in cases.items():
            times[name].append(host_ms(step, calls=500, warmup=20))
    for name, values in times.items():
        print(f"host {name:<28} " + " ".join(f"{1e3 * x:6.0f}" for x in values) + " us")


def entry_point_costs():
    """Host microseconds a call of each backend entry point and of the whole loss."""
    from cggr.core import LossOptions
    from cggr.ops import triton_backend as backend

    n, v = 64, 256
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, v, (n,), device="cuda")
    rows, valid = x.detach()[None], t != -100
    opts = LossOptions()
    stats = backend.row_stats(rows, t, valid, opts)

    def loss_step():
        cggr_cross_entropy(x, t, 0.25, check_targets=False).backward()
        x.grad = None

    def loss_step_one_thread():
        with torch.autograd.set_multithreading_enabled(False):
            loss_step()

    def forward_only():
        with torch.no_grad():
            cggr_cross_entropy(x, t, 0.25, check_targets=False)

    cases = [
        ("statistics (row_stats)", lambda: backend.row_stats(rows, t, valid, opts)),
        ("selection (select, importance)", lambda: backend.select(stats, valid, 0.25, opts)),
        ("gradient (logits_grad)", lambda: backend.logits_grad(rows, t, stats.lse, stats.lse, valid, opts)),
        ("forward, no grad", forward_only),
        ("forward+backward", loss_step),
        ("forward+backward, one thread", loss_step_one_thread),
    ]
    for name, fn in cases:
        print(f"{name:<32} {1e3 * host_ms(fn, calls=2000, warmup=50):7.1f} us")


def host_profile(step, calls=200):
    """Where the host time of ``step`` goes: Python functions, then aten ops and launches."""
    import cProfile
    import pstats

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(cpu_op_table(step))


def cpu_op_table(step, calls=20, rows=30, width=50) -> str:
    """torch.profiler's table of host ops over ``calls`` calls of ``step``, by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=width)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--linear", action="store_true", help="also profile the linear path")
    parser.add_argument("--host", action="store_true", help="profile the host side of a small loss step")
    parser.add_argument("--head-host", action="store_true",
                        help="only the host side of a small model's head under autocast, plain and fused")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.head_host:
        for ratio in (None, 1.0, 0.25):
            step, tiny = training_head_step(8192, 256, 32768, ratio), training_head_step(64, 64, 256, ratio)
            print(f"head ratio {ratio}: bench {do_bench(step, warmup=25, rep=200, return_mode='median'):.3f} ms, "
                  f"host {host_ms(tiny):.3f} ms")
        head_host_breakdown()
        host_profile(training_head_step(64, 64, 256, 0.25))
        return
    if args.host:
        entry_point_costs()
        host_profile(loss_step(8192, 256, LOSS_CASES[0][2]))
    for n, v, kw in LOSS_CASES:
        report(f"loss N={n} V={v} {kw}", loss_step(n, v, kw), loss_step(n, 256, kw))
        if n == 4096 and v == 32000 and kw["ratio"] == 1.0:
            compiled = torch.compile(torch.nn.functional.cross_entropy)
            x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            t = torch.randint(0, v, (n,), device="cuda")
            print(f"{'torch.compile(F.cross_entropy) ' + str((n, v)):<44} bench "
                  f"{do_bench(lambda: compiled(x, t).backward(), warmup=25, rep=200, return_mode='median'):6.3f}")
        torch.cuda.empty_cache()
    if args.linear:
        for n, h, v, kw in LINEAR_CASES:
            report(f"linear N={n} H={h} V={v} {kw}", linear_step(n, h, v, kw), linear_step(n, 64, 256, kw))
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
