"""Writing a benchmark's JSON under bench/results/ with what is needed to reproduce it."""
import json
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def package_versions(*names):
    found = {"torch": torch.__version__}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write_result(kind, out, rows, packages, **fields):
    """``bench/results/<kind>_<gpu>.json`` (or ``out``) with device, versions, command and rows."""
    device = torch.cuda.get_device_name()
    result = dict(device=device, versions=package_versions(*packages), date=time.strftime("%Y-%m-%d"),
                  command=" ".join(["python"] + sys.argv), **fields, rows=rows)
    out = out or os.path.join(RESULTS, f"{kind}_{device.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


def copy_bandwidth_gbs(n_bytes=4 << 30) -> float:
    """The GPU's device-to-device copy bandwidth in GB/s (bytes read plus bytes written)."""
    from triton.testing import do_bench

    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    src = dst = None  # free the buffers before the caller allocates
    return 2 * n_bytes / ms / 1e6


def loss_row_note(row: dict) -> str:
    """The note column of a bench_loss row: its share of the byte floor or of copy bandwidth."""
    if "pct_of_floor" in row:
        return f"{row['pct_of_floor']:.0f}% of byte floor"
    if "pct_copy_bw" in row:
        return f"{row['pct_copy_bw']:.0f}% of copy bandwidth"
    return ""


def time_and_peak(step, leaves, rep_ms=200, keep_grads=False):
    """(median ms, peak extra bytes) of ``step()`` (a forward+backward into ``leaves``' grads).

    Peak extra memory is the most allocated during one step minus what was allocated before
    it, so it includes the gradients the step produces. With ``keep_grads`` the leaves' grads
    exist (zeros) before each step and are accumulated into, as in a training loop with
    gradient accumulation or ``zero_grad(set_to_none=False)``; they count as already allocated.
    """
    from triton.testing import do_bench

    def clear():
        for leaf in leaves:
            leaf.grad = torch.zeros_like(leaf) if keep_grads else None

    step()  # warm-up: compilation and autotuning stay out of both numbers
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    clear()
    ms = do_bench(step, warmup=25, rep=rep_ms, grad_to_none=None if keep_grads else list(leaves),
                  return_mode="median")
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.empty_cache()
    return ms, peak
