"""Sweep launch configurations of the two Triton kernels and profile one forward+backward.

    python bench/probes/tune_kernels.py [N V] [--stats-only]
    python bench/probes/tune_kernels.py --select

Prints the bandwidth each configuration reaches (bytes moved / median time) against the
copy bandwidth, and the profiler's kernel table for cggr_cross_entropy at ratio 0.25.
``--select`` times the one-program ``topk`` selection instead, for several row counts.
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from cggr.functional import cggr_cross_entropy  # noqa: E402
from cggr.ops import triton_backend  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _results import copy_bandwidth_gbs  # noqa: E402

STATS_CONFIGS = [(512, 1), (1024, 1), (512, 2), (1024, 2), (2048, 2), (1024, 4), (2048, 4), (4096, 4), (4096, 8),
                 (8192, 8)]  # (BLOCK_V, num_warps)

GRAD_CONFIGS = [(8192, 16), (16384, 16), (16384, 32), (32768, 32)]

SELECT_CONFIGS = [(2048, 8), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (8192, 32), (16384, 16), (16384, 32)]


def graph_time_ms(fn, calls=100):
    """GPU time per call of ``fn`` replayed from a CUDA graph: the host's launch time (more
    than a one-program kernel's) and the cache flush of do_bench stay out of it."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # compiles before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def tune_select():
    """GPU time of the one-program selection (ratio 0.25, then 1.0) per (rows per step, warps)."""
    from cggr.core import LossOptions
    defaults = dict(triton_backend.CONFIGS)
    row_counts = (4096, 8192, 32768)
    print(f"{'rows/step':>9} {'warps':>5}" + "".join(f" {f'N={n} ms':>12}" for n in row_counts) + "  (ratio 1.0)")
    cases = []
    for n in row_counts:
        logits = torch.randn(1, n, 256, device="cuda", dtype=torch.bfloat16)
        targets = torch.randint(0, 256, (n,), device="cuda")
        valid = torch.rand(n, device="cuda") < 0.9
        cases.append((triton_backend.row_stats(logits, targets, valid, LossOptions()), valid))
    for config in SELECT_CONFIGS:
        triton_backend.CONFIGS["select"] = config
        times = [graph_time_ms(lambda: triton_backend.select_topk(stats, valid, ratio, "mean"))
                 for ratio in (0.25, 1.0) for stats, valid in cases]
        print(f"{config[0]:>9} {config[1]:>5}" + "".join(f" {t:12.4f}" for t in times))
    triton_backend.CONFIGS.update(defaults)


def main():
    if "--select" in sys.argv:
        return tune_select()
    sizes = [int(a) for a in sys.argv[1:] if not a.startswith("--")]
    n, v = sizes if sizes else (8192, 128256)
    logits = torch.randn(1, n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    valid = torch.ones(n, dtype=torch.bool, device="cuda")
    lse = torch.randn(n, device="cuda")
    coef = torch.rand(n, device="cuda")
    mask = torch.rand(n, device="cuda") < 0.25
    bandwidth = copy_bandwidth_gbs()
    defaults = dict(triton_backend.CONFIGS)
    print(f"copy bandwidth {bandwidth:.0f} GB/s; N={n} V={v} bf16")
    nbytes = n * v * 2
    scorings = ("combined", "entropy", "gradnorm", "margin", "loss")
    print(f"{'BLOCK_V':>7} {'warps':>5}" + "".join(f" {s + ' ms':>12} {'%bw':>4}" for s in scorings))
    for config in STATS_CONFIGS:
        for kind in ("stats", "stats_sum_sq", "stats_few"):
            triton_backend.CONFIGS[kind] = config
        times = [do_bench(lambda: triton_backend.row_stats_op(logits, targets, valid, None, scoring, 0.0, 0.0, 1.0,
                                                              0.0), return_mode="median") for scoring in scorings]
        print(f"{config[0]:>7} {config[1]:>5}"
              + "".join(f" {t:12.3f} {100 * nbytes / t / 1e6 / bandwidth:4.0f}" for t in times))
    triton_backend.CONFIGS.update(defaults)
    print(f"gradnorm with its registers capped at {triton_backend._SUM_SQ_MAX_REGISTERS} / not capped (ms, %bw), "
          "and with few rows (N=1024):")
    cap, few = triton_backend._SUM_SQ_MAX_REGISTERS, logits[:, :1024]
    for config in STATS_CONFIGS:
        for kind in ("stats", "stats_sum_sq", "stats_few"):
            triton_backend.CONFIGS[kind] = config
        cells = []
        for rows in (logits, few):
            for registers in (cap, None):
                triton_backend._SUM_SQ_MAX_REGISTERS = registers
                t = do_bench(lambda: triton_backend.row_stats_op(rows, targets[:rows.shape[1]], valid[:rows.shape[1]],
                                                                 None, "gradnorm", 0.0, 0.0, 1.0, 0.0),
                             return_mode="median")
                cells.append(f" {t:8.3f} {100 * rows.numel() * 2 / t / 1e6 / bandwidth:4.0f}")
        print(f"{config[0]:>7} {config[1]:>5}" + "".join(cells))
    triton_backend._SUM_SQ_MAX_REGISTERS = cap
    if "--stats-only" in sys.argv:
        triton_backend.CONFIGS.update(defaults)
        return
    triton_backend.CONFIGS.update(defaults)
    grad_bytes = nbytes * (1 + mask.float().mean().item())
    print(f"{'grad BLOCK_V':>13} {'warps':>5} {'ms (25% rows)':>14} {'%bw':>4}")
    for config in GRAD_CONFIGS:
        triton_backend.CONFIGS["grad"] = config
        t = do_bench(lambda: triton_backend.logits_grad_op(logits, targets, lse, coef, mask, 0.0, 0.0, 1.0, 0.0),
                     return_mode="median")
        print(f"{config[0]:>13} {config[1]:>5} {t:14.3f} {100 * grad_bytes / t / 1e6 / bandwidth:4.0f}")
    triton_backend.CONFIGS.update(defaults)

    x = logits[0].clone().requires_grad_(True)

    def step():
        cggr_cross_entropy(x, targets, 0.25, check_targets=False).backward()
        x.grad = None

    small = torch.randn(8192, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    small_targets = torch.randint(0, 32000, (8192,), device="cuda")

    def small_step():
        cggr_cross_entropy(small, small_targets, 0.25, check_targets=False).backward()
        small.grad = None

    for _ in range(5):
        small_step()
    torch.cuda.synchronize()
    print("V=32000 fwd+bwd ms:", do_bench(small_step, return_mode="median"))
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        small_step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(18)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
