"""Autograd glue shared by every backend.

A backend is any object with

* ``row_stats(logits [B, T, V] or [N, V], targets [B*T], valid [B*T], opts: LossOptions,
  reference_loss=None, need_entropy=True) -> RowStats`` (the entropy is read only by the info and
  the entropy-based scorings: without them it may be left 0)
* ``logits_grad(logits [B, T, V'] or [N, V'], targets, lse, coef, mask, opts, grad_scale=None,
  out=None, vocab_size=None) -> logits-shaped`` that is exactly 0 on rows where ``mask`` is False;
  ``logits`` may hold V' consecutive columns of ``vocab_size``, with the targets counted from
  the first of them.
* ``mul_(tensor, scale)`` and ``add_mul_(out, src, scale)``: in-place scaling by a 0-d tensor;
  ``scaled(tensor, scale)``: the same into a new tensor; ``scaler(tensor)``: a function of
  ``scale`` that does ``mul_`` of ``tensor``; ``scaled_later(*tensors)``: one that returns the
  ``scaled`` of each (None for None).
* optionally ``select(stats, valid, ratio, opts)``: see :func:`cggr.core.select_and_reduce`, and
  ``row_stats_and_valid(logits, targets, opts, reference_loss=None, need_entropy=True)``:
  ``row_stats`` that also forms ``valid`` (None where it does not apply).

Per-row tensors (targets, validity, reference losses) are contiguous ``[B*T]`` vectors here;
:mod:`cggr.functional` makes them so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import torch

from ..core import LossOptions, RatioSpec, Reduced, build_info, mean_denominator, select_and_reduce, selected_first
from ..info import CGGRInfo
from ..scoring import RowStats
from . import graphs
from .reference import compute_dtype

_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(CGGRInfo))
# Logits of at most this many elements (256 MiB in bf16) get their gradient in the forward: at
# that size host time, not memory traffic, sets the pace. The gradient is as large as the
# logits and lives from the forward to the backward; the backward would allocate it anyway.
_GRAD_NOW_MAX_ELEMENTS = 1 << 27


def _outputs(ctx, stats, reduced, with_info, sink):
    """(loss, *info fields if asked for); the info is not differentiable. ``sink`` (a list or
    None) receives ``(stats, reduced)``, from which :func:`build_info` makes the info later."""
    if sink is not None:
        sink.append((stats, reduced))
    if not with_info:
        return reduced.loss
    info = build_info(stats, reduced)
    info = tuple(getattr(info, name) for name in _INFO_FIELDS)
    ctx.mark_non_differentiable(*info)
    return (reduced.loss, *info)


class Call(NamedTuple):
    """What one call passes its autograd Function besides the tensors that take gradients: one
    object, not one argument each, so that autograd's per-argument work stays small."""

    backend: Any
    ratio: RatioSpec
    opts: LossOptions
    seq_shape: Optional[tuple]
    reference_loss: Optional[torch.Tensor]  # detached
    with_info: bool
    sink: Optional[list]
    grad_now: bool = False  # logits path: form the gradient in the forward (see CGGRCrossEntropyFunction)
    plan: Optional["HeadPlan"] = None  # linear path

    @property
    def needs_info(self) -> bool:
        """Whether anything reads the info (and so every statistic) of this call."""
        return self.with_info or self.sink is not None


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type`` (entering one costs host time: only if on).
    The losses' inputs are cast before they start, and their backward, which ``loss.backward()``
    inside an autocast region would run under autocast, keeps its float32 accumulators as they are."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def stats_and_valid(backend, logits, targets, opts: LossOptions, reference_loss, need_entropy: bool):
    """``(RowStats, valid)``, valid = targets != ignore_index: from one launch where the backend
    has a ``row_stats_and_valid`` that applies."""
    fused = getattr(backend, "row_stats_and_valid", None)
    result = None if fused is None else fused(logits, targets, opts, reference_loss, need_entropy)
    if result is not None:
        return result
    valid = targets != opts.ignore_index
    return backend.row_stats(logits, targets, valid, opts, reference_loss, need_entropy), valid


def _fused_select(backend):
    """The backend's one-launch selection, if it has one."""
    return getattr(backend, "select", None)


def _unpack(outputs, with_info: bool):
    if not with_info:
        return outputs, None
    loss, *info = outputs
    return loss, CGGRInfo(**dict(zip(_INFO_FIELDS, info)))


class CGGRCrossEntropyFunction(torch.autograd.Function):
    """loss = CGGR(logits); the gradient is nonzero on selected rows only.

    It is written in the backward, or with ``grad_now`` (small logits, a scalar loss, not in
    place) in the forward, where the backward only scales it by the upstream gradient: with host
    time setting the pace, work queued in the forward keeps the GPU busy while autograd hands the
    backward to its device thread. The forward also prepares that scaling's launch (the
    backend's ``scaler``): Python runs several times slower on that thread. With ``grad_now``
    the forward may replay a CUDA graph (:mod:`cggr.ops.graphs`).
    """

    @staticmethod
    def forward(ctx, logits, targets, call: Call):
        backend = call.backend
        ctx.backend, ctx.opts = backend, call.opts
        # A second backward (retain_graph) recomputes the gradient from the saved logits.
        ctx.scale_grad = None
        if call.grad_now:
            # The graph's forward keeps no sink: what it holds would stay held.
            forward = functools.partial(_graphed_logits, logits, call._replace(sink=None), call.needs_info)
            replayed = graphs.run_logits(logits, targets, call, forward)
            if replayed is None:
                stats, reduced, grad = _formed_logits(logits, targets, call, call.needs_info)
                lse = stats.lse
            else:
                stats, reduced, grad, lse = _from_graph(replayed, call)
            ctx.scale_grad = backend.scaler(grad)
        else:
            stats, reduced = _selected(logits, targets, call, call.needs_info)
            lse = stats.lse
        ctx.save_for_backward(logits, targets, lse, reduced.mask, reduced.coef)
        return _outputs(ctx, stats, reduced, call.with_info, call.sink)

    @staticmethod
    def backward(ctx, grad_loss, *unused_info_grads):
        if ctx.scale_grad is not None:  # formed in the forward: the first backward scales it
            scale_grad, ctx.scale_grad = ctx.scale_grad, None
            return scale_grad(grad_loss), None, None
        with autocast_off(grad_loss.device.type):
            return CGGRCrossEntropyFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        logits, targets, lse, mask, coef = ctx.saved_tensors
        opts = ctx.opts
        grad = ctx.backend.logits_grad(logits, targets, lse, coef, mask, opts, grad_scale=grad_loss,
                                       out=logits if opts.inplace_backward else None)
        if opts.inplace_backward:
            # The kernels write behind autograd's back: mark the buffer changed, so that an op
            # that saved these logits for its own backward (relu, say) raises instead of
            # reading a gradient as its output.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None


def _selected(logits, targets, call: Call, need_stats: bool):
    """``(stats, reduced)`` of one call's logits; ``need_stats``: whether anything reads the
    statistics beyond ``lse`` and the score (the info)."""
    backend = call.backend
    stats, valid = stats_and_valid(backend, logits, targets, call.opts, call.reference_loss, need_stats)
    return stats, select_and_reduce(stats, valid, call.ratio, call.opts, call.seq_shape, _fused_select(backend))


def _formed_logits(logits, targets, call: Call, need_stats: bool):
    """``(stats, reduced, logits gradient)`` of one call, the gradient formed now."""
    stats, reduced = _selected(logits, targets, call, need_stats)
    return stats, reduced, call.backend.logits_grad(logits, targets, stats.lse, reduced.coef, reduced.mask, call.opts)


def _graphed_logits(logits, call: Call, need_stats: bool, targets):
    """:func:`_formed_logits` as the flat tensors a graph returns: loss, coef, mask, gradient and
    lse, which the call reads, and with ``need_stats`` the rest of the selection and statistics
    (see :func:`_from_graph`)."""
    stats, reduced, grad = _formed_logits(logits, targets, call, need_stats)
    read = (reduced.loss, reduced.coef, reduced.mask, grad, stats.lse)
    if not need_stats:
        return read
    columns = (stats.block,) if stats.block is not None else tuple(stats)
    return (*read, reduced.weight, reduced.n_valid, reduced.n_selected, *columns)


def _from_graph(outputs, call: Call):
    """``(stats, reduced, logits gradient, lse)`` from a graph's outputs; without the statistics
    (no sink reads them) ``stats`` is None and ``reduced`` holds only loss, coef and mask."""
    loss, coef, mask, grad, lse, *rest = outputs
    if not rest:
        return None, Reduced(loss, coef, mask, None, None, None, call.ratio), grad, lse
    weight, n_valid, n_selected, *columns = rest
    stats = RowStats.from_columns(*columns) if len(columns) == 1 else RowStats(*columns)
    return stats, Reduced(loss, coef, mask, weight, n_valid, n_selected, call.ratio), grad, lse


def cggr_cross_entropy_apply(logits, targets_flat, reference_loss, backend, ratio, opts, seq_shape,
                             with_info=True, sink=None):
    """Run the Function on ``[N, V]`` or ``[B, T, V]`` logits with unit stride along V; returns
    ``(loss, CGGRInfo or None)`` with flat per-row info."""
    grad_now = (torch.is_grad_enabled() and logits.requires_grad and opts.reduction != "none"
                and not opts.inplace_backward and logits.numel() <= _GRAD_NOW_MAX_ELEMENTS
                and not torch.compiler.is_compiling())  # a traced graph schedules the work itself
    call = Call(backend, ratio, opts, seq_shape, reference_loss, with_info, sink, grad_now=grad_now)
    outputs = CGGRCrossEntropyFunction.apply(logits, targets_flat, call)
    return _unpack(outputs, with_info)


# At ratio 1 with ``weight_grad='in_place'`` the forward may not write weight.grad yet, so it holds
# the gradient of the last weight rows in a buffer of about this many chunks of logits and the
# backward recomputes the logits of the leading columns only: each held row saves 2·N·H
# FLOPs of recomputation for H elements of memory.
_HELD_CHUNKS = 2


def _recomputed_columns(vocab_size: int, hidden_dim: int, chunk_rows: int, weight_grad: str) -> int:
    """How many leading vocabulary columns the backward recomputes at ratio 1 (0: none)."""
    if weight_grad != "in_place":
        return 0
    held_rows = min(vocab_size, int(_HELD_CHUNKS * chunk_rows * vocab_size) // hidden_dim)
    return min(vocab_size, -(-(vocab_size - held_rows) // 8) * 8)  # held columns start 16-byte aligned


def _existing_grad(weight: torch.Tensor) -> torch.Tensor:
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad


def _mm_into(acc: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc + a @ b`` in place (``a @ b`` when ``acc`` is None), in ``dtype``. On CUDA a matmul of
    bf16 or fp16 inputs writes float32 directly: no cast of the inputs, no float32 matmul."""
    if dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        if acc is None:
            return torch.mm(a, b, out_dtype=dtype)
        return torch.addmm(acc, a, b, out_dtype=dtype, out=acc)
    if a.dtype != dtype or b.dtype != dtype:
        a, b = a.to(dtype), b.to(dtype)
    return a @ b if acc is None else acc.addmm_(a, b)


class _HeadGrads:
    """Accumulates the gradients of hidden, weight and bias from chunks of logits gradients.

    The weight gradient covers the weight rows from ``vocab_start`` on and goes to a buffer
    ('native': weight dtype, 'fp32') or into ``weight.grad`` ('in_place'): chunk by chunk, or
    in :meth:`result` when ``defer`` (the forward may not write weight.grad). A buffer is
    written by the first chunk, not added to zeros: a zero fill of [V, H] costs as much as
    reading it."""

    def __init__(self, backend, hidden, weight, has_bias, need_hidden, need_weight, weight_grad, *,
                 every_row=False, vocab_start=0, defer=False, whole=False):
        self.backend = backend
        self.acc_dtype = torch.float32 if weight_grad == "fp32" else weight.dtype
        self.weight, self.has_bias, self.need_weight = weight, has_bias, need_weight
        self.vocab_start, self.defer = vocab_start, defer
        self.need_hidden = need_hidden
        # Rows that no chunk covers keep a zero hidden gradient; if every row is covered, no fill;
        # a whole head's one chunk makes it.
        self.hidden = None
        if need_hidden and not whole:
            self.hidden = torch.empty_like(hidden) if every_row else torch.zeros_like(hidden)
        self.weight_grad = self.bias = None
        self.in_place = need_weight and weight_grad == "in_place"
        if self.in_place and not defer:
            self.weight_grad = _existing_grad(weight)[vocab_start:]

    def add(self, index: Optional[torch.Tensor], h: torch.Tensor, grad_logits: torch.Tensor) -> None:
        """``grad_logits`` [C, V] are the logits gradients of rows ``index`` [C] (hidden ``h`` [C, H]);
        ``index`` None: of every row, in a whole head's one call."""
        if self.need_hidden:
            if index is None:
                self.hidden = grad_logits @ self.weight
            else:
                self.hidden.index_copy_(0, index, grad_logits @ self.weight)
        if self.need_weight:
            columns = grad_logits[:, self.vocab_start:] if self.vocab_start else grad_logits
            self.weight_grad = _mm_into(self.weight_grad, columns.t(), h, self.acc_dtype)
        if self.has_bias:
            column_sums = grad_logits.sum(0, dtype=self.acc_dtype)
            self.bias = column_sums if self.bias is None else self.bias.add_(column_sums)

    def result(self, weight_dtype, bias_dtype, scale: Optional[torch.Tensor] = None):
        """(grad_hidden, grad_weight, grad_bias), times ``scale`` (the upstream gradient) if given."""
        if self.has_bias and self.bias is None:  # no row was selected
            self.bias = self.weight.new_zeros(self.weight.shape[0], dtype=self.acc_dtype)

        def scaled(grad, dtype):  # in place: the accumulators are ours, and a copy of grad_weight is large
            if grad is None:
                return None
            grad = grad if scale is None else self.backend.mul_(grad, scale)
            return grad if grad.dtype == dtype else grad.to(dtype)
        hidden_dtype = None if self.hidden is None else self.hidden.dtype
        if self.in_place:
            if self.defer and self.weight_grad is not None:  # formed in the forward: scale is given
                self.backend.add_mul_(_existing_grad(self.weight)[self.vocab_start:], self.weight_grad, scale)
            # Already in weight.grad: autograd gets an empty sparse gradient, so the weight's hooks
            # run and adding it costs nothing (a dense zero, even stride-0, costs a pass over weight.grad).
            weight_grad = torch.zeros(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device,
                                      layout=torch.sparse_coo)
        else:
            if self.need_weight and self.weight_grad is None:
                self.weight_grad = self.weight.new_zeros(self.weight.shape, dtype=self.acc_dtype)
            weight_grad = scaled(self.weight_grad, weight_dtype)
        return scaled(self.hidden, hidden_dtype), weight_grad, scaled(self.bias, bias_dtype)


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How the linear path runs one call, chosen on the host by :mod:`cggr.functional`."""

    chunk_rows: int  # rows of logits formed at once
    max_selected: int  # a bound on the rows a selection keeps: the backward recomputes this many
    weight_grad: str = "native"  # 'native' (weight dtype), 'fp32' or 'in_place' (into weight.grad)
    whole: bool = False  # a small head: every row in one chunk (see small_head_apply)
    tracked: bool = True  # autograd records the call, eagerly, for an input that needs a gradient
    weight_cast: Optional[torch.dtype] = None  # cast the weight to this dtype here (autocast; see _cast_weight)


def _cast_weight(weight: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
    """The weight the matmuls use: under autocast a float32 weight is cast here, not by the
    caller, so that its gradient (``plan.weight_grad`` 'fp32') comes back in float32 as formed."""
    return weight if plan.weight_cast is None else weight.to(plan.weight_cast)


class CGGRLinearCrossEntropyFunction(torch.autograd.Function):
    """CGGR over ``hidden @ weight.T + bias`` without materialising the whole logits.

    Forward: logits chunk by chunk, statistics of every row, selection over the batch.
    Backward: logits recomputed only for (at most ``plan.max_selected``) rows, selected first,
    so the three backward matmuls cost in proportion to the rows kept.
    At ratio 1 (a scalar loss) every valid row is selected whatever the strategy, so the
    gradients are formed in the forward instead, from logits that already exist, and the backward
    scales them by the upstream gradient; with ``weight_grad='in_place'`` only those of the last
    weight rows (see ``_HELD_CHUNKS``), and the backward recomputes the logits of the leading
    columns for the rest of the weight gradient. A small head takes :func:`small_head_apply`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, call: Call):
        backend, ratio, opts, plan, reference_loss = call.backend, call.ratio, call.opts, call.plan, call.reference_loss
        valid = targets != opts.ignore_index
        ctx.weight_dtype = weight.dtype
        weight = _cast_weight(weight, plan)  # saved for the backward in the dtype it computes in
        at_one = (plan.tracked and opts.reduction != "none" and isinstance(ratio, float) and ratio == 1.0
                  and opts.process_group is None)
        grads = None
        if at_one:
            recompute_cols = _recomputed_columns(*weight.shape, plan.chunk_rows, plan.weight_grad)
            # With every column recomputed the forward holds an empty [0, H] weight gradient.
            grads = _HeadGrads(backend, hidden, weight, bias is not None, ctx.needs_input_grad[0],
                               ctx.needs_input_grad[1], plan.weight_grad, every_row=True, vocab_start=recompute_cols,
                               defer=True)
            # Every valid row is selected with weight 1, so d loss / d row loss is valid / denominator.
            n_valid = valid.sum()
            denominator = mean_denominator(opts, n_valid, n_valid)
        stats_parts = []
        for rows in _chunks(hidden.shape[0], plan.chunk_rows):
            logits = _project(hidden[rows], weight, bias)
            chunk_ref = None if reference_loss is None else reference_loss[rows]
            chunk_stats = backend.row_stats(logits, targets[rows], valid[rows], opts, chunk_ref, call.needs_info)
            stats_parts.append(chunk_stats)
            if at_one:
                coef = valid[rows].to(chunk_stats.lse.dtype)
                coef = coef if denominator is None else coef / denominator
                grad_logits = backend.logits_grad(logits, targets[rows], chunk_stats.lse, coef, valid[rows], opts,
                                                  out=logits)
                index = torch.arange(rows.start, rows.stop, device=hidden.device)
                grads.add(index, hidden[rows], grad_logits)
                del grad_logits  # a view of this chunk's logits: freed before the next chunk is made
            del logits
        if not stats_parts:  # no rows at all
            empty = hidden.new_zeros((0, len(RowStats._fields)), dtype=compute_dtype(hidden.dtype))
            stats = RowStats.from_columns(empty)
        elif len(stats_parts) == 1:
            stats = stats_parts[0]
        else:
            stats = RowStats.from_columns(torch.cat([part.columns() for part in stats_parts]))
        reduced = select_and_reduce(stats, valid, ratio, opts, call.seq_shape, _fused_select(backend))
        ctx.backend, ctx.opts, ctx.plan = backend, opts, plan
        ctx.has_bias = bias is not None
        ctx.grads = grads
        ctx.save_for_backward(hidden, weight, bias, targets, stats.lse, reduced.mask, reduced.coef)
        return _outputs(ctx, stats, reduced, call.with_info, call.sink)

    @staticmethod
    def backward(ctx, grad_loss, *unused_info_grads):
        with autocast_off(grad_loss.device.type):
            return CGGRLinearCrossEntropyFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        hidden, weight, bias, targets, lse, mask, coef = ctx.saved_tensors
        bias_dtype = bias.dtype if bias is not None else None
        if ctx.grads is None:  # nothing formed in the forward
            grads = _recompute(ctx, hidden, weight, bias, targets, lse, mask, coef * grad_loss.to(coef.dtype))
            return (*grads.result(ctx.weight_dtype, bias_dtype), None, None)
        grads, ctx.grads = ctx.grads, None
        formed = grads.result(ctx.weight_dtype, bias_dtype, scale=grad_loss)
        recompute_cols = grads.vocab_start if grads.need_weight else 0
        del grads  # frees a held weight-gradient buffer before the recomputation
        if recompute_cols > 0:
            _recompute_weight_columns(ctx, hidden, weight, bias, targets, lse, mask, coef * grad_loss.to(coef.dtype),
                                      recompute_cols)
        return (*formed, None, None)


def _recompute(ctx, hidden, weight, bias, targets, lse, mask, coef) -> _HeadGrads:
    """Every gradient from logits recomputed for the selected rows only, in the forward's chunks;
    the padding rows after them have mask False and contribute exact zeros."""
    opts = ctx.opts
    order = selected_first(mask, ctx.plan.max_selected)
    # A saved leaf unpacks as the leaf itself, so weight.grad here is the parameter's.
    grads = _HeadGrads(ctx.backend, hidden, weight, ctx.has_bias, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                       ctx.plan.weight_grad)
    for rows in _chunks(order.numel(), ctx.plan.chunk_rows):
        index = order[rows]
        h = hidden.index_select(0, index)
        logits = _project(h, weight, bias)
        grad_logits = ctx.backend.logits_grad(logits, targets[index], lse[index], coef[index], mask[index], opts,
                                              out=logits)
        grads.add(index, h, grad_logits)
        del logits, grad_logits
    return grads


def _recompute_weight_columns(ctx, hidden, weight, bias, targets, lse, mask, coef, n_cols: int) -> None:
    """Ratio 1 in place: adds into weight.grad the gradient of the weight rows the forward did not
    hold (the first ``n_cols``), from logits recomputed for every row over slices of
    those columns. A slice holds as many logits as the forward did at its peak (a chunk and the
    held rows), and each matmul spans all N rows."""
    opts, (n_rows, hidden_dim), vocab_size = ctx.opts, hidden.shape, weight.shape[0]
    budget = ctx.plan.chunk_rows * vocab_size + (vocab_size - n_cols) * hidden_dim
    n_slices = max(1, -(-n_cols * n_rows // budget))
    width = -(-n_cols // n_slices)
    width = -(-width // 128) * 128 if width >= 128 else width  # whole tiles, equal slices
    weight_grad = _existing_grad(weight)
    for cols in _chunks(n_cols, width):
        logits = _project(hidden, weight[cols], None if bias is None else bias[cols])
        grad_logits = ctx.backend.logits_grad(logits, targets - cols.start, lse, coef, mask, opts, out=logits,
                                              vocab_size=vocab_size)
        weight_grad[cols].addmm_(grad_logits.t(), hidden)
        del logits, grad_logits


def _chunks(n_rows: int, chunk_rows: int):
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight, bias)


def cggr_linear_cross_entropy_apply(hidden, weight, bias, targets_flat, reference_loss, backend, ratio, opts,
                                    seq_shape, plan: HeadPlan, with_info=True, sink=None):
    """The loss of ``hidden`` ``[..., H]`` (its rows flattened)."""
    call = Call(backend, ratio, opts, seq_shape, reference_loss, with_info, sink, plan=plan)
    if plan.whole and plan.tracked and opts.reduction != "none" and hidden.numel() > 0:
        return small_head_apply(hidden, weight, bias, targets_flat, call)
    hidden2d = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
    outputs = CGGRLinearCrossEntropyFunction.apply(hidden2d, weight, bias, targets_flat, call)
    return _unpack(outputs, with_info)


class _ScaledGradients(torch.autograd.Function):
    """``loss`` unchanged, whose gradients with respect to ``inputs`` were formed already: the
    backward scales them by the upstream gradient through ``scale_all`` (the backend's
    ``scaled_later`` of them, one launch), out of place, so that a second backward
    (retain_graph) gets them again."""

    @staticmethod
    def forward(ctx, loss, scale_all, *inputs):
        ctx.scale_all = scale_all
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad_loss):
        return None, None, *ctx.scale_all(grad_loss)


def small_head_apply(hidden, weight, bias, targets_flat, call: Call):
    """A small head (its logits one chunk) with a scalar loss, under autograd: logits, selection,
    logits gradient and the gradients of hidden, weight and bias, all in the forward, replayed
    from a CUDA graph where one applies (:mod:`cggr.ops.graphs`). Host time sets the pace at
    this size: work queued in the forward keeps the GPU busy while autograd hands the backward
    to its device thread, and the backward is one small launch. ``hidden`` ``[..., H]`` is
    flattened here, outside autograd: one node less for its device thread."""
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)

    def forward(hidden2d, weight, bias, targets_flat):
        return _formed_head(hidden2d, weight, bias, targets_flat, call, need)[2:]

    with torch.no_grad():
        hidden2d = hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])
        replayed = graphs.run_head(hidden2d, weight, bias, targets_flat, call, forward, need)
        if replayed is None:
            stats, reduced, loss, grad_hidden, grad_weight, grad_bias = _formed_head(
                hidden2d, weight, bias, targets_flat, call, need)
            release = None
        else:
            loss, grad_hidden, grad_weight, grad_bias, release = replayed
        if grad_hidden is not None and hidden.dim() != 2:
            grad_hidden = grad_hidden.view(hidden.shape)
    scale_all = call.backend.scaled_later(grad_hidden, grad_weight, grad_bias)
    loss = _ScaledGradients.apply(loss, scale_all if release is None else release.guard(scale_all), hidden, weight,
                                  bias)
    if replayed is not None:  # a graph applies only where no one reads the info
        return loss, None
    if call.sink is not None:
        call.sink.append((stats, reduced))
    return loss, (build_info(stats, reduced) if call.with_info else None)


def _formed_head(hidden2d, weight, bias, targets_flat, call: Call, need):
    """``(stats, reduced, loss, grad_hidden, grad_weight, grad_bias)`` of a small head, without
    autograd; ``need``: whether hidden, weight and bias need their gradients."""
    backend, opts, plan = call.backend, call.opts, call.plan
    cast_weight = _cast_weight(weight, plan)
    logits = _project(hidden2d, cast_weight, bias)
    stats, reduced = _selected(logits, targets_flat, call, call.needs_info)
    # The logits become their gradient, zero on the rows not selected.
    grad_logits = backend.logits_grad(logits, targets_flat, stats.lse, reduced.coef, reduced.mask, opts, out=logits)
    del logits
    grads = _HeadGrads(backend, hidden2d, cast_weight, need[2], need[0], need[1], plan.weight_grad, whole=True)
    grads.add(None, hidden2d, grad_logits)
    del grad_logits
    return (stats, reduced, reduced.loss, *grads.result(weight.dtype, None if bias is None else bias.dtype))
