"""From per-row statistics to the loss: scoring, selection, weighting, reduction.

This is the one pipeline every backend shares; a backend only supplies the row
statistics (forward) and the logits gradient (backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch

from .info import CGGRInfo
from .scoring import RowStats, nll
from .selection import ratio_tensor, select_rows

RatioSpec = Union[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class LossOptions:
    """The validated keyword options that shape the computation (see ``cggr_cross_entropy``)."""

    scoring: str = "gradnorm"
    selection: str = "importance"
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    generator: Optional[torch.Generator] = None
    inplace_backward: bool = False
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None
    process_group: Optional[object] = None  # a torch.distributed group: select over the group's batch


class Reduced(NamedTuple):
    loss: torch.Tensor  # 0-d, or [N] for reduction='none'
    coef: torch.Tensor  # [N]: d loss / d row loss, 0 on unselected rows
    mask: torch.Tensor  # [N] bool: the selected rows
    weight: torch.Tensor  # [N]: the rows' weights, 0 on unselected rows
    n_valid: torch.Tensor  # int64 0-d
    n_selected: torch.Tensor  # int64 0-d
    ratio: Union[float, torch.Tensor]  # the ratio applied
    full_loss: Optional[torch.Tensor] = None  # over the process group's batch; None: this batch's


def build_info(stats: RowStats, reduced: Reduced) -> CGGRInfo:
    """The flat ``[N]`` info of one forward (a few small launches: computed only when asked for)."""
    return CGGRInfo(
        mask=reduced.mask,
        weight=reduced.weight,
        difficulty=stats.score,  # the statistics are already 0 on invalid rows
        confidence=stats.max_prob,
        entropy=stats.entropy,
        nll=nll(stats),
        ratio=ratio_tensor(reduced.ratio, stats.score.device),
        n_selected=reduced.n_selected,
        n_valid=reduced.n_valid,
        full_loss=(stats.loss.sum() / reduced.n_valid.clamp(min=1) if reduced.full_loss is None
                   else reduced.full_loss),
    )


def mean_denominator(opts: LossOptions, n_valid: torch.Tensor, n_selected: torch.Tensor) -> Optional[torch.Tensor]:
    """What ``reduction='mean'`` divides by: the selected count, or n_valid for
    ``importance``; at least 1, so an empty selection gives 0. None for 'sum' and 'none'."""
    if opts.reduction != "mean":
        return None
    return (n_valid if opts.selection == "importance" else n_selected).clamp(min=1)


def reduce_rows(weighted: torch.Tensor, opts: LossOptions, denominator: Optional[torch.Tensor]) -> torch.Tensor:
    """Reduce ``[N]`` weighted per-row losses (0 on unselected rows) as ``opts.reduction`` says;
    ``denominator`` is :func:`mean_denominator`'s."""
    if opts.reduction == "none":
        return weighted
    total = weighted.sum()
    return total if denominator is None else total / denominator  # int64 divisor: the result stays float


def selected_first(mask: torch.Tensor, limit: int) -> torch.Tensor:
    """Row indices, the selected rows first (stable, so in index order), cut to ``limit``: a
    host-side bound on how many are selected, so no sync; rows after the selected ones have
    mask False."""
    return torch.sort(mask.to(torch.int8), descending=True, stable=True).indices[:limit]


def mean_confidence(stats: RowStats, valid: torch.Tensor) -> torch.Tensor:
    """Mean of p1 over valid rows whose statistics are finite (0-d, on device)."""
    counted = valid & ~torch.isnan(stats.max_prob)
    total = torch.where(counted, stats.max_prob, 0.0).sum()
    return total / counted.sum().clamp(min=1)


def select_and_reduce(
    stats: RowStats,
    valid: torch.Tensor,
    ratio: RatioSpec,
    opts: LossOptions,
    seq_shape: Optional[tuple] = None,
    fused_select: Optional[Callable] = None,
) -> Reduced:
    """Select over ``stats.score`` and reduce ``stats.loss``. All inputs and outputs are device
    tensors; no host sync.

    ``ratio`` may be a callable taking the mean confidence (0-d) and returning the ratio:
    that is how the dynamic threshold sees this batch before selecting from it.
    ``fused_select`` (a backend's ``select``) does the selection and reduction in one launch
    where it can, returning None where it cannot; else every op here is a kernel launch.
    """
    if opts.process_group is not None:
        from .distributed import select_and_reduce_over_group  # torch.distributed only when asked for

        return select_and_reduce_over_group(stats, valid, ratio, opts, seq_shape)
    if callable(ratio):
        ratio = ratio(mean_confidence(stats, valid))
    fused = fused_select(stats, valid, ratio, opts, seq_shape) if fused_select is not None else None
    if fused is None:
        fused = _select_and_reduce_rows(stats, valid, ratio, opts, seq_shape)
    mask, weight, coef, loss, n_valid, n_selected = fused
    return Reduced(loss, coef, mask, weight, n_valid, n_selected, ratio)


def select_with_options(scores, valid, ratio, opts: LossOptions, seq_shape, n_valid, generator):
    """:func:`select_rows` with the options' selection settings."""
    return select_rows(scores, valid, ratio, n_valid=n_valid, selection=opts.selection, seq_shape=seq_shape,
                       num_strata=opts.num_strata, min_tokens_per_sequence=opts.min_tokens_per_sequence,
                       generator=generator)


def _select_and_reduce_rows(stats, valid, ratio, opts, seq_shape):
    """(mask, weight, coef, loss, n_valid, n_selected) in PyTorch ops."""
    n_valid = valid.sum()
    mask, weight = select_with_options(stats.score, valid, ratio, opts, seq_shape, n_valid, opts.generator)
    weighted = torch.where(mask, weight * stats.loss, 0.0)  # where: an unselected row may hold a NaN loss
    n_selected = mask.sum()
    denominator = mean_denominator(opts, n_valid, n_selected)
    loss = reduce_rows(weighted, opts, denominator)
    coef = weight if denominator is None else weight / denominator
    return mask, weight, coef, loss, n_valid, n_selected
