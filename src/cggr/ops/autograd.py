"""Autograd glue shared by every backend.

A backend is any object with

* ``row_stats(logits [B, T, V], targets [B*T], valid [B*T], needed: NeededStats) -> RowStats``
* ``logits_grad(logits [B, T, V], targets, lse, coef, mask, label_smoothing, z_loss, out=None)
  -> [B, T, V]`` that is exactly 0 on rows where ``mask`` is False.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..core import LossOptions, RatioSpec, select_and_reduce
from ..info import CGGRInfo
from ..scoring import RowStats, needed_stats

_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(CGGRInfo))


class CGGRCrossEntropyFunction(torch.autograd.Function):
    """loss = CGGR(logits); backward writes the gradient of selected rows only."""

    @staticmethod
    def forward(ctx, logits, targets, backend, ratio: RatioSpec, opts: LossOptions, seq_shape):
        valid = targets != opts.ignore_index
        stats = backend.row_stats(logits, targets, valid, needed_stats(opts.scoring))
        reduced = select_and_reduce(stats, valid, logits.shape[-1], ratio, opts, seq_shape)
        ctx.backend, ctx.opts = backend, opts
        ctx.save_for_backward(logits, targets, stats.lse, reduced.info.mask, reduced.coef)
        info = tuple(getattr(reduced.info, name) for name in _INFO_FIELDS)
        ctx.mark_non_differentiable(*info)
        return (reduced.loss, *info)

    @staticmethod
    def backward(ctx, grad_loss, *unused_info_grads):
        logits, targets, lse, mask, coef = ctx.saved_tensors
        opts = ctx.opts
        coef = coef * grad_loss.to(coef.dtype)  # 0-d upstream broadcasts; 'none' is [N]
        grad = ctx.backend.logits_grad(
            logits, targets, lse, coef, mask, opts.label_smoothing, opts.z_loss,
            out=logits if opts.inplace_backward else None,
        )
        return grad, None, None, None, None, None


def cggr_cross_entropy_apply(logits3d, targets_flat, backend, ratio, opts, seq_shape):
    """Run the Function; returns ``(loss, CGGRInfo)`` with flat per-row info."""
    loss, *info = CGGRCrossEntropyFunction.apply(logits3d, targets_flat, backend, ratio, opts, seq_shape)
    return loss, CGGRInfo(**dict(zip(_INFO_FIELDS, info)))


class CGGRLinearCrossEntropyFunction(torch.autograd.Function):
    """CGGR over ``hidden @ weight.T + bias`` without materialising the whole logits.

    Forward: logits chunk by chunk, statistics of every row, selection over the batch.
    Backward: logits recomputed only for (at most ``max_selected``) rows, selected first,
    so the three backward matmuls cost in proportion to the rows kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, backend, ratio, opts, seq_shape,
                chunk_rows: int, max_selected: int, fp32_grad_accumulation: bool):
        valid = targets != opts.ignore_index
        needed = needed_stats(opts.scoring)
        stats_parts = []
        for rows in _chunks(hidden.shape[0], chunk_rows):
            logits = _project(hidden[rows], weight, bias)
            stats_parts.append(torch.stack(backend.row_stats(logits[None], targets[rows], valid[rows], needed), 1))
        stats = RowStats.from_columns(torch.cat(stats_parts))
        reduced = select_and_reduce(stats, valid, weight.shape[0], ratio, opts, seq_shape)
        ctx.backend, ctx.opts = backend, opts
        ctx.chunk_rows, ctx.max_selected, ctx.fp32 = chunk_rows, max_selected, fp32_grad_accumulation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, targets, stats.lse, reduced.info.mask, reduced.coef)
        info = tuple(getattr(reduced.info, name) for name in _INFO_FIELDS)
        ctx.mark_non_differentiable(*info)
        return (reduced.loss, *info)

    @staticmethod
    def backward(ctx, grad_loss, *unused_info_grads):
        hidden, weight, bias, targets, lse, mask, coef = ctx.saved_tensors
        opts = ctx.opts
        coef = coef * grad_loss.to(coef.dtype)
        # Selected rows first (stable, so in index order); the padding rows after them
        # have mask False and contribute exact zeros.
        order = torch.sort(mask.to(torch.int8), descending=True, stable=True).indices[: ctx.max_selected]
        acc_dtype = torch.float32 if ctx.fp32 else weight.dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if ctx.has_bias else None
        for rows in _chunks(order.numel(), ctx.chunk_rows):
            idx = order[rows]
            h = hidden.index_select(0, idx)
            logits = _project(h, weight, bias)[None]
            grad_logits = ctx.backend.logits_grad(
                logits, targets[idx], lse[idx], coef[idx], mask[idx], opts.label_smoothing, opts.z_loss, out=logits,
            )[0]
            if need_hidden:
                grad_hidden.index_copy_(0, idx, grad_logits @ weight)
            if need_weight:
                grad_weight.addmm_(grad_logits.t().to(acc_dtype), h.to(acc_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=acc_dtype)
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _chunks(n_rows: int, chunk_rows: int):
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight, bias)


def cggr_linear_cross_entropy_apply(hidden2d, weight, bias, targets_flat, backend, ratio, opts, seq_shape,
                                    chunk_rows, max_selected, fp32_grad_accumulation):
    loss, *info = CGGRLinearCrossEntropyFunction.apply(
        hidden2d, weight, bias, targets_flat, backend, ratio, opts, seq_shape,
        chunk_rows, max_selected, fp32_grad_accumulation,
    )
    return loss, CGGRInfo(**dict(zip(_INFO_FIELDS, info)))
