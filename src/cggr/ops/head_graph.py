"""CUDA graphs of a small head's forward: the same launches for a fraction of the host time.

A small head's call (see :func:`cggr.ops.autograd.small_head_apply`) is a few matmuls and
kernels whose GPU work is shorter than the Python and launches that start them. The second time
the same call is seen (same shapes, dtypes, options, ratio, weight and bias tensors), its
forward is captured into a CUDA graph that reads static copies of hidden and targets and the
weight and bias in place; later calls copy their inputs in and replay it. Random selections
draw from the default CUDA generator, which graphs advance as eager calls do, so a replay keeps
the rows the eager call would keep.

Outputs live in the graph's memory until its next replay: the loss is copied out, and the
formed gradients are read by the backward, so a graph is not replayed until the last replay's
backward has run or its autograd graph is gone (a call in between runs eagerly). At most
``_MAX_GRAPHS`` graphs are kept, each holding about one logits-sized buffer.
``CGGR_CUDA_GRAPHS=0`` turns this off.
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Optional

import torch

_ENABLED = os.environ.get("CGGR_CUDA_GRAPHS", "1") != "0"
_MAX_GRAPHS = 2
_MAX_LOGITS = 1 << 28  # elements; a larger head's buffers are not worth holding
_MAX_SEEN = 64


class _Entry:
    """One captured forward: its static inputs, its outputs, how many times it was replayed and
    whether the last replay's gradients still wait for their backward."""

    def __init__(self) -> None:
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.hidden = self.targets = None
        self.outputs: tuple = ()
        self.replays = 0
        self.busy = False


class Release:
    """One replay's hold on its graph's outputs: let go after its first backward, or when the
    autograd node holding it goes without one."""

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


_graphs: "collections.OrderedDict[tuple, Optional[_Entry]]" = collections.OrderedDict()
_seen: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()


def clear() -> None:
    """Drop every captured graph and its memory."""
    _graphs.clear()
    _seen.clear()


def _key(hidden2d, weight, bias, targets, call) -> Optional[tuple]:
    """What the captured work depends on; None where a graph does not apply."""
    opts = call.opts
    if (not _ENABLED or not hidden2d.is_cuda or not isinstance(call.ratio, float) or call.reference_loss is not None
            or call.needs_info or opts.generator is not None or opts.process_group is not None
            or hidden2d.shape[0] * weight.shape[0] > _MAX_LOGITS or hidden2d.get_device() != torch.cuda.current_device()
            or torch.cuda.is_current_stream_capturing()):
        return None
    return (call.backend, call.ratio, opts, call.seq_shape, call.plan, hidden2d.shape, hidden2d.dtype,
            hidden2d.requires_grad, weight.data_ptr(), weight.shape, weight.stride(), weight.dtype,
            weight.requires_grad, None if bias is None else (bias.data_ptr(), bias.dtype, bias.requires_grad),
            targets.shape, targets.dtype, hidden2d.device)


def run(hidden2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, call,
        forward: Callable, need: tuple) -> Optional[tuple]:
    """``forward(hidden2d, weight, bias, targets)`` -> ``(loss, grad_hidden, grad_weight,
    grad_bias)`` through a graph: ``(loss, grads..., release)``, whose ``release.guard`` wraps
    the backward's scaling of the gradients; None where no graph applies yet (run eagerly).
    ``need``: which of hidden, weight and bias need gradients (part of the key)."""
    key = _key(hidden2d, weight, bias, targets, call)
    if key is None:
        return None
    key = (*key, need)
    if key in _graphs:
        entry = _graphs[key]
        if entry is None or entry.busy:  # not graphable, or its outputs still in use
            return None
    elif key not in _seen:  # the first time: eagerly (it also compiles the kernels)
        _seen[key] = None
        if len(_seen) > _MAX_SEEN:
            _seen.popitem(last=False)
        return None
    else:
        entry = _capture(key, hidden2d, weight, bias, targets, forward)
        if entry is None:
            return None
    _graphs.move_to_end(key)
    entry.hidden.copy_(hidden2d)
    entry.targets.copy_(targets)
    entry.graph.replay()
    entry.replays += 1
    entry.busy = True
    loss, *grads = entry.outputs
    return (loss.clone(), *grads, Release(entry))


def _capture(key, hidden2d, weight, bias, targets, forward) -> Optional[_Entry]:
    """A new entry for ``key`` with its forward recorded (None, and the key marked eager, where
    recording fails), evicting the least recently used idle graphs beyond ``_MAX_GRAPHS``."""
    del _seen[key]
    entry = _Entry()
    entry.hidden, entry.targets = hidden2d.detach().clone(), targets.clone()
    try:
        _record(entry, weight, bias, forward)
    except Exception:  # something in the call does not capture: it runs eagerly from now on
        _graphs[key] = None
        return None
    _graphs[key] = entry
    idle = [k for k, e in _graphs.items() if e is not None and not e.busy and k != key]
    excess = sum(e is not None for e in _graphs.values()) - _MAX_GRAPHS
    for oldest in idle[:max(0, excess)]:  # least recently used first
        del _graphs[oldest]
    return entry


def _record(entry: _Entry, weight, bias, forward) -> None:
    """Capture ``forward`` on the entry's static inputs into ``entry.graph`` and ``entry.outputs``."""
    device = entry.hidden.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    rng = torch.cuda.get_rng_state(device)  # the warm-up must not move the generator
    with torch.cuda.stream(side):  # a warm-up off the capture, as CUDA graphs ask
        forward(entry.hidden, weight, bias, entry.targets)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.set_rng_state(rng, device)
    entry.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(entry.graph, capture_error_mode="thread_local"):
        entry.outputs = forward(entry.hidden, weight, bias, entry.targets)
