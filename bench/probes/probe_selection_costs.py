"""Each selection's cost on the small shapes, split into GPU kernels and host time, for one
source tree: run it on two trees to compare.

    python bench/probes/probe_selection_costs.py [SRC_DIR] [--label NAME] [--rounds 3]

Shapes: the head of a small model (8192 rows, H = 256, V = 16,384) and logits 4096 x 32,000,
bf16, 10% ignored rows, ratio 0.25 for each selection (``sequence_aware`` over rows of 2048
tokens), and ratio 1. Per case: the fastest and median do_bench round (cases alternated), the
summed GPU kernel time per call and the kernel count (torch.profiler), the selection's own
kernels (those named ``select``/``forced``/``randint``/``random``), and the host time of the same
call on 64 rows (V = 256), where only the host counts.
"""
import os
import statistics
import sys

src = next((a for a in sys.argv[1:] if not a.startswith("--") and not a.isdigit()),
           os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, src)
import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # after cggr: profile_step adds this tree's src
from profile_step import backward_step, cuda_kernels, head_inputs, host_us  # noqa: E402

SELECTIONS = ("topk", "importance", "random", "stratified", "sequence_aware")
SEQ_LEN = 2048


def kernels(step, calls=10):
    """(GPU µs per call, kernels per call, µs of the selection's own kernels per call)."""
    events = cuda_kernels(step, calls)
    total = sum(e.self_device_time_total for e in events) / calls
    count = sum(e.count for e in events) / calls
    selection = sum(e.self_device_time_total for e in events
                    if any(w in e.key.lower() for w in ("select", "forced", "randint", "random"))) / calls
    return total, count, selection


def make_head(n, h_dim, v):
    h, w, t = head_inputs(n, h_dim, v, ignored=0.1)

    def case(ratio, selection):
        seq = min(SEQ_LEN, n)
        hh, tt = (h.view(-1, seq, h_dim), t.view(-1, seq)) if selection == "sequence_aware" else (h, t)
        return backward_step(lambda: cggr_linear_cross_entropy(hh, w, tt, ratio, selection=selection,
                                                               check_targets=False), h, w)
    return case, backward_step(lambda: torch.nn.functional.cross_entropy(h @ w.T, t), h, w)


def make_logits(n, v):
    x = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (n,), device="cuda")
    t[torch.rand(n, device="cuda") < 0.1] = -100

    def case(ratio, selection):
        seq = min(SEQ_LEN, n)
        xx, tt = (x.view(-1, seq, v), t.view(-1, seq)) if selection == "sequence_aware" else (x, t)

        return backward_step(lambda: cggr_cross_entropy(xx, tt, ratio, selection=selection, check_targets=False), x)
    return case, backward_step(lambda: torch.nn.functional.cross_entropy(x, t), x)


def main():
    label = sys.argv[sys.argv.index("--label") + 1] if "--label" in sys.argv else src
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    torch.manual_seed(0)
    for name, (case, plain), (tiny_case, tiny_plain) in (
            ("head 8192x256x16384", make_head(8192, 256, 16384), make_head(64, 256, 256)),
            ("logits 4096x32000", make_logits(4096, 32000), make_logits(64, 256))):
        cases = {f"r=0.25 {s}": (case(0.25, s), tiny_case(0.25, s)) for s in SELECTIONS}
        cases["r=1"] = (case(1.0, "importance"), tiny_case(1.0, "importance"))
        cases["plain"] = (plain, tiny_plain)
        for step, _ in cases.values():
            step()
        times = {k: [] for k in cases}
        for _ in range(rounds):
            for k, (step, _) in cases.items():
                times[k].append(do_bench(step, warmup=10, rep=100, return_mode="median"))
        for k, (step, tiny) in cases.items():
            gpu, count, sel = kernels(step)
            print(f"{label:<6} {name:<20} {k:<22} fastest {min(times[k]):6.3f} median "
                  f"{statistics.median(times[k]):6.3f} ms | gpu {gpu:7.1f} us in {count:4.1f} kernels, "
                  f"selection {sel:6.1f} us | host {host_us(tiny):6.1f} us", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
