"""Data-parallel training with global token selection: a runnable example.

    torchrun --nproc-per-node 2 docs/ddp_example.py            # CPUs (gloo) or GPUs (nccl)
    torchrun --nproc-per-node 2 docs/ddp_example.py --fsdp     # FSDP2 instead of DDP

Each process trains on its own slice of the batch; with ``process_group`` the kept tokens are
chosen over the whole global batch, exactly as one process would choose them, and each process's
loss is scaled so that the gradients DDP and FSDP average are those of the global loss.
"""
import argparse
import os

import torch
import torch.distributed as dist

import cggr

parser = argparse.ArgumentParser()
parser.add_argument("--fsdp", action="store_true")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

on_gpu = torch.cuda.is_available()
dist.init_process_group("nccl" if on_gpu else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
if on_gpu:
    torch.cuda.set_device(device)

vocab, width, seq, per_rank = 512, 64, 32, 4
torch.manual_seed(0)  # the same initial weights on every process
embedding = torch.nn.Embedding(vocab, width)  # tied: it is also the LM head
model = torch.nn.Sequential(embedding, torch.nn.Linear(width, width), torch.nn.GELU()).to(device)
if args.fsdp:
    from torch.distributed.fsdp import fully_shard
    fully_shard(model)
else:
    model = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
curriculum = cggr.Curriculum(min_tokens_ratio=0.5, warmup_steps=args.steps // 2)
draws = torch.Generator(device=device).manual_seed(1)  # only rank 0's draws are used

for step in range(args.steps):
    data = torch.Generator().manual_seed(step)  # every process builds the global batch, keeps its slice
    tokens = torch.randint(0, vocab, (world * per_rank, seq + 1), generator=data)[rank::world].to(device)
    ratio = curriculum.ratio
    hidden = model(tokens[:, :-1])
    head = embedding.weight  # under FSDP2 a sharded DTensor: cggr gathers it
    loss = cggr.cggr_linear_cross_entropy(hidden, head, tokens[:, 1:], curriculum, process_group=dist.group.WORLD,
                                          generator=draws)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    curriculum.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    if rank == 0 and step % 5 == 0:
        print(f"step {step:3d}  ratio {ratio:.2f}  loss {mean.item() / world:.4f}")
dist.destroy_process_group()
