"""How many tokens to keep over training (SPEC.md §7)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def curriculum_ratio(step: int, warmup_steps: int, min_tokens_ratio: float, schedule: str = "linear") -> float:
    """base(step) = 1 - f(min(1, step / warmup)) * (1 - min_tokens_ratio); 0 warmup = at once."""
    t = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    if t >= 1.0:
        return min_tokens_ratio  # exactly, not 1 - (1 - r) rounded
    f = t if schedule == "linear" else (1.0 - math.cos(math.pi * t)) / 2.0
    return 1.0 - f * (1.0 - min_tokens_ratio)


def dynamic_ratio_range(base: float, sensitivity: float) -> tuple:
    """(lowest, highest) ratio :func:`dynamic_ratio` can return for this base."""
    return base * (1.0 - sensitivity), min(1.0, base * (1.0 + sensitivity))


def dynamic_ratio(base: float, mean_confidence: torch.Tensor, sensitivity: float) -> torch.Tensor:
    """Low mean confidence keeps more tokens, high fewer; a 0-d tensor, no host sync."""
    lo, hi = dynamic_ratio_range(base, sensitivity)
    ratio = base * (1.0 + sensitivity * (1.0 - 2.0 * mean_confidence.to(torch.float64)))
    return ratio.clamp(min=lo, max=hi)
