"""CUDA graphs of small forwards: the same launches for a fraction of the host time.

At small sizes a call's GPU work is shorter than the Python and launches that start it. Two
calls, both with a scalar loss whose gradients the forward forms whole, replay a graph instead:

* a small head (:func:`cggr.ops.autograd.small_head_apply`): logits, statistics, selection and
  the gradients of hidden, weight and bias. The graph reads static copies of hidden and targets
  and the weight and bias in place (their addresses are part of its key).
* small logits (:class:`cggr.ops.autograd.CGGRCrossEntropyFunction` with ``grad_now``):
  statistics, selection and the logits gradient. The graph reads a static copy of the targets
  and the logits in place: its key holds their address, so it replays only for a tensor at that
  address, which the caching allocator usually gives each step's logits of the same shape.

The second time a key is seen its forward is captured, after a warm-up on a side stream that
leaves the default CUDA generator as it was; later calls copy their inputs in and replay.
Random selections draw from the default generator, which a replay advances as the eager call
would, so a replay keeps the rows the eager call would keep.

A replay's outputs live in the graph's memory until the next replay, so a graph replays only
once the last replay is done with them; a call before that runs eagerly. The loss is always a
copy. The head's gradients are held until its first backward (a :class:`Release`), and a second
backward after another replay is refused. The logits' outputs are handed out as views (so the
gradient can become ``logits.grad`` without a copy), and the graph replays only when no view of
them is left, as their storages' use counts tell.

At most ``_MAX_GRAPHS`` graphs are kept, each holding about one logits-sized buffer; calls whose
addresses keep changing stop being captured after ``_MAX_ADDRESSES`` addresses of the same
shapes and options. ``CGGR_CUDA_GRAPHS=0`` turns graphs off.
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Optional

import torch

_ENABLED = os.environ.get("CGGR_CUDA_GRAPHS", "1") != "0"
_MAX_GRAPHS = 2
_MAX_LOGITS = 1 << 28  # elements; larger buffers are not worth holding
_MAX_SEEN = 64
_MAX_ADDRESSES = 8  # keys captured per family (a key without its addresses)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)  # (without it, no logits graphs)


def _uses(tensor: torch.Tensor) -> int:
    """How many tensors (and storage objects) hold ``tensor``'s storage."""
    return _storage_use_count(tensor.untyped_storage()._cdata)


class _Entry:
    """One captured forward: its static inputs and outputs, how many times it was replayed,
    and what tells whether the last replay is done with the outputs: ``busy`` (the head's
    :class:`Release`) or, for a tracked entry, its outputs' storages used beyond ``baseline``."""

    def __init__(self, statics: tuple) -> None:
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.statics = statics
        self.outputs: tuple = ()
        self.replays = 0
        self.busy = False
        self.baseline: tuple = ()  # (tensor, use count when only the entry held it), a storage each

    def count_holders(self) -> None:
        """Record the use counts of the outputs' storages while only this entry holds them."""
        storages = {t.untyped_storage()._cdata: t for t in self.outputs if t is not None}
        self.baseline = tuple((t, _uses(t)) for t in storages.values())

    def idle(self) -> bool:
        """Whether the last replay is done with the outputs (the next may overwrite them)."""
        return not self.busy and all(_uses(t) <= count for t, count in self.baseline)


class Release:
    """One head replay's hold on its graph's outputs: let go after its first backward, or when
    the autograd node holding it goes without one."""

    def __init__(self, entry: _Entry) -> None:
        self.entry, self.replay = entry, entry.replays

    def done(self) -> None:
        if self.entry.replays == self.replay:
            self.entry.busy = False

    __del__ = done

    def guard(self, scale_all: Callable) -> Callable:
        """``scale_all`` (the backward's scaling of the graph's gradients), checked and releasing."""
        def scale(value: torch.Tensor) -> tuple:
            if self.entry.replays != self.replay:
                raise RuntimeError(
                    "cggr: a second backward through a small head's loss after the same head ran again: its CUDA "
                    "graph has overwritten the gradients this backward reads. Run it with CGGR_CUDA_GRAPHS=0.")
            grads = scale_all(value)
            self.done()
            return grads
        return scale


_graphs: "collections.OrderedDict[tuple, Optional[list]]" = collections.OrderedDict()  # key -> its entries
_seen: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
_captured: "dict[tuple, set]" = {}  # family -> the keys captured for it


def clear() -> None:
    """Drop every captured graph and its memory."""
    _graphs.clear()
    _seen.clear()
    _captured.clear()


def _graphable(tensor: torch.Tensor, call) -> bool:
    """What every graphed call needs: CUDA graphs on, a non-empty tensor on the current CUDA
    device outside a capture, a float ratio, no info returned, nothing that a graph would freeze
    (a reference loss, a generator, a process group)."""
    opts = call.opts
    return (_ENABLED and tensor.is_cuda and tensor.numel() > 0 and isinstance(call.ratio, float)
            and not call.with_info and call.reference_loss is None and opts.generator is None
            and opts.process_group is None and tensor.get_device() == torch.cuda.current_device()
            and not torch.cuda.is_current_stream_capturing())


def _head_key(hidden2d, weight, bias, targets, call, need) -> Optional[tuple]:
    """(key, family) of a head's call; None where a graph does not apply."""
    if (not _graphable(hidden2d, call) or call.sink is not None
            or hidden2d.shape[0] * weight.shape[0] > _MAX_LOGITS):
        return None
    family = (call.backend, call.ratio, call.opts, call.seq_shape, call.plan, hidden2d.shape, hidden2d.dtype,
              weight.shape, weight.stride(), weight.dtype, None if bias is None else bias.dtype, targets.shape,
              targets.dtype, hidden2d.device, need)
    return (family, weight.data_ptr(), None if bias is None else bias.data_ptr()), family


def _logits_key(logits, targets, call) -> Optional[tuple]:
    """(key, family) of a logits call; None where a graph does not apply."""
    if _storage_use_count is None or not _graphable(logits, call) or logits.numel() > _MAX_LOGITS:
        return None
    family = (call.backend, call.ratio, call.opts, call.seq_shape, call.sink is not None, logits.shape,
              logits.stride(), logits.dtype, targets.shape, targets.dtype, logits.device)
    return (family, logits.data_ptr()), family


def run_head(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
             call, forward: Callable, need: tuple) -> Optional[tuple]:
    """``forward(hidden2d, weight, bias, targets)`` -> ``(loss, grad_hidden, grad_weight,
    grad_bias)`` through a graph: ``(loss, grads..., release)``, whose ``release.guard`` wraps
    the backward's scaling of the gradients; None where the call is to run eagerly.
    ``need``: which of hidden, weight and bias need gradients."""
    keys = _head_key(hidden2d, weight, bias, targets, call, need)
    if keys is None:
        return None
    entry = _replayed(*keys, (hidden2d, targets), lambda h, t: forward(h, weight, bias, t), tracked=False)
    if entry is None:
        return None
    entry.busy = True
    loss, *grads = entry.outputs
    return (loss.clone(), *grads, Release(entry))


def run_logits(logits: torch.Tensor, targets: torch.Tensor, call, forward: Callable) -> Optional[tuple]:
    """``forward(targets)`` -> ``(loss, *tensors)`` of ``logits`` through a graph: the loss
    copied and views of the tensors; None where the call is to run eagerly."""
    keys = _logits_key(logits, targets, call)
    if keys is None:
        return None
    entry = _replayed(*keys, (targets,), forward, tracked=True)
    if entry is None:
        return None
    loss, *rest = entry.outputs
    return (loss.clone(), *(None if t is None else t.detach() for t in rest))


def _replayed(key: tuple, family: tuple, inputs: tuple, forward: Callable, tracked: bool) -> Optional[_Entry]:
    """An entry of ``key`` replayed on ``inputs`` (copied into its static inputs), captured
    first the second time ``key`` is seen; None where the call is to run eagerly: the first
    time, while the last replays' outputs are in use, or where capture failed or stopped.
    A tracked key whose graph is held gets a second graph: views of the first one's outputs
    can stay held for good (a leaf's ``.grad`` that is zeroed, not set to None)."""
    entries = _graphs.get(key, ())
    if entries is None:
        return None
    entry = next((e for e in entries if e.idle()), None)
    if entry is None:
        if entries and (not tracked or len(entries) > 1):
            return None
        if not entries and key not in _seen:  # the first time: eagerly (it also compiles the kernels)
            _seen[key] = None
            if len(_seen) > _MAX_SEEN:
                _seen.popitem(last=False)
            return None
        if key not in _captured.setdefault(family, set()) and len(_captured[family]) >= _MAX_ADDRESSES:
            return None  # its addresses keep changing
        entry = _capture(key, family, inputs, forward, tracked)
        if entry is None:
            return None
    _graphs.move_to_end(key)
    for static, value in zip(entry.statics, inputs):
        static.copy_(value)
    entry.graph.replay()
    entry.replays += 1
    return entry


def _capture(key, family, inputs, forward, tracked) -> Optional[_Entry]:
    """A new entry for ``key`` with its forward recorded (None, and the key marked eager, where
    recording fails), evicting the least recently used idle keys beyond ``_MAX_GRAPHS`` graphs."""
    _seen.pop(key, None)
    _captured[family].add(key)
    entry = _Entry(tuple(t.detach().clone() for t in inputs))
    try:
        _record(entry, forward)
    except Exception:  # something in the call does not capture: it runs eagerly from now on
        _graphs[key] = None
        return None
    if tracked:
        entry.count_holders()
    _graphs[key] = [*_graphs.get(key, ()), entry]
    idle = [k for k, v in _graphs.items() if v and k != key and all(e.idle() for e in v)]
    excess = len(entries()) - _MAX_GRAPHS
    for oldest in idle:  # least recently used first
        if excess <= 0:
            break
        excess -= len(_graphs.pop(oldest))
    return entry


def entries() -> list:
    """Every captured graph's entry."""
    return [e for v in _graphs.values() if v for e in v]


def _record(entry: _Entry, forward: Callable) -> None:
    """Capture ``forward(*entry.statics)`` into ``entry.graph`` and ``entry.outputs``."""
    device = entry.statics[0].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    rng = torch.cuda.get_rng_state(device)  # the warm-up must not move the generator
    with torch.cuda.stream(side):  # a warm-up off the capture, as CUDA graphs ask
        forward(*entry.statics)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.set_rng_state(rng, device)
    entry.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(entry.graph, capture_error_mode="thread_local"):
        entry.outputs = forward(*entry.statics)
