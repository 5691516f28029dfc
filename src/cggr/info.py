"""What a CGGR forward returns besides the loss (docs/semantics.md, "Information")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Union

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

    def summary(self) -> Dict[str, Union[int, float]]:
        """Plain numbers, read from the device in one transfer (a host sync): ``ratio``,
        ``n_selected``, ``n_valid``, ``full_loss`` and the means over valid rows of confidence,
        entropy and difficulty (``avg_*``; 0 with no valid row)."""
        valid = self.n_valid.clamp(min=1).double()
        ratio, n_selected, n_valid, full_loss, confidence, entropy, difficulty = torch.stack([
            self.ratio.double(), self.n_selected.double(), self.n_valid.double(), self.full_loss.double(),
            self.confidence.double().sum() / valid, self.entropy.double().sum() / valid,
            self.difficulty.double().sum() / valid,
        ]).tolist()
        return dict(ratio=ratio, n_selected=int(n_selected), n_valid=int(n_valid), full_loss=full_loss,
                    avg_confidence=confidence, avg_entropy=entropy, avg_difficulty=difficulty)

    def reshape_rows(self, shape) -> "CGGRInfo":
        """The same info with every per-row field viewed as ``shape``."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in self.ROW_FIELDS:
            values[name] = values[name].reshape(shape)
        return CGGRInfo(**values)
