"""Backends: where the per-row statistics and the logits gradient are computed.

``reference`` is pure PyTorch (any device); ``triton_backend`` runs fused Triton kernels
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). Both plug into the shared
autograd glue in :mod:`cggr.ops.autograd`.
"""
from __future__ import annotations

import functools
import os

import torch

from . import reference


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_backend(name: str, device: torch.device):
    """Resolve ``'auto' | 'triton' | 'torch'`` for tensors on ``device``."""
    if name == "torch":
        return reference
    if name == "auto" and device.type != "cuda":
        return reference
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")
    try:
        if torch.compiler.is_compiling():  # traced as an import, not through the cache
            from . import triton_backend

            return triton_backend
        return _triton_backend()
    except ImportError as error:  # triton is optional off Linux x86-64
        if name == "auto":
            raise ImportError("CUDA tensors need the Triton backend, but triton is not installed; "
                              "install triton or pass backend='torch'") from error
        raise ValueError(f"backend='triton' needs the triton package: {error}") from error


@functools.lru_cache(maxsize=None)
def _triton_backend():
    """The Triton backend module, imported on first use (an import statement costs host time per call)."""
    from . import triton_backend

    return triton_backend
