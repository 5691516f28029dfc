"""Bad input gets a clear error naming the argument, before any work (docs/semantics.md, "Errors")."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .core import LossOptions
from .scoring import SCORINGS
from .selection import SELECTIONS

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value, lo: float, hi: float, *, lo_open=False, hi_open=False, integer=False):
    plain = type(value) is int or (type(value) is float and not integer)  # skips the slower ABC checks
    if not plain and (isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real)):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    if not (above and below):  # written so that NaN fails too
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_finite_float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
            positive and not value > 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite float, got {value!r}")
    return float(value)


def make_options(
    *, scoring="gradnorm", selection="importance", ignore_index=-100, reduction="mean", label_smoothing=0.0,
    z_loss=0.0, num_strata=4, min_tokens_per_sequence=1, generator=None, inplace_backward=False, logit_scale=1.0,
    logit_softcap=None, process_group=None,
) -> LossOptions:
    """Checked options (the defaults are the public functions')."""
    check_choice("scoring", scoring, SCORINGS)
    check_choice("selection", selection, SELECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_number("ignore_index", ignore_index, float("-inf"), float("inf"), integer=True)
    check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    check_number("z_loss", z_loss, 0.0, float("inf"))
    check_number("num_strata", num_strata, 1, float("inf"), integer=True)
    check_number("min_tokens_per_sequence", min_tokens_per_sequence, 0, float("inf"), integer=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    logit_scale = check_finite_float("logit_scale", logit_scale)
    if logit_softcap is not None:
        logit_softcap = check_finite_float("logit_softcap", logit_softcap, positive=True)
    if process_group is not None:
        check_process_group(process_group)
    return LossOptions(
        scoring=scoring, selection=selection, ignore_index=int(ignore_index), reduction=reduction,
        label_smoothing=float(label_smoothing), z_loss=float(z_loss), num_strata=int(num_strata),
        min_tokens_per_sequence=int(min_tokens_per_sequence), generator=generator,
        inplace_backward=bool(inplace_backward), logit_scale=logit_scale, logit_softcap=logit_softcap,
        process_group=process_group,
    )


def check_process_group(process_group) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group needs torch.distributed to be initialised (init_process_group) first")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD) or None, "
                         f"got {type(process_group).__name__}")


def check_reference_loss(reference_loss, scoring: str, targets: torch.Tensor) -> None:
    """``reference_loss`` is needed by, and only allowed with, ``scoring='excess'``: a floating
    tensor of the targets' shape on their device."""
    if scoring != "excess":
        if reference_loss is not None:
            raise ValueError(f"reference_loss is only used by scoring='excess', got scoring={scoring!r}")
        return
    if reference_loss is None:
        raise ValueError("scoring='excess' needs reference_loss: each token's loss under a reference model, "
                         "a float tensor shaped like targets")
    if not isinstance(reference_loss, torch.Tensor):
        raise ValueError(f"reference_loss must be a floating tensor shaped like targets, "
                         f"got {type(reference_loss).__name__}")
    if not reference_loss.is_floating_point():
        raise TypeError(f"reference_loss must be a floating tensor, got dtype {reference_loss.dtype}")
    if tuple(reference_loss.shape) != tuple(targets.shape):
        raise ValueError(f"reference_loss must have the targets' shape {tuple(targets.shape)}, "
                         f"got {tuple(reference_loss.shape)}")
    if reference_loss.device != targets.device:
        raise ValueError(f"reference_loss is on {reference_loss.device} but targets are on {targets.device}")


def rows_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory (a stride-0 expansion, say): False
    when, taking the dimensions by increasing stride, each stride exceeds the span of those
    before it."""
    span = 0
    dims = sorted(((abs(st), s) for s, st in zip(tensor.shape, tensor.stride()) if s > 1))
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def check_inplace_backward(inplace_backward: bool, logits: torch.Tensor) -> None:
    if inplace_backward and logits.numel() and rows_overlap(logits):
        raise ValueError("inplace_backward=True writes the gradient into the logits, whose elements share memory "
                         f"here (shape {tuple(logits.shape)}, strides {logits.stride()}: an expanded tensor?); "
                         "pass contiguous logits or inplace_backward=False")


def check_ratio(ratio, device: torch.device):
    """A float in (0, 1], or a 0-d tensor: on ``device`` it is used as is (no sync, no
    range check); a CPU scalar beside another device is read and checked like a float."""
    if isinstance(ratio, torch.Tensor):
        if ratio.dim() != 0:
            raise ValueError(f"ratio must be a float or a 0-d tensor, got a tensor of shape {tuple(ratio.shape)}")
        if ratio.is_complex() or ratio.dtype == torch.bool:
            raise ValueError(f"ratio must be a real number, got dtype {ratio.dtype}")
        if ratio.device == device:
            return ratio
        if ratio.device.type != "cpu":
            raise ValueError(f"ratio is on {ratio.device} but logits are on {device}")
        ratio = ratio.item()
    check_number("ratio", ratio, 0.0, 1.0, lo_open=True)
    return float(ratio)


def check_logits_targets(logits, targets, *, logits_name: str = "logits", check_v: bool = True) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{logits_name} must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{logits_name} must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{logits_name} must be [..., {'V' if check_v else 'H'}] with at least 2 dims, "
                         f"got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (the leading shape of "
                         f"{logits_name}), got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but {logits_name} are on {logits.device}")
    if check_v:
        check_vocab(logits.shape[-1], logits_name)


def check_vocab(vocab_size: int, name: str) -> None:
    if vocab_size < 2:
        raise ValueError(f"{name} must have V >= 2 classes, got V={vocab_size}")


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int, count_bad=None) -> None:
    """The one check that syncs with the device. Under torch.compile it is an asynchronous
    assertion instead (a host read would break the graph), raised when the graph runs.
    ``count_bad`` (a backend's ``count_bad_targets``, for contiguous ``targets``) counts the bad
    targets in fewer launches; the PyTorch ops below then run only to name the first one."""
    compiling = torch.compiler.is_compiling()
    if count_bad is not None and not compiling and count_bad(targets, vocab_size, ignore_index) == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if compiling:
        torch._assert_async(~bad.any(), f"targets must be in [0, {vocab_size}) or equal ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(f"targets must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {first}")


def check_sequence_shape(selection: str, targets: torch.Tensor) -> Optional[tuple]:
    """``(B, T)`` for sequence_aware (sequences along the last dim), else None."""
    if selection != "sequence_aware":
        return None
    if targets.dim() < 2:
        raise ValueError("selection='sequence_aware' needs targets with a batch dimension ([B, T]), "
                         f"got shape {tuple(targets.shape)}")
    return (math.prod(targets.shape[:-1]), targets.shape[-1])


def check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but logits are on {device}")
