"""Triton backend: launches the kernels of :mod:`triton_kernels` as ``torch.library``
custom ops, so ``torch.compile`` sees them as opaque nodes (no graph break).

Imported lazily (on first use of a CUDA tensor or ``backend='triton'``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import struct
from typing import Optional

import torch
import triton

from ..scoring import SCORINGS, RowStats, scoring_reads
from ..selection import random_keys
from . import reference, triton_interpreting
from .launch import launch, prepared
from .reference import compute_dtype
from .triton_kernels import (
    count_bad_targets_kernel,
    forced_rows_kernel,
    logits_grad_kernel,
    row_stats_kernel,
    scale_kernel,
    select_importance_kernel,
    select_stratified_kernel,
    select_topk_kernel,
)

_N_STATS = len(RowStats._fields)
_SCORE_COL, _LOSS_COL = RowStats._fields.index("score"), RowStats._fields.index("loss")


# (block, num_warps) chosen with bench/probes/tune_kernels.py (which overwrites entries to sweep them).
# The statistics kernel is short of instructions: two warps a row suit most scorings (H200,
# 8192 x 128,256: combined 0.578 -> 0.531 ms against one warp and 512 lanes); gradnorm's extra
# accumulator ("stats_sum_sq") keeps 512 lanes and one warp, which need no register cap (below)
# to run well: 1024 lanes and two warps equal them only with it. With few rows ("stats_few", fewer than
# _FEW_ROWS_PER_SM per SM, as in the linear path's chunks) one warp a row leaves the SMs short of
# loads in flight. The block is BLOCK_V for the row kernels and the rows per step of the
# one-program selection.
CONFIGS = {"stats": (1024, 2), "stats_sum_sq": (512, 1), "stats_few": (2048, 4), "grad": (16384, 16),
           "select": (8192, 16)}
_FEW_ROWS_PER_SM = 12
# gradnorm's statistics compile to 80-120 registers a thread where the other scorings take 56-64
# (ptxas keeps the exponentials live for three sums), which halves the rows in flight per SM.
# Capped at 64 they need no spills for 16-bit rows read aligned without a softcap (SASS for
# sm_90: same loop, no local memory); elsewhere the cap would spill, so it is not applied.
_SUM_SQ_MAX_REGISTERS = 64

# Fixed when the kernels were decorated: TRITON_INTERPRET is read at import.
_INTERPRETING = triton_interpreting()


def launch_config(length: int, kind: str, block_name: str = "BLOCK_V") -> dict:
    """Launch parameters of a kernel kind of :data:`CONFIGS` over ``length`` elements (the
    vocabulary, or the rows for ``'select'``). The interpreter costs per loop iteration, so it
    gets one large block."""
    whole = 1 << max(length - 1, 0).bit_length()  # the next power of 2 (triton's is a slower jit function)
    if _INTERPRETING:
        return {block_name: min(whole, 1 << 16)}
    block, warps = CONFIGS[kind]
    return {block_name: min(whole, block), "num_warps": warps}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _few_rows(logits: torch.Tensor, n_rows: int) -> bool:
    """Whether the statistics kernel has too few rows to fill the GPU with one warp a row."""
    index = logits.get_device()
    return index >= 0 and n_rows < _FEW_ROWS_PER_SM * _sm_count(index)


def _acc_dtype(dtype: torch.dtype):
    return triton.language.float64 if dtype == torch.float64 else triton.language.float32


_SAME_DEVICE = contextlib.nullcontext()  # reusable


def _device_guard(tensor: torch.Tensor):
    """Triton launches on the current device: make it the tensor's."""
    index = tensor.get_device()  # -1 on the CPU
    if index < 0 or index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(index)


@functools.lru_cache(maxsize=256)
def _hi_lo(value: float):
    """``value`` as two float32 kernel arguments whose sum holds it to ~48 bits (a Python float
    argument reaches a Triton kernel as float32, too coarse for float64 rows)."""
    try:
        hi = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32: the kernel sees inf either way
        return value, 0.0
    return hi, (value - hi if math.isfinite(hi) else 0.0)


@functools.lru_cache(maxsize=256)
def _float_args(label_smoothing: float, z_loss: float, logit_scale: float, logit_softcap: float):
    """(TRANSFORM code, the eight float arguments of the row kernels): label smoothing, z-loss,
    logit scale and softcap (0 = no cap) as (hi, lo) pairs."""
    transform = 2 if logit_softcap else (1 if logit_scale != 1.0 else 0)
    return transform, (*_hi_lo(label_smoothing), *_hi_lo(z_loss), *_hi_lo(logit_scale), *_hi_lo(logit_softcap or 1.0))


@functools.lru_cache(maxsize=256)
def _stats_constants(config_of, vocab_size: int, few_rows: bool, dtype: torch.dtype, scoring: str,
                     need_entropy: bool, align: int, vector_reads: bool, transform: int) -> dict:
    """The statistics kernel's constexprs and launch options, once per setting (host time
    counts). ``config_of`` is :func:`launch_config` (part of the key, so that tests can swap it)."""
    need_second, need_sum_sq, scoring_entropy = scoring_reads(scoring)
    config = config_of(vocab_size, "stats_few" if few_rows else ("stats_sum_sq" if need_sum_sq else "stats"))
    fold = _fold_width(dtype.itemsize, config, vector_reads)
    if (need_sum_sq and _SUM_SQ_MAX_REGISTERS and align == 1 and fold > 1 and transform < 2
            and dtype.itemsize == 2 and not _INTERPRETING):  # rows aligned as they are, no softcap
        config["maxnreg"] = _SUM_SQ_MAX_REGISTERS
    return dict(ACC_DTYPE=_acc_dtype(dtype), SCORING=SCORINGS.index(scoring), NEED_SECOND=need_second,
                NEED_SUM_SQ=need_sum_sq, STATS_WIDTH=_N_STATS, FOLD=fold, ALIGN=align, TRANSFORM=transform,
                NEED_ENTROPY=need_entropy or scoring_entropy, **config)


def _row_stats(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, reference_loss: Optional[torch.Tensor],
               scoring: str, label_smoothing: float, z_loss: float, logit_scale: float,
               logit_softcap: float, need_entropy: bool = True, ignore_index: Optional[int] = None) -> torch.Tensor:
    """The ``[N, 9]`` statistics; with ``ignore_index`` the kernel also writes ``valid`` (targets
    other than it) instead of reading it."""
    vocab_size = logits.shape[-1]
    n_rows = logits.numel() // vocab_size
    stats = torch.empty(n_rows, _N_STATS, dtype=compute_dtype(logits.dtype), device=logits.device)
    if n_rows == 0:
        return stats
    if _rows_aligned(logits):  # the common case, decided first: host time counts
        align, rows, offset, vector_reads = 1, logits, 0, True
    else:
        logits = _rows3d(logits)
        # The layout reads only whether a block holds a 16-byte vector: the same for every kind.
        align, (rows,), offset = _row_layout(launch_config(vocab_size, "stats"), logits)
        vector_reads = align > 1
    transform, float_args = _float_args(label_smoothing, z_loss, logit_scale, logit_softcap)
    constants = _stats_constants(launch_config, vocab_size, _few_rows(logits, n_rows), logits.dtype, scoring,
                                 need_entropy, align, vector_reads, transform)
    with _device_guard(logits):
        launch(row_stats_kernel, n_rows,
               rows, targets, valid, valid if reference_loss is None else reference_loss, stats, ignore_index or 0,
               *_row_strides(logits), offset, vocab_size, *float_args, VALID_FROM_TARGETS=ignore_index is not None,
               **constants)
    return stats


def _rows3d(rows: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` as ``[1, N, V]``; ``[B, T, V]`` as it is."""
    return rows if rows.dim() == 3 else rows.unsqueeze(0)


def _row_strides(rows: torch.Tensor):
    """``(T, B stride, T stride)`` of rows ``[B, T, V]``, or of ``[N, V]`` as ``[1, N, V]``: the
    kernels' row addressing (row r at ``(r // T) * B stride + (r % T) * T stride``)."""
    if rows.dim() == 2:
        return rows.shape[0], 0, rows.stride(0)
    return rows.shape[1], rows.stride(0), rows.stride(1)


def _rows_aligned(rows: torch.Tensor) -> bool:
    """Whether Triton can prove every row of ``rows`` ([B, T, V] or [N, V]) 16-byte aligned:
    pointer and row strides multiples of 16 (the divisibility it specialises integers on)."""
    return rows.data_ptr() % 16 == 0 and rows.stride(0) % 16 == 0 and (rows.dim() == 2 or rows.stride(1) % 16 == 0)


def _boundary_offset(rows: torch.Tensor) -> int:
    """How many elements after a 16-byte boundary ``rows`` starts, where the view from that
    boundary lies inside its storage (``logits[:, k:]`` with V odd: the storage is aligned);
    else 0."""
    size = rows.element_size()
    offset = rows.data_ptr() % 16 // size
    return offset if rows.data_ptr() % size == 0 and rows.storage_offset() >= offset else 0


def _row_layout(config: dict, *rows: torch.Tensor):
    """``(ALIGN, tensors, offset)`` for rows read (and written) through ``rows`` [B, T, V]: the
    tensors to pass, the offset of their rows from the pointers passed, and the kernels' ALIGN.

    Triton specialises a pointer on 16-byte alignment, so a view starting ``offset`` elements
    after a 16-byte boundary (see :func:`_boundary_offset`) is passed from that boundary and
    the kernels add ``offset`` to every row. ALIGN is the elements per 16 bytes when every row
    can then be read shifted to a 16-byte boundary, by one shift for all ``rows`` (same strides
    and offset), but not every row is aligned as it is; else 1, and ``rows`` are passed as they
    are (aligned, or read element by element)."""
    if all(_rows_aligned(r) for r in rows):  # the common case, decided first: host time counts
        return 1, rows, 0
    first = rows[0]
    align = 16 // first.element_size()
    offset = _boundary_offset(first)
    shared = all(r.stride(1) == first.stride(1) and (r.stride(0) == first.stride(0) or r.shape[0] == 1)
                 and _boundary_offset(r) == offset for r in rows)
    if not shared or config["BLOCK_V"] < align:
        return 1, rows, 0
    if offset == 0:
        return (align if all(r.data_ptr() % 16 == 0 for r in rows) else 1), rows, 0
    return align, tuple(r.as_strided(r.shape, r.stride(), r.storage_offset() - offset) for r in rows), offset


def _fold_width(element_size: int, config: dict, vector_reads: bool) -> int:
    """How many adjacent lanes the statistics kernel sums into one accumulator: the elements
    of one 16-byte load. Triton vectorises the loads only when it can prove them 16-byte
    aligned (``vector_reads``: rows aligned, or shifted to alignment); otherwise each thread's
    elements are strided and folding would cost shuffles, so 1."""
    if not vector_reads:
        return 1
    # The interpreter has no threads: any fold works.
    per_thread = config["BLOCK_V"] if _INTERPRETING else config["BLOCK_V"] // (32 * config["num_warps"])
    return max(1, min(16 // element_size, per_thread))


@torch.library.custom_op("cggr::row_stats", mutates_args=())
def row_stats_op(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                 reference_loss: Optional[torch.Tensor], scoring: str, label_smoothing: float, z_loss: float,
                 logit_scale: float, logit_softcap: float, need_entropy: bool = True) -> torch.Tensor:
    """logits ``[B, T, V]`` or ``[N, V]`` (unit stride along V) -> ``[B*T, 9]`` statistics
    (RowStats order); the optional fields ``scoring`` does not read are 0 (the entropy too unless
    ``need_entropy``). ``logit_softcap`` 0 means none."""
    return _row_stats(logits, targets, valid, reference_loss, scoring, label_smoothing, z_loss, logit_scale,
                      logit_softcap, need_entropy)


@row_stats_op.register_fake
def _(logits, targets, valid, reference_loss, scoring, label_smoothing, z_loss, logit_scale, logit_softcap,
      need_entropy=True):
    return logits.new_empty((logits.numel() // logits.shape[-1], _N_STATS), dtype=compute_dtype(logits.dtype))


def _launch_grad(logits, grad, targets, lse, coef, mask, label_smoothing, z_loss, logit_scale, logit_softcap,
                 grad_scale, vocab_size):
    n_cols = logits.shape[-1]
    n_rows = logits.numel() // n_cols
    if n_rows == 0:
        return
    scale = coef if grad_scale is None else grad_scale  # coef is only a stand-in, never read (SCALE_MODE 0)
    if _rows_aligned(logits) and _rows_aligned(grad):  # the common case, decided first: host time counts
        align, rows, grad_rows, offset = 1, logits, grad, 0
    else:
        logits, grad = _rows3d(logits), _rows3d(grad)
        align, (rows, grad_rows), offset = _row_layout(launch_config(n_cols, "grad"), logits, grad)
    transform, float_args = _float_args(label_smoothing, z_loss, logit_scale, logit_softcap)
    scale_mode = 0 if grad_scale is None else (1 if grad_scale.dim() == 0 else 2)
    constants = _grad_constants(launch_config, n_cols, logits.dtype, scale_mode, align, transform)
    with _device_guard(logits):
        launch(logits_grad_kernel, n_rows,
               rows, grad_rows, targets, lse, coef, mask, scale, *_row_strides(logits), *_row_strides(grad)[1:], offset,
               lse.stride(0), n_cols, vocab_size or n_cols, *float_args, **constants)


@functools.lru_cache(maxsize=256)
def _grad_constants(config_of, n_cols: int, dtype: torch.dtype, scale_mode: int, align: int, transform: int) -> dict:
    """The gradient kernel's constexprs and launch options (see :func:`_stats_constants`).
    SCALE_MODE 0: no upstream gradient (1), 1: one value, 2: one per row."""
    return dict(ACC_DTYPE=_acc_dtype(dtype), SCALE_MODE=scale_mode, ALIGN=align, TRANSFORM=transform,
                **config_of(n_cols, "grad"))


def _grad_buffer(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """An empty gradient for ``logits`` [B, T, V] (or [N, V]): with the logits' strides where its
    rows do not overlap (in either order of B and T) and its span exceeds B*T*V by at most 1/16
    (a view of a shifted sequence, padded rows, time-major rows), so that rows read shifted to
    16-byte boundaries are written shifted alike, its rows then starting ``offset`` elements into
    its storage (that of a view of the logits, see :func:`_boundary_offset`); else contiguous."""
    if offset == 0 and logits.is_contiguous():  # the common case, decided first: host time counts
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.dim() == 2:
        return _grad_buffer(logits.unsqueeze(0), offset)[0]
    (b, t, v), (stride_b, stride_t, _) = logits.shape, logits.stride()  # unit stride along V
    (n_inner, s_inner), (n_outer, s_outer) = sorted(((b, stride_b), (t, stride_t)), key=lambda dim: dim[1])
    apart = (n_inner == 1 or s_inner >= v) and (n_outer == 1 or s_outer >= (n_inner - 1) * s_inner + v)
    span = (b - 1) * stride_b + (t - 1) * stride_t + v
    if logits.numel() == 0 or not apart or span * 16 > b * t * v * 17:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if offset == 0:
        return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)
    storage = torch.empty(offset + span, dtype=logits.dtype, device=logits.device)
    return storage.as_strided(logits.shape, logits.stride(), offset)


def _new_logits_grad(logits, targets, lse, coef, mask, label_smoothing, z_loss, logit_scale, logit_softcap,
                     grad_scale=None, vocab_size=None, offset=0):
    grad = _grad_buffer(logits, offset)
    _launch_grad(logits, grad, targets, lse, coef, mask, label_smoothing, z_loss, logit_scale, logit_softcap,
                 grad_scale, vocab_size)
    return grad


@torch.library.custom_op("cggr::logits_grad", mutates_args=())
def logits_grad_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                   mask: torch.Tensor, label_smoothing: float, z_loss: float, logit_scale: float,
                   logit_softcap: float, grad_scale: Optional[torch.Tensor] = None,
                   vocab_size: Optional[int] = None) -> torch.Tensor:
    return _new_logits_grad(logits, targets, lse, coef, mask, label_smoothing, z_loss, logit_scale, logit_softcap,
                            grad_scale, vocab_size)


@logits_grad_op.register_fake
def _(logits, targets, lse, coef, mask, label_smoothing, z_loss, logit_scale, logit_softcap, grad_scale=None,
      vocab_size=None):
    return _grad_buffer(logits)


@torch.library.custom_op("cggr::logits_grad_", mutates_args=("logits",))
def logits_grad_inplace_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                           mask: torch.Tensor, label_smoothing: float, z_loss: float, logit_scale: float,
                           logit_softcap: float, grad_scale: Optional[torch.Tensor] = None,
                           vocab_size: Optional[int] = None) -> None:
    """Like ``logits_grad`` but overwrites ``logits`` (each row is read before it is written)."""
    _launch_grad(logits, logits, targets, lse, coef, mask, label_smoothing, z_loss, logit_scale, logit_softcap,
                 grad_scale, vocab_size)


# Eager calls skip the custom-op dispatcher (it costs more than the small kernels around
# it); under torch.compile the ops are what gets traced, so there is no graph break.
def row_stats(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, opts,
              reference_loss: Optional[torch.Tensor] = None, need_entropy: bool = True) -> RowStats:
    """See :func:`cggr.ops.reference.row_stats`."""
    compute = row_stats_op if torch.compiler.is_compiling() else _row_stats
    return RowStats.from_columns(compute(logits, targets, valid, reference_loss, opts.scoring, opts.label_smoothing,
                                         opts.z_loss, opts.logit_scale, opts.logit_softcap or 0.0, need_entropy))


def row_stats_and_valid(logits: torch.Tensor, targets: torch.Tensor, opts,
                        reference_loss: Optional[torch.Tensor] = None, need_entropy: bool = True):
    """``(row_stats(...), valid)`` with ``valid = targets != opts.ignore_index`` [N] written by the
    statistics kernel: one launch fewer than forming it first. None where it does not apply
    (under torch.compile, which fuses the comparison itself; an ``ignore_index`` beyond int64)."""
    if torch.compiler.is_compiling() or not _INT64[0] <= opts.ignore_index < _INT64[1]:
        return None
    valid = torch.empty(targets.shape, dtype=torch.bool, device=targets.device)
    stats = _row_stats(logits, targets, valid, reference_loss, opts.scoring, opts.label_smoothing, opts.z_loss,
                       opts.logit_scale, opts.logit_softcap or 0.0, need_entropy, ignore_index=opts.ignore_index)
    return RowStats.from_columns(stats), valid


def logits_grad(logits, targets, lse, coef, mask, opts, grad_scale=None, out=None, vocab_size=None):
    """See :func:`cggr.ops.reference.logits_grad`."""
    if coef.dtype != lse.dtype or not coef.is_contiguous():  # lse may be strided (a column of the statistics)
        coef = coef.to(lse.dtype).contiguous()
    if grad_scale is not None:
        grad_scale = grad_scale.contiguous()
    args = (opts.label_smoothing, opts.z_loss, opts.logit_scale, opts.logit_softcap or 0.0, grad_scale, vocab_size)
    compiling = torch.compiler.is_compiling()
    if out is None:
        if compiling:  # the op's gradient starts its storage, as its fake says
            return logits_grad_op(logits, targets, lse, coef, mask, *args)
        return _new_logits_grad(logits, targets, lse, coef, mask, *args, _boundary_offset(logits))
    if out is not logits:  # an identity test, which torch.compile can trace (data_ptr() it cannot)
        raise ValueError("the Triton backend writes gradients in place only into the logits themselves")
    if compiling:
        logits_grad_inplace_op(logits, targets, lse, coef, mask, *args)
    else:
        _launch_grad(logits, logits, targets, lse, coef, mask, *args)
    return logits


_SCALE_BLOCK = 4096
_SCALE_PROGRAMS_PER_SM = 8


def _scalable(out: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether the scaling kernel applies: same-shaped contiguous tensors, not float64, eager."""
    return not (torch.compiler.is_compiling() or out.dtype == torch.float64 or out.shape != src.shape
                or not (out.is_contiguous() and src.is_contiguous()))


def _launch_scale(out: torch.Tensor, src: torch.Tensor, scale: torch.Tensor, accumulate: bool) -> bool:
    """The scaling kernel where it applies (see :func:`_scalable`; a one-element scale); False
    otherwise."""
    if not _scalable(out, src) or scale.numel() != 1:
        return False
    if out.numel():
        _launch_scale_pairs([(out, src)], scale, accumulate)
    return True


def _launch_scale_pairs(pairs, scale: torch.Tensor, accumulate: bool) -> None:
    """One launch of the scaling kernel over the (out, src) ``pairs`` (1 to 3, non-empty)."""
    grid, triples, constants = _scale_call(pairs, accumulate)
    with _device_guard(pairs[0][0]):
        launch(scale_kernel, grid, scale, *triples, **constants)


def _scale_call(pairs, accumulate: bool):
    """(grid, the three (out, src, n) argument triples, None for the missing ones, constants) of
    the scaling kernel over the (out, src) ``pairs``."""
    grid = _scale_programs(max(out.numel() for out, _ in pairs), pairs[0][0])
    triples = tuple(x for out, src in pairs for x in (out, src, out.numel())) + (None, None, 0) * (3 - len(pairs))
    return grid, triples, _scale_constants(accumulate, all(out is src for out, src in pairs), len(pairs))


@functools.lru_cache(maxsize=16)
def _scale_constants(accumulate: bool, in_place: bool, count: int) -> dict:
    return dict(BLOCK=_SCALE_BLOCK, ACCUMULATE=accumulate, IN_PLACE=in_place, COUNT=count, num_warps=4)


def _scale_programs(n_elements: int, out: torch.Tensor) -> int:
    """Programs of the scaling kernel over ``n_elements`` (the largest tensor's): a few per SM
    on CUDA (enough to stream the blocks, few to start when the scale is 1 and they return at
    once); one a block in the interpreter."""
    n_blocks = -(-n_elements // _SCALE_BLOCK)
    if not out.is_cuda:
        return n_blocks
    return min(n_blocks, _SCALE_PROGRAMS_PER_SM * _sm_count(out.device.index))


def mul_(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """See :func:`cggr.ops.reference.mul_`."""
    return tensor if _launch_scale(tensor, tensor, scale, False) else reference.mul_(tensor, scale)


def scaler(tensor: torch.Tensor):
    """``lambda scale: mul_(tensor, scale)``, with the launch's host work that does not depend on
    ``scale`` done now: for a backward, which runs on autograd's device thread, where each line
    of Python costs several times what it costs the caller's."""
    if not _scalable(tensor, tensor) or tensor.numel() == 0:
        return functools.partial(mul_, tensor)
    run = _prepared_scale([(tensor, tensor)])

    def scale_by(scale: torch.Tensor) -> torch.Tensor:
        if scale.numel() != 1:
            return mul_(tensor, scale)
        run(scale)
        return tensor
    return scale_by


def scaled_later(*tensors: Optional[torch.Tensor]):
    """``lambda scale: tuple(scaled(t, scale) for t in tensors)`` (None stays None) in one launch,
    the first call's outputs allocated and its launch prepared now (see :func:`scaler`); a later
    call (a second backward) forms new tensors."""
    present = [t for t in tensors if t is not None]
    if not present or any(not _scalable(t, t) or t.numel() == 0 for t in present):
        return functools.partial(reference.scaled_each, scaled, tensors)

    def outputs():
        return tuple(None if t is None else torch.empty_like(t) for t in tensors)

    def pairs(outs):
        return [(out, src) for out, src in zip(outs, tensors) if src is not None]
    first = [outputs()]
    run = _prepared_scale(pairs(first[0]))

    def scale_by(scale: torch.Tensor) -> tuple:
        if scale.numel() != 1:
            return reference.scaled_each(scaled, tensors, scale)
        if first:
            run(scale)
            return first.pop()
        outs = outputs()
        _launch_scale_pairs(pairs(outs), scale, False)
        return outs
    return scale_by


def _prepared_scale(pairs):
    """The scaling kernel's launch ``out = scale * src`` for each (out, src) of ``pairs`` (1 to
    3), prepared but for ``scale`` (a float32 upstream gradient: the loss's dtype wherever the
    kernel applies)."""
    grid, triples, constants = _scale_call(pairs, False)
    with _device_guard(pairs[0][0]):
        return prepared(scale_kernel, grid, (None, *triples), 0, torch.float32, **constants)


def scaled(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """See :func:`cggr.ops.reference.scaled`: one launch where the reference casts and multiplies."""
    out = torch.empty_like(tensor)
    return out if _launch_scale(out, tensor, scale, False) else reference.scaled(tensor, scale)


def add_mul_(out: torch.Tensor, src: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """See :func:`cggr.ops.reference.add_mul_`."""
    return out if _launch_scale(out, src, scale, True) else reference.add_mul_(out, src, scale)


_CHECK_BLOCK = 4096
_CHECK_PROGRAMS = 32
_INT64 = (-(1 << 63), 1 << 63)


def count_bad_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> Optional[int]:
    """How many of the contiguous ``targets`` are neither in [0, vocab_size) nor ``ignore_index``:
    one launch and one read back (the target check's host sync), where PyTorch's comparisons
    take six launches. None where it does not apply (an ``ignore_index`` beyond int64)."""
    if not _INT64[0] <= ignore_index < _INT64[1]:
        return None
    n = targets.numel()
    if n == 0:
        return 0
    programs = min(-(-n // _CHECK_BLOCK), _CHECK_PROGRAMS)
    counts = torch.empty(programs, dtype=torch.int32, device=targets.device)
    with _device_guard(targets):
        launch(count_bad_targets_kernel, programs, targets, counts, n, vocab_size, ignore_index, BLOCK=_CHECK_BLOCK,
               num_warps=4)
    return sum(counts.tolist())


_REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}
_IMPORTANCE_ITERATIONS = 40  # halvings of log c over 101 octaves: c within 2e-10 relative, then solved
_MAX_FUSED_STRATA = 64  # more strata than this (or more rows than one block) take the PyTorch path


@functools.lru_cache(maxsize=256)
def _float_bits(value: float) -> int:
    """A Python float as the int64 of its bits: it travels so, and the budget is computed from it exactly."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def select(stats: RowStats, valid: torch.Tensor, ratio, opts, seq_shape=None):
    """``topk``, ``random``, ``importance``, ``stratified`` and ``sequence_aware`` selection and
    reduction of float32 statistics in one selection launch: (mask, weight, coef, loss, n_valid,
    n_selected) as :func:`cggr.core.select_and_reduce` computes them. None where it does not
    apply (float64 statistics, statistics not in one ``[N, 9]`` block, or under torch.compile,
    which fuses the PyTorch ops itself)."""
    if opts.selection == "sequence_aware" and seq_shape is None:
        return None
    base = stats.block  # the kernels read the [N, 9] statistics as one contiguous block
    if base is None or base.dtype != torch.float32 or torch.compiler.is_compiling() or not base.is_contiguous():
        return None
    n_rows = base.shape[0]
    if n_rows == 0:
        return None
    from_ptr = isinstance(ratio, torch.Tensor)
    constants = _select_constants(launch_config, opts.selection, n_rows, from_ptr, opts.reduction, opts.num_strata)
    if constants is None:
        return None
    device = base.device
    mask = torch.empty(n_rows, dtype=torch.bool, device=device)
    weight = torch.empty(n_rows, dtype=torch.float32, device=device)
    coef = torch.empty(n_rows, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=device) if opts.reduction == "none" else loss
    # Two 0-d counts: two allocations cost the host less than views of one.
    n_valid = torch.empty((), dtype=torch.int64, device=device)
    n_selected = torch.empty((), dtype=torch.int64, device=device)
    outputs = (mask, weight, coef, row_loss, loss, n_valid, n_selected, n_rows)
    # Stand-ins for pointers a kernel does not read: ``n_valid`` for a float ratio, ``loss`` for
    # the per-row losses unless reduction is 'none'.
    if from_ptr:
        ratio_ptr, ratio_bits = ratio.to(device=device, dtype=torch.float64), 0
    else:
        ratio_ptr, ratio_bits = n_valid, _float_bits(ratio)
    with _device_guard(base):
        if opts.selection == "importance":
            u = torch.rand((), dtype=torch.float64, device=device, generator=opts.generator)
            launch(select_importance_kernel, 1, base, valid, ratio_ptr, ratio_bits, u, *outputs, **constants)
        elif opts.selection == "stratified":
            keys = random_keys(n_rows, device, opts.generator)
            partials = torch.empty(opts.num_strata, dtype=torch.float32, device=device)
            arrived = torch.zeros((), dtype=torch.int32, device=device)
            launch(select_stratified_kernel, opts.num_strata, base, valid, keys, ratio_ptr, ratio_bits, *outputs,
                   opts.num_strata, partials, arrived, **constants)
        else:
            forced = valid  # read only for sequence_aware: each sequence's hardest rows, kept first
            if opts.selection == "sequence_aware":
                forced = _forced_rows(stats.score, valid, seq_shape, opts.min_tokens_per_sequence)
            keys = random_keys(n_rows, device, opts.generator) if opts.selection == "random" else stats.score
            launch(select_topk_kernel, 1, keys, base, valid, forced, ratio_ptr, ratio_bits, *outputs, **constants)
    return mask, weight, coef, row_loss, n_valid, n_selected


def _forced_rows(scores: torch.Tensor, valid: torch.Tensor, seq_shape, min_rows: int) -> torch.Tensor:
    """:func:`cggr.selection.forced_rows` in one launch, a program a sequence (``scores`` may be
    a strided column)."""
    batch, seq_len = seq_shape
    forced = torch.empty_like(valid)
    launch(forced_rows_kernel, batch, scores, valid, forced, seq_len, min_rows, **_forced_constants(
        launch_config, seq_len, scores.stride(0)))
    return forced


@functools.lru_cache(maxsize=64)
def _forced_constants(config_of, seq_len: int, score_stride: int) -> dict:
    config = config_of(seq_len, "select", block_name="CHUNK")
    return dict(SCORE_STRIDE=score_stride, ONE_STEP=seq_len <= config["CHUNK"], **config)


@functools.lru_cache(maxsize=256)
def _select_constants(config_of, selection: str, n_rows: int, ratio_from_ptr: bool, reduction: str,
                      num_strata: int) -> Optional[dict]:
    """The selection kernel's constexprs and launch options (see :func:`_stats_constants`); None
    where the kernel does not apply (``stratified`` over more rows than one block or more
    strata than _MAX_FUSED_STRATA)."""
    config = config_of(n_rows, "select", block_name="CHUNK")
    one_step = n_rows <= config["CHUNK"]
    common = dict(RATIO_FROM_PTR=ratio_from_ptr, REDUCTION=_REDUCTION_CODES[reduction], STATS_WIDTH=_N_STATS,
                  LOSS_COL=_LOSS_COL, **config)
    if selection == "importance":
        return dict(SCORE_COL=_SCORE_COL, ITERATIONS=_IMPORTANCE_ITERATIONS, ONE_STEP=one_step, **common)
    if selection == "stratified":
        if not (one_step and num_strata <= _MAX_FUSED_STRATA):
            return None
        return dict(SCORE_COL=_SCORE_COL, STRATA=1 << max(num_strata - 1, 0).bit_length(), **common)
    return dict(KEY_STRIDE=1 if selection == "random" else _N_STATS, KEYS_ARE_SCORES=selection != "random",
                ONE_STEP=one_step, FORCED=selection == "sequence_aware", **common)
