"""What a CGGR forward returns besides the loss (docs/semantics.md, "Information")."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CGGRInfo:
    """Device tensors from one forward; reading them is the caller's (host-syncing) choice.

    ``mask``, ``weight``, ``difficulty``, ``confidence``, ``entropy`` and ``nll`` have the
    targets' shape and are 0 on invalid rows. ``ratio`` is the ratio applied (float64, 0-d),
    ``n_selected`` and ``n_valid`` are int64 0-d, ``full_loss`` is the mean per-row loss over
    all valid rows (what the ordinary loss would have been).
    """

    mask: torch.Tensor
    weight: torch.Tensor
    difficulty: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    nll: torch.Tensor
    ratio: torch.Tensor
    n_selected: torch.Tensor
    n_valid: torch.Tensor
    full_loss: torch.Tensor

    ROW_FIELDS = ("mask", "weight", "difficulty", "confidence", "entropy", "nll")

    def reshape_rows(self, shape) -> "CGGRInfo":
        """The same info with every per-row field viewed as ``shape``."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in self.ROW_FIELDS:
            values[name] = values[name].reshape(shape)
        return CGGRInfo(**values)
