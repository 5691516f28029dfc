"""Backends: where the per-row statistics and the logits gradient are computed.

``reference`` is pure PyTorch (any device); ``triton_backend`` runs fused Triton kernels
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). Both plug into the shared
autograd glue in :mod:`cggr.ops.autograd`.
"""
from __future__ import annotations

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
        return _triton_backend()
    except ImportError as error:  # triton is optional off Linux x86-64
        if name == "auto":
            raise ImportError("CUDA tensors need the Triton backend, but triton is not installed; "
                              "install triton or pass backend='torch'") from error
        raise ValueError(f"backend='triton' needs the triton package: {error}") from error


_TRITON_BACKEND = None


def _triton_backend():
    """The Triton backend module, imported on first use and kept (an import statement costs host
    time per call; a plain global, which torch.compile traces as it is, unlike a cache wrapper)."""
    global _TRITON_BACKEND
    if _TRITON_BACKEND is None:
        from . import triton_backend

        _TRITON_BACKEND = triton_backend
    return _TRITON_BACKEND
