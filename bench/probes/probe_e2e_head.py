"""Why a whole Qwen2.5-0.5B-shaped step (bf16, batch 8, T = 2048) is no faster with cggr at ratio 1
than with cut-cross-entropy although the head alone is: alternate the two methods' step times,
then list each one's GPU kernels by total time for one step.

    python bench/probes/probe_e2e_head.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from bench_e2e import MODELS, build, patch, time_steps  # noqa: E402


def kernels(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, 2048), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    found = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in found) / 1e3
    print(f"  GPU kernel time {total:.1f} ms in {sum(e.count for e in found)} kernels")
    for e in sorted(found, key=lambda e: -e.self_device_time_total)[:22]:
        print(f"    {e.self_device_time_total / 1e3:7.2f} ms {e.count:4d}x  {e.key[:90]}")


def main():
    kind, shape, batch = MODELS["qwen2.5-0.5b"]
    methods = ["cut-cross-entropy", "cut-cross-entropy exact", "cggr r=1.0"]
    model = build(kind, shape, torch.bfloat16)
    for rnd in range(2):
        for method in methods:
            undo = patch(model, method)
            ms, peak, _ = time_steps(model, batch, False, steps=12)
            print(f"round {rnd} {method:<20} {ms:7.1f} ms  peak {peak / 1e9:.1f} GB", flush=True)
            undo()
    for method in methods:
        undo = patch(model, method)
        print(method)
        kernels(model, batch)
        undo()


if __name__ == "__main__":
    main()
