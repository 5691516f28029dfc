"""Selection over the batch of a whole ``torch.distributed`` process group (``process_group=``).

Each process contributes its rows' scores (a few numbers per row, never the logits) to one
all-gather; every process then runs the same selection over the concatenated batch (random
draws are the first process's, broadcast) and keeps its own slice. The budget, the
``importance`` constant and sampling offsets, the strata, the dynamic threshold's mean
confidence and the ``mean`` normaliser are therefore those of the global batch.

The loss each process returns is its share of the global loss times the group size, so that
the gradients data-parallel training averages (DDP, FSDP) are those of the global loss, and the
mean of the processes' losses is the global loss. Every process must hold the same number of rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .core import Reduced, mean_confidence, mean_denominator, reduce_rows, select_with_options
from .scoring import RowStats
from .selection import SharedDraws


def _gather_rows(columns: torch.Tensor, group) -> torch.Tensor:
    """All processes' ``[N, C]`` in group order: ``[world * N, C]``."""
    world = dist.get_world_size(group)
    sizes = torch.tensor([columns.shape[0], -columns.shape[0]], device=columns.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    torch._assert_async(sizes[0] == -sizes[1], "process_group: every process must hold the same number of rows")
    parts = [torch.empty_like(columns) for _ in range(world)]
    dist.all_gather(parts, columns.contiguous(), group=group)
    return torch.cat(parts)


def _broadcaster(group):
    source = 0 if group is None else dist.get_global_rank(group, 0)

    def share(tensor: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tensor, src=source, group=group)
        return tensor
    return share


def select_and_reduce_over_group(stats: RowStats, valid: torch.Tensor, ratio, opts, seq_shape) -> Reduced:
    """:func:`cggr.core.select_and_reduce` over the process group's concatenated batch."""
    group = opts.process_group
    group = None if group is dist.group.WORLD else group
    world, rank, n = dist.get_world_size(group), dist.get_rank(group), valid.numel()
    dtype = stats.score.dtype
    local = torch.stack([stats.score.double(), valid.double(), stats.max_prob.double(), stats.loss.double()], 1)
    every = _gather_rows(local, group)
    score, valid_all = every[:, 0].to(dtype), every[:, 1] != 0
    if callable(ratio):
        ratio = ratio(mean_confidence(stats._replace(max_prob=every[:, 2]), valid_all))
    n_valid = valid_all.sum()
    global_shape = None if seq_shape is None else (seq_shape[0] * world, seq_shape[1])
    mask_all, weight_all = select_with_options(score, valid_all, ratio, opts, global_shape, n_valid,
                                               SharedDraws(opts.generator, _broadcaster(group)))
    mine = slice(rank * n, (rank + 1) * n)
    mask, weight = mask_all[mine], weight_all[mine].to(dtype)
    n_selected = mask_all.sum()
    denominator = mean_denominator(opts, n_valid, n_selected)
    scale = 1.0 if opts.reduction == "none" else float(world)
    weighted = torch.where(mask, weight * stats.loss, 0.0)
    loss = reduce_rows(weighted, opts, denominator) * scale
    coef = (weight if denominator is None else weight / denominator) * scale
    full_loss = (torch.where(valid_all, every[:, 3], 0.0).sum() / n_valid.clamp(min=1)).to(dtype)
    return Reduced(loss, coef, mask, weight, n_valid, n_selected, ratio, full_loss)
