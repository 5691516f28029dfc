"""Data-parallel checks and timing over NCCL, one process per GPU:

    torchrun --nproc-per-node 2 bench/bench_distributed.py [--out FILE]

1. Correctness: every selection with ``process_group`` (plain and fused-head paths) gives each
   rank the slice of mask, weights and gradients that one process computes on the concatenated
   batch, and the ranks' mean loss is that process's loss.
2. Timing: whole DDP training steps of a Qwen2.5-0.5B-shaped model (batch 8 x 2048 per GPU)
   with ``apply_cggr`` at ratio 1 and 0.25, with and without ``process_group`` (the difference is
   the collectives' cost), against the model's own loss. Rank 0 prints a table and writes JSON.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from _results import write_result  # noqa: E402
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy  # noqa: E402
from cggr.integrations.transformers import apply_cggr, remove_cggr  # noqa: E402

SELECTIONS = ["importance", "topk", "random", "stratified", "sequence_aware"]


def check(rank, world, device):
    """Max relative differences against one process on the concatenated batch, per case."""
    g = torch.Generator().manual_seed(0)
    per_rank, seq, vocab, dim = 4, 256, 32000, 256
    logits = (torch.randn(world * per_rank, seq, vocab, generator=g) * 2).to(device, torch.bfloat16)
    hidden = torch.randn(world * per_rank, seq, dim, generator=g).to(device, torch.bfloat16)
    weight = (torch.randn(vocab, dim, generator=g) * 0.05).to(device, torch.bfloat16)
    targets = torch.randint(0, vocab, (world * per_rank, seq), generator=g).to(device)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    results = []
    for selection in SELECTIONS:
        for path in ("plain", "linear"):
            outs = []
            for group, part in ((dist.group.WORLD, rows), (None, slice(None))):
                x = (logits if path == "plain" else hidden)[part].clone().requires_grad_(True)
                kw = dict(selection=selection, process_group=group, return_info=True, check_targets=False,
                          generator=torch.Generator(device=device).manual_seed(3))
                if path == "plain":
                    loss, info = cggr_cross_entropy(x, targets[part], 0.25, **kw)
                else:
                    loss, info = cggr_linear_cross_entropy(x, weight, targets[part], 0.25, **kw)
                loss.float().backward()
                outs.append((loss.detach().float(), x.grad.float(), info.mask))
            (loss_g, grad_g, mask_g), (loss_1, grad_1, mask_1) = outs
            mean_loss = loss_g.clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
            mask_ok = torch.equal(mask_g, mask_1[rows])
            grad_err = ((grad_g / world - grad_1[rows]).abs().max() / grad_1[rows].abs().max().clamp(min=1e-30))
            results.append(dict(case=f"{path}/{selection}", mask_equal=bool(mask_ok),
                                loss_rel_err=float((mean_loss - loss_1).abs() / loss_1.abs()),
                                grad_rel_err=float(grad_err)))
    return results


def time_ddp(rank, world, device, steps=6, warmup=3):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (8, 2048), device=device)
    rows = []
    for method in ("own loss", "cggr r=1.0", "cggr r=1.0 group", "cggr r=0.25", "cggr r=0.25 group"):
        if method.startswith("cggr"):
            group = dist.group.WORLD if method.endswith("group") else None
            apply_cggr(model, float(method.split("r=")[1].split()[0]), check_targets=False, process_group=group)
        times = []
        for step in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            ddp(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        remove_cggr(model)
        rows.append(dict(method=method, ms=statistics.median(times), peak_bytes=torch.cuda.max_memory_allocated()))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    checks = check(rank, world, device)
    timing = [] if args.no_timing else time_ddp(rank, world, device)
    if rank == 0:
        print(f"\n{'case':<28} {'mask equal':>10} {'loss rel err':>13} {'grad rel err':>13}")
        for row in checks:
            print(f"{row['case']:<28} {str(row['mask_equal']):>10} {row['loss_rel_err']:13.2e} "
                  f"{row['grad_rel_err']:13.2e}")
        by_name = {row["method"]: row["ms"] for row in timing}
        for row in timing:
            extra = ""
            if row["method"].endswith("group"):
                local = by_name[row["method"].replace(" group", "")]
                extra = f"  collectives {100 * (row['ms'] - local) / row['ms']:+.1f}% of the step"
            print(f"{row['method']:<22} {row['ms']:8.1f} ms  peak {row['peak_bytes'] / 1e9:5.1f} GB{extra}")
        write_result("distributed", args.out, dict(checks=checks, timing=timing), ("transformers", "triton"),
                     world_size=world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
