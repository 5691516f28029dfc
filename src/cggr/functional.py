"""Stateless CGGR losses: ``cggr_cross_entropy`` and ``cggr_linear_cross_entropy``."""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import torch

from . import _validation as check
from .core import LossOptions, RatioSpec
from .info import CGGRInfo
from .ops import get_backend
from .ops.autograd import HeadPlan, autocast_off, cggr_cross_entropy_apply, cggr_linear_cross_entropy_apply
from .schedule import Curriculum

__all__ = ["cggr_cross_entropy", "cggr_linear_cross_entropy", "reference_token_loss"]

LossOrLossAndInfo = Union[torch.Tensor, Tuple[torch.Tensor, CGGRInfo]]
Ratio = Union[float, torch.Tensor, Curriculum]

# Rows per chunk of the linear path: about 2**29 logits (1 GiB in bf16) alive at once, in a
# whole number of the matmuls' 128-row tiles. Smaller chunks cost time: each adds a read and a
# write of the whole weight gradient (twice the bytes when it is summed in float32), and fewer
# rows per launch leave the matmuls and the statistics kernel less efficient (H200, ratio 1,
# 16384 x 896 -> 151,936: 2**27 logits a chunk 27.6-29.3 ms, 2**28 26.0-28.1, 2**29 24.6-26.1,
# for 0.54, 0.79 and 1.30 GB of extra memory; bench/probes/NOTES.md, step 34).
_LINEAR_CHUNK_ELEMENTS = 1 << 29
# A head of at most this many multiply-adds (N * H * V) whose logits fit one chunk is formed whole,
# its gradients in the forward: recomputing the kept rows in the backward would save at most
# 2**37 FLOPs (about 0.2 ms on a current GPU) for more host time than that (launches, Python,
# autograd's hand-off of the backward to its device thread, with the GPU idle meanwhile).
_MATERIALISE_MAX_MACS = 1 << 35


def cggr_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: Ratio = 1.0,
    *,
    scoring: str = "gradnorm",
    selection: str = "importance",
    reference_loss: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    process_group: Optional[object] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    num_strata: int = 4,
    min_tokens_per_sequence: int = 1,
    generator: Optional[torch.Generator] = None,
    return_info: bool = False,
    check_targets: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> LossOrLossAndInfo:
    """Cross-entropy over a ``ratio`` of the valid tokens, chosen by difficulty
    (docs/semantics.md gives every rule).

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16/float64 (2-D ``[N, V]`` or 3-D ``[B, T, V]``).
        targets: the leading shape of ``logits``, int64 or int32; ``ignore_index`` marks invalid rows.
        ratio: fraction of valid rows that carry loss: a float in (0, 1], a 0-d tensor, or a
            :class:`cggr.Curriculum` (its current ratio).
        scoring: ``'gradnorm'`` (default), ``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'``
            or ``'excess'`` (needs ``reference_loss``, each token's loss under a reference model,
            float in ``targets``' shape).
        selection: ``'importance'`` (default: unbiased sampling, weights 1/pi), ``'topk'``,
            ``'random'``, ``'stratified'`` or ``'sequence_aware'``.
        logit_scale, logit_softcap: the formulas see ``c * tanh(scale * x / c)`` (no cap if None).
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``): select over the
            concatenation of every process's batch, as one process would; each process returns its
            share of that loss times the group size (what DDP's gradient averaging expects). Without
            it each process selects from its own batch.

    Returns:
        The loss (0-d, or ``targets``-shaped for ``reduction='none'``) in the logits' dtype for
        float32/float64 and float32 otherwise; with ``return_info=True``, ``(loss, CGGRInfo)``.
        The gradient is exactly 0 on every row that was not selected. For a scalar loss on logits
        of at most 2**27 elements it is formed in the forward (with host time setting the pace,
        the GPU then stays busy while autograd starts the backward), and the backward scales it.
    """
    opts = _options(backend, scoring=scoring, selection=selection, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=label_smoothing, z_loss=z_loss, num_strata=num_strata,
                    min_tokens_per_sequence=min_tokens_per_sequence, generator=generator,
                    inplace_backward=inplace_backward, logit_scale=logit_scale, logit_softcap=logit_softcap,
                    process_group=process_group)
    check.check_logits_targets(logits, targets)
    ratio = resolve_ratio(ratio, logits.device)
    return run_cross_entropy(logits, targets, ratio, opts, backend, check_targets, return_info, reference_loss)


def cggr_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ratio: Ratio = 1.0,
    bias: Optional[torch.Tensor] = None,
    *,
    scoring: str = "gradnorm",
    selection: str = "importance",
    reference_loss: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    process_group: Optional[object] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    num_strata: int = 4,
    min_tokens_per_sequence: int = 1,
    generator: Optional[torch.Generator] = None,
    return_info: bool = False,
    check_targets: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    fp32_grad_accumulation: bool = False,
    weight_grad_in_place: bool = False,
) -> LossOrLossAndInfo:
    """``cggr_cross_entropy(hidden @ weight.T + bias, targets, ratio, ...)`` without ever
    holding the whole ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` float; ``weight``: ``[V, H]`` (an ``nn.Linear`` or tied embedding
            weight) of the same dtype; ``bias``: ``[V]`` or None. Under ``torch.autocast`` all
            three are cast to the autocast dtype first, as ``F.linear`` does, and the gradients
            come back in each input's own dtype (a float32 weight's summed in float32).
        chunk_size: rows of logits computed at once (bounds peak memory); default about
            2**29 / V rows (1 GiB of bf16 logits, 2 GiB of float32), in whole 128-row tiles.
        fp32_grad_accumulation: accumulate ``weight``/``bias`` gradients over chunks in float32.
        weight_grad_in_place: if ``weight.grad`` exists when the loss is called, add the weight
            gradient straight into it instead of handing autograd a new ``[V, H]`` tensor;
            autograd gets an empty sparse gradient, so the weight's hooks (and DDP's) still run.
            Saves one weight-sized buffer in gradient accumulation or with
            ``zero_grad(set_to_none=False)``. If ``weight.grad`` is None there is nothing to add
            into: the gradient is returned as by default, and autograd makes it the new
            ``weight.grad``. Eager mode only; ``weight`` must be a leaf; not with
            ``fp32_grad_accumulation``. At ratio 1 the forward, which may not write
            ``weight.grad``, holds the gradient of the last weight rows (about two chunks of
            logits' worth) until the backward, which recomputes the logits of the other
            columns: slower than the default there, in less memory.

    The backward recomputes logits only for the selected rows, so its matmuls cost in
    proportion to the tokens kept. A small head (all rows in one chunk and at most 2**35
    multiply-adds, e.g. 8192 tokens, H=256, V=16384) is instead formed whole and its gradients
    over every row are formed in the forward (the backward scales them by the upstream
    gradient): at that size host time, not matmuls, sets the pace. So is ratio 1 with a scalar
    loss, where every valid row is kept anyway. ``inplace_backward`` is accepted and has no
    effect here: the logits are always overwritten by their gradient.
    """
    opts = _options(backend, scoring=scoring, selection=selection, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=label_smoothing, z_loss=z_loss, num_strata=num_strata,
                    min_tokens_per_sequence=min_tokens_per_sequence, generator=generator,
                    inplace_backward=inplace_backward, logit_scale=logit_scale, logit_softcap=logit_softcap,
                    process_group=process_group)
    return linear_cross_entropy(hidden, weight, targets, ratio, bias, opts, backend=backend,
                                check_targets=check_targets, return_info=return_info, chunk_size=chunk_size,
                                fp32_grad_accumulation=fp32_grad_accumulation,
                                weight_grad_in_place=weight_grad_in_place, reference_loss=reference_loss)


def linear_cross_entropy(hidden, weight, targets, ratio: Ratio, bias, opts: LossOptions, *, backend: str = "auto",
                         check_targets: bool = True, return_info: bool = False, chunk_size: Optional[int] = None,
                         fp32_grad_accumulation: bool = False, weight_grad_in_place: bool = False,
                         reference_loss: Optional[torch.Tensor] = None, sink=None) -> LossOrLossAndInfo:
    """:func:`cggr_linear_cross_entropy` with checked options ``opts``: the input checks, DTensor
    gathering and autocast casts, then the loss. ``sink`` (a list) receives what the info is made
    of (see ``ops.autograd``), for callers that report metrics later."""
    check.check_logits_targets(hidden, targets, logits_name="hidden", check_v=False)
    weight, bias = _full_tensor(weight), _full_tensor(bias)
    hidden, weight, bias, weight_cast = _autocast(hidden, weight, bias, cast_weight_inside=not weight_grad_in_place)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[-1]} (hidden's last dim), got {got}")
    check.check_vocab(weight.shape[0], "weight")
    _check_same(weight, hidden, "weight", weight_cast)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be [V] with V={weight.shape[0]}, got {got}")
        _check_same(bias, hidden, "bias")
    if chunk_size is not None:
        check.check_number("chunk_size", chunk_size, 1, float("inf"), integer=True)
    weight_grad = _weight_grad_mode(weight, fp32_grad_accumulation, weight_grad_in_place)
    if weight_cast is not None:  # a float32 weight's gradient, formed in float32 from its cast copy
        weight_grad = "fp32"
    ratio = resolve_ratio(ratio, hidden.device)
    return run_linear_cross_entropy(hidden, weight, bias, targets, ratio, opts, backend, check_targets,
                                    return_info, chunk_size, weight_grad, reference_loss, sink=sink,
                                    weight_cast=weight_cast)


@torch.no_grad()
def reference_token_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    check_targets: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Each token's loss under a reference model: the ``reference_loss`` of ``scoring='excess'``.

    ``inputs`` are the reference model's logits ``[..., V]``, or, with ``weight`` ``[V, H]`` (and
    ``bias``), its final hidden states ``[..., H]``: then the logits are formed a chunk of rows at
    a time (``chunk_size``), never all at once. Returns float32 (float64 for float64 inputs)
    shaped like ``targets``, 0 on ``ignore_index`` rows; no gradient. Precompute it over a data
    set, or call it on the fly next to the training model.
    """
    kw = dict(selection="topk", scoring="loss", reduction="none", ignore_index=ignore_index,
              logit_scale=logit_scale, logit_softcap=logit_softcap, check_targets=check_targets, backend=backend)
    if weight is None:
        return cggr_cross_entropy(inputs, targets, 1.0, **kw)
    return cggr_linear_cross_entropy(inputs, weight, targets, 1.0, bias, chunk_size=chunk_size, **kw)


def _full_tensor(tensor):
    """A DTensor (a sharded weight under FSDP2 or tensor parallelism) gathered whole; the
    gather is differentiable, so its gradient is scattered back to the shards."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def _autocast(hidden, weight, bias, cast_weight_inside: bool = True):
    """Under ``torch.autocast`` for hidden's device, the three in its dtype (as ``F.linear`` would
    cast them); the casts are differentiable, so gradients return in each input's dtype. Else
    unchanged. Returns ``(hidden, weight, bias, weight_cast)``: a float32 weight (the usual
    parameter), where ``cast_weight_inside``, stays as it is and ``weight_cast`` names the dtype
    the loss casts it to itself, so that it forms the weight's gradient in float32 straight from
    the matmul instead of casting a low-precision one back (a pass over [V, H]); else None."""
    device_type = hidden.device.type
    if not isinstance(weight, torch.Tensor) or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias, None
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    if cast_weight_inside and weight.dtype == torch.float32 and dtype != torch.float32:
        return cast(hidden), weight, cast(bias), dtype
    return cast(hidden), cast(weight), cast(bias), None


def resolve_ratio(ratio: Ratio, device: torch.device):
    """A checked float, a 0-d device tensor, or a Curriculum's current ratio."""
    if isinstance(ratio, Curriculum):
        return ratio.ratio
    return check.check_ratio(ratio, device)


def _weight_grad_mode(weight: torch.Tensor, fp32_grad_accumulation: bool, weight_grad_in_place: bool) -> str:
    """How the linear path forms the weight gradient: ``'native'`` (weight dtype), ``'fp32'``
    or ``'in_place'`` (added into ``weight.grad``, which must exist now)."""
    if not weight_grad_in_place:
        return "fp32" if fp32_grad_accumulation else "native"
    if fp32_grad_accumulation:
        raise ValueError("weight_grad_in_place adds into weight.grad in its own dtype; "
                         "it cannot be combined with fp32_grad_accumulation")
    if torch.compiler.is_compiling():
        raise ValueError("weight_grad_in_place writes weight.grad from the backward and works in eager mode only, "
                         "not under torch.compile")
    if weight.requires_grad and not weight.is_leaf:
        raise ValueError("weight_grad_in_place needs weight to be a leaf tensor (a parameter): "
                         "a non-leaf weight has no .grad to add into")
    # With no weight.grad yet, returning the gradient is the in-place result at no extra cost:
    # autograd adopts it as weight.grad instead of adding it to a zero fill.
    return "native" if weight.grad is None else "in_place"


def _options(backend: str, **options) -> LossOptions:
    check.check_choice("backend", backend, check.BACKENDS)
    # A process group's check reads torch.distributed's state: not cached; torch.compile traces
    # the check itself (it would warn about tracing through a cache).
    if options["process_group"] is not None or torch.compiler.is_compiling():
        return check.make_options(**options)
    # The same options on every call of a training loop: checked once. The key holds each
    # value's type, so that e.g. label_smoothing=False is checked (and refused) even after 0.0.
    try:
        return _checked_options((*options.items(), *map(type, options.values())))
    except TypeError:  # an unhashable value: checked without the cache
        return check.make_options(**options)


@functools.lru_cache(maxsize=64)
def _checked_options(key: tuple) -> LossOptions:
    return check.make_options(**dict(key[:len(key) // 2]))


def _check_same(tensor: torch.Tensor, hidden: torch.Tensor, name: str, cast: Optional[torch.dtype] = None) -> None:
    """Device and dtype of ``tensor`` (weight or bias) are hidden's (the dtype once cast to ``cast``)."""
    if tensor.device != hidden.device:
        raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if (cast or tensor.dtype) != hidden.dtype:
        raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {tensor.dtype}")


def prepare(rows: torch.Tensor, targets: torch.Tensor, vocab_size: int, opts: LossOptions, backend: str,
            check_targets: bool, reference_loss: Optional[torch.Tensor] = None):
    """Checks that need the tensors; returns (backend module, seq_shape, targets, reference
    loss), the last two flattened to contiguous ``[N]`` vectors: the kernels read per-row
    tensors by row index, so a strided or expanded one is copied here (O(N)), once."""
    check.check_reference_loss(reference_loss, opts.scoring, targets)
    seq_shape = check.check_sequence_shape(opts.selection, targets)
    check.check_generator(opts.generator, rows.device)
    impl = get_backend(backend, rows.device)
    flat_targets = targets if targets.dim() == 1 and targets.is_contiguous() else targets.reshape(-1).contiguous()
    if check_targets:
        check.check_target_range(flat_targets, vocab_size, opts.ignore_index, getattr(impl, "count_bad_targets", None))
    if reference_loss is not None:
        reference_loss = reference_loss.detach().reshape(-1).contiguous()
    return impl, seq_shape, flat_targets, reference_loss


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> ``[N, V]`` or ``[B, T, V]`` with unit stride along V and ``.view(-1, V)``
    possible whenever the B and T strides allow; a view wherever possible."""
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.shape[-2], logits.shape[-1])
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _finish(loss: torch.Tensor, info: CGGRInfo, shape, opts: LossOptions, return_info: bool):
    if opts.reduction == "none":
        loss = loss.reshape(shape)
    return (loss, info.reshape_rows(shape)) if return_info else loss


def run_cross_entropy(logits, targets, ratio: RatioSpec, opts: LossOptions, backend: str, check_targets: bool,
                      return_info: bool, reference_loss=None, sink=None) -> LossOrLossAndInfo:
    """Validated inputs -> loss; ``ratio`` may also be a callable of the mean confidence, and
    ``sink`` a list that receives what the info is made of (see ``ops.autograd``)."""
    check.check_inplace_backward(opts.inplace_backward, logits)
    impl, seq_shape, flat_targets, reference_loss = prepare(logits, targets, logits.shape[-1], opts, backend,
                                                            check_targets, reference_loss)
    loss, info = cggr_cross_entropy_apply(as_rows(logits), flat_targets, reference_loss, impl, ratio, opts,
                                          seq_shape, with_info=return_info, sink=sink)
    return _finish(loss, info, targets.shape, opts, return_info)


def run_linear_cross_entropy(hidden, weight, bias, targets, ratio: RatioSpec, opts: LossOptions, backend: str,
                             check_targets: bool, return_info: bool, chunk_size: Optional[int] = None,
                             weight_grad: str = "native", reference_loss=None, sink=None,
                             ratio_bound: Optional[float] = None,
                             weight_cast: Optional[torch.dtype] = None) -> LossOrLossAndInfo:
    """Validated inputs -> loss. ``ratio_bound``: the largest ratio a callable ``ratio`` can
    return (a float ratio is its own bound; without one the backward may recompute every row).
    ``weight_cast``: the dtype the loss casts ``weight`` to itself (see ``_autocast``)."""
    vocab_size = weight.shape[0]
    impl, seq_shape, flat_targets, reference_loss = prepare(hidden, targets, vocab_size, opts, backend, check_targets,
                                                            reference_loss)
    n_rows = math.prod(hidden.shape[:-1])
    chunk_rows = min(chunk_size or _default_chunk_rows(vocab_size), max(n_rows, 1))
    if ratio_bound is None and isinstance(ratio, float):
        ratio_bound = ratio
    plan = HeadPlan(chunk_rows, max_selected_rows(ratio_bound, opts, n_rows, seq_shape), weight_grad,
                    whole=(weight_grad != "in_place" and n_rows <= chunk_rows
                           and n_rows * hidden.shape[-1] * vocab_size <= _MATERIALISE_MAX_MACS),
                    tracked=(torch.is_grad_enabled() and not torch.compiler.is_compiling()
                             and any(t is not None and t.requires_grad for t in (hidden, weight, bias))),
                    weight_cast=weight_cast)
    with autocast_off(hidden.device.type):  # the inputs are in the autocast dtype already
        loss, info = cggr_linear_cross_entropy_apply(hidden, weight, bias, flat_targets, reference_loss, impl, ratio,
                                                     opts, seq_shape, plan, with_info=return_info, sink=sink)
    return _finish(loss, info, targets.shape, opts, return_info)


def _default_chunk_rows(vocab_size: int) -> int:
    """About ``_LINEAR_CHUNK_ELEMENTS / vocab_size`` rows, to the nearest multiple of 128 if at least 128."""
    rows = max(1, _LINEAR_CHUNK_ELEMENTS // vocab_size)
    return rows if rows < 128 else (rows + 64) // 128 * 128


def max_selected_rows(ratio_bound: Optional[float], opts: LossOptions, n_rows: int, seq_shape) -> int:
    """A host-side upper bound on how many rows a selection can keep (no device sync)."""
    if ratio_bound is None or opts.process_group is not None:  # a group's selection: any local count
        return n_rows
    bound = max(1, math.ceil(ratio_bound * n_rows - 1e-6))
    if opts.selection == "importance":  # systematic sampling keeps k or k + 1 rows at most
        bound += 1
    if seq_shape is not None:
        bound = max(bound, seq_shape[0] * opts.min_tokens_per_sequence)
    return min(n_rows, bound)
