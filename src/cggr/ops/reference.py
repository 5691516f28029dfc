"""Pure-PyTorch backend: the executable form of the per-row statistics and of the gradient
(docs/semantics.md).

Runs on any device. Rows are processed in chunks so that no float32 copy of the
whole ``[N, V]`` logits is alive at once.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..scoring import RowStats, transform_logits, transform_slope, with_score_and_loss

_CHUNK_ELEMENTS = 1 << 24
_N_BASE = 7  # the RowStats fields every scoring shares; score and loss follow


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(n_rows: int, vocab_size: int):
    step = max(1, _CHUNK_ELEMENTS // vocab_size)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _safe_targets(targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, targets, torch.zeros_like(targets)).long()


def _chunk_stats(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x`` [C, V] in the compute dtype -> ``[C, 7]``: the first seven RowStats fields."""
    lse = torch.logsumexp(x, dim=1)
    log_p = x - lse[:, None]
    p = torch.exp(log_p)
    # -inf logits have p == 0 and contribute nothing (0 * -inf would be NaN).
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)
    top2 = torch.topk(x, 2, dim=1).values
    sq_other = p.square().scatter(1, target[:, None], 0.0).sum(dim=1)
    columns = torch.stack(
        [
            lse,
            x.gather(1, target[:, None]).squeeze(1),
            entropy,
            torch.exp(top2[:, 0] - lse),
            torch.exp(top2[:, 1] - lse),
            sq_other,
            x.sum(dim=1),
        ],
        dim=1,
    )
    non_finite = (torch.isnan(x) | (x == float("inf"))).any(dim=1)
    return torch.where(non_finite[:, None], torch.full_like(columns, float("nan")), columns)


def row_stats(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, opts,
              reference_loss: Optional[torch.Tensor] = None, need_entropy: bool = True) -> RowStats:
    """Statistics of every row. logits ``[B, T, V]`` or ``[N, V]``, any float dtype; targets,
    valid (and ``reference_loss`` for the ``excess`` scoring) ``[B*T]`` contiguous; ``opts`` a
    LossOptions (logit scale and softcap, scoring, label smoothing and z-loss). Returns float32
    (float64 for float64 logits), 0 on invalid rows; computes every field (``need_entropy``
    False lets a backend leave the entropy 0 where the scoring does not read it)."""
    vocab_size = logits.shape[-1]
    logits = logits.reshape(-1, vocab_size)
    n_rows = logits.shape[0]
    dtype = compute_dtype(logits.dtype)
    safe = _safe_targets(targets, valid)
    columns = torch.zeros(n_rows, len(RowStats._fields), dtype=dtype, device=logits.device)
    for rows in _row_chunks(n_rows, vocab_size):
        x = transform_logits(logits[rows].to(dtype), opts.logit_scale, opts.logit_softcap)
        columns[rows, :_N_BASE] = _chunk_stats(x, safe[rows])
    columns = torch.where(valid[:, None], columns, torch.zeros_like(columns))
    return with_score_and_loss(RowStats.from_columns(columns), valid, opts.scoring, opts.label_smoothing,
                               opts.z_loss, vocab_size, reference_loss)


def logits_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    mask: torch.Tensor,
    opts,
    grad_scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """d loss / d logits, exactly 0 on rows where ``mask`` is False; ``opts`` a LossOptions
    (label smoothing, z-loss, logit scale and softcap).

    logits ``[B, T, V']`` or ``[N, V']``: V' consecutive columns of rows of ``vocab_size``
    columns (None: V'), with ``targets`` counted from the first of them (a target outside adds
    no one-hot term); ``coef`` [B*T] holds reduction scale x row weight, and ``grad_scale`` (0-d
    or [B*T], None for 1) the upstream gradient. ``out`` (may be ``logits`` itself, for the
    in-place backward) receives the result.
    """
    shape, n_cols = logits.shape, logits.shape[-1]
    vocab_size = vocab_size or n_cols
    logits = logits.reshape(-1, n_cols)
    n_rows = logits.shape[0]
    dtype = compute_dtype(logits.dtype)
    # A target outside the stored columns adds no one-hot term: it goes to column 0 with weight 0.
    in_cols = mask & (targets >= 0) & (targets < n_cols)
    safe = _safe_targets(targets, in_cols)
    if grad_scale is not None:
        coef = coef * grad_scale.to(coef.dtype)
    label_smoothing, z_loss = opts.label_smoothing, opts.z_loss
    transformed = opts.logit_scale != 1.0 or opts.logit_softcap is not None
    # Write straight into ``out`` when its rows can be viewed flat; else copy at the end.
    flat_out = out is not None and out.is_contiguous()
    result = out.view(-1, n_cols) if flat_out else torch.empty_like(logits)
    for rows in _row_chunks(n_rows, n_cols):
        x = transform_logits(logits[rows].to(dtype), opts.logit_scale, opts.logit_softcap)
        lse_c = lse[rows].to(dtype)[:, None]
        p = torch.exp(x - lse_c)
        grad = p * (1.0 + 2.0 * z_loss * lse_c) - label_smoothing / vocab_size
        grad.scatter_add_(1, safe[rows, None], (label_smoothing - 1.0) * in_cols[rows, None].to(dtype))
        grad = grad * coef[rows].to(dtype)[:, None]
        if transformed:
            grad = grad * transform_slope(x, opts.logit_scale, opts.logit_softcap)
        result[rows] = torch.where(mask[rows, None], grad, torch.zeros_like(grad)).to(result.dtype)
    if out is not None and not flat_out:
        return out.copy_(result.view(shape))
    return result.view(shape)


def scaled(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``tensor * scale``, a new tensor of ``tensor``'s dtype; ``scale`` a 0-d tensor (the upstream
    gradient). Computed in at least float32 and rounded once, as the Triton backend does (a
    bf16 tensor times a float32 0-d tensor could round the scale to bf16 first)."""
    wide = torch.promote_types(tensor.dtype, torch.float32)
    return (tensor.to(wide) * scale.to(wide)).to(tensor.dtype)


def mul_(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``tensor *= scale`` in place, as :func:`scaled` computes it."""
    return tensor.copy_(scaled(tensor, scale))


def scaler(tensor: torch.Tensor):
    """``lambda scale: mul_(tensor, scale)`` (a backend may do part of the work now)."""
    return lambda scale: mul_(tensor, scale)


def scaled_each(scale_one, tensors, scale: torch.Tensor) -> tuple:
    """``scale_one(t, scale)`` of each of ``tensors``, None for None."""
    return tuple(None if t is None else scale_one(t, scale) for t in tensors)


def scaled_later(*tensors: Optional[torch.Tensor]):
    """``lambda scale: tuple(scaled(t, scale) for t in tensors)``, None staying None (a backend
    may do part of the work now)."""
    return lambda scale: scaled_each(scaled, tensors, scale)


def add_mul_(out: torch.Tensor, src: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``out += scale * src`` in place; ``scale`` a 0-d tensor; in at least float32, rounded once."""
    wide = torch.promote_types(out.dtype, torch.float32)
    return out.copy_(out.to(wide) + src.to(wide) * scale.to(wide))
