"""Triton backend: launches the kernels of :mod:`triton_kernels` as ``torch.library``
custom ops, so ``torch.compile`` sees them as opaque nodes (no graph break).

Imported lazily (on first use of a CUDA tensor or ``backend='triton'``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from ..scoring import NeededStats, RowStats
from . import triton_interpreting
from .reference import compute_dtype
from .triton_kernels import logits_grad_kernel, row_stats_kernel

_N_STATS = len(RowStats._fields)


# (BLOCK_V, num_warps) chosen on an H100 with bench/tune_kernels.py.
_STATS_CONFIG = (1024, 2)
_GRAD_CONFIG = (16384, 16)


def _env_override(name: str, default):
    """``CGGR_STATS_CONFIG=1024,4``-style overrides, for tuning runs only."""
    text = os.environ.get(name)
    return default if not text else tuple(int(v) for v in text.split(","))


def launch_config(vocab_size: int, kind: str) -> dict:
    """Launch parameters of the ``'stats'`` or ``'grad'`` kernel. The interpreter costs per
    loop iteration, so it gets one large block."""
    interpreting = triton_interpreting()
    block, warps = _env_override("CGGR_STATS_CONFIG" if kind == "stats" else "CGGR_GRAD_CONFIG",
                                 _STATS_CONFIG if kind == "stats" else _GRAD_CONFIG)
    if interpreting:
        return {"BLOCK_V": min(triton.next_power_of_2(vocab_size), 1 << 16)}
    return {"BLOCK_V": min(triton.next_power_of_2(vocab_size), block), "num_warps": warps}


def _acc_dtype(dtype: torch.dtype):
    return triton.language.float64 if dtype == torch.float64 else triton.language.float32


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else torch.device(tensor.device)


def _row_stats(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, need_second: bool,
               need_sum_sq: bool) -> torch.Tensor:
    batch, seq_len, vocab_size = logits.shape
    n_rows = batch * seq_len
    stats = torch.empty(n_rows, _N_STATS, dtype=compute_dtype(logits.dtype), device=logits.device)
    if n_rows == 0:
        return stats
    with _device_guard(logits):
        row_stats_kernel[(n_rows,)](
            logits, targets, valid, stats, seq_len, logits.stride(0), logits.stride(1), vocab_size,
            ACC_DTYPE=_acc_dtype(logits.dtype), NEED_SECOND=need_second, NEED_SUM_SQ=need_sum_sq,
            **launch_config(vocab_size, "stats"),
        )
    return stats


@torch.library.custom_op("cggr::row_stats", mutates_args=())
def row_stats_op(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, need_second: bool = True,
                 need_sum_sq: bool = True) -> torch.Tensor:
    """logits ``[B, T, V]`` (unit stride along V) -> ``[B*T, 7]`` statistics (RowStats order);
    the optional fields not asked for are 0."""
    return _row_stats(logits, targets, valid, need_second, need_sum_sq)


@row_stats_op.register_fake
def _(logits, targets, valid, need_second=True, need_sum_sq=True):
    return logits.new_empty((logits.shape[0] * logits.shape[1], _N_STATS), dtype=compute_dtype(logits.dtype))


def _launch_grad(logits, grad, targets, lse, coef, mask, label_smoothing, z_loss):
    batch, seq_len, vocab_size = logits.shape
    if batch * seq_len == 0:
        return
    # Filled on the device: assigning a Python number into a CUDA tensor would be a blocking
    # host-to-device copy (a sync, and not capturable in a CUDA graph).
    params = torch.full((2,), label_smoothing, dtype=lse.dtype, device=logits.device)
    params[1:].fill_(z_loss)
    with _device_guard(logits):
        logits_grad_kernel[(batch * seq_len,)](
            logits, grad, targets, lse, coef, mask, seq_len, logits.stride(0), logits.stride(1),
            grad.stride(0), grad.stride(1), vocab_size, params,
            ACC_DTYPE=_acc_dtype(logits.dtype), **launch_config(vocab_size, "grad"),
        )


def _new_logits_grad(logits, targets, lse, coef, mask, label_smoothing, z_loss):
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_grad(logits, grad, targets, lse, coef, mask, label_smoothing, z_loss)
    return grad


def _logits_grad_in_place(logits, targets, lse, coef, mask, label_smoothing, z_loss):
    _launch_grad(logits, logits, targets, lse, coef, mask, label_smoothing, z_loss)


@torch.library.custom_op("cggr::logits_grad", mutates_args=())
def logits_grad_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                   mask: torch.Tensor, label_smoothing: float, z_loss: float) -> torch.Tensor:
    return _new_logits_grad(logits, targets, lse, coef, mask, label_smoothing, z_loss)


@logits_grad_op.register_fake
def _(logits, targets, lse, coef, mask, label_smoothing, z_loss):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("cggr::logits_grad_", mutates_args=("logits",))
def logits_grad_inplace_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                           mask: torch.Tensor, label_smoothing: float, z_loss: float) -> None:
    """Like ``logits_grad`` but overwrites ``logits`` (each row is read before it is written)."""
    _logits_grad_in_place(logits, targets, lse, coef, mask, label_smoothing, z_loss)


# Eager calls skip the custom-op dispatcher (it costs more than the small kernels around
# it); under torch.compile the ops are what gets traced, so there is no graph break.
def row_stats(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
              needed: Optional[NeededStats] = None) -> RowStats:
    needed = needed or NeededStats(True, True)
    compute = row_stats_op if torch.compiler.is_compiling() else _row_stats
    return RowStats.from_columns(compute(logits, targets, valid, *needed))


def logits_grad(logits, targets, lse, coef, mask, label_smoothing, z_loss, out=None):
    coef = coef.to(lse.dtype).contiguous()
    lse = lse.contiguous()
    compiling = torch.compiler.is_compiling()
    if out is None:
        compute = logits_grad_op if compiling else _new_logits_grad
        return compute(logits, targets, lse, coef, mask, label_smoothing, z_loss)
    if out is not logits:  # an identity test, which torch.compile can trace (data_ptr() it cannot)
        raise ValueError("the Triton backend writes gradients in place only into the logits themselves")
    overwrite = logits_grad_inplace_op if compiling else _logits_grad_in_place
    overwrite(logits, targets, lse, coef, mask, label_smoothing, z_loss)
    return logits
