"""How many tokens to keep over training: the curriculum and the dynamic threshold
(docs/semantics.md, "Curriculum" and "Dynamic threshold")."""
from __future__ import annotations

import math
from typing import Dict

import torch

from ._validation import check_choice, check_number

SCHEDULES = ("linear", "cosine")


def curriculum_ratio(step: int, warmup_steps: int, min_tokens_ratio: float, schedule: str = "linear") -> float:
    """base(step) = 1 - f(min(1, step / warmup)) * (1 - min_tokens_ratio); 0 warmup = at once."""
    t = 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
    if t >= 1.0:
        return min_tokens_ratio  # exactly, not 1 - (1 - r) rounded
    f = t if schedule == "linear" else (1.0 - math.cos(math.pi * t)) / 2.0
    return 1.0 - f * (1.0 - min_tokens_ratio)


class Curriculum:
    """The kept-token ratio over training: 1 at step 0, falling to ``min_tokens_ratio`` over
    ``warmup_steps`` optimizer steps (``'linear'`` or ``'cosine'``), then constant.

    Pass it as ``ratio`` to :func:`cggr.cggr_cross_entropy` or
    :func:`cggr.cggr_linear_cross_entropy` and call :meth:`step` after each optimizer step;
    ``state_dict()`` / ``load_state_dict()`` carry the step through a checkpoint.
    """

    def __init__(self, min_tokens_ratio: float = 0.25, warmup_steps: int = 1000, schedule: str = "linear") -> None:
        check_number("min_tokens_ratio", min_tokens_ratio, 0.0, 1.0, lo_open=True)
        check_number("warmup_steps", warmup_steps, 0, float("inf"), integer=True)
        check_choice("schedule", schedule, SCHEDULES)
        self.min_tokens_ratio = float(min_tokens_ratio)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.step_count = 0

    @property
    def ratio(self) -> float:
        """The ratio at the current step."""
        return curriculum_ratio(self.step_count, self.warmup_steps, self.min_tokens_ratio, self.schedule)

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.step_count += 1

    def state_dict(self) -> Dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step_count = int(state["step_count"])

    def __repr__(self) -> str:
        return (f"Curriculum(min_tokens_ratio={self.min_tokens_ratio}, warmup_steps={self.warmup_steps}, "
                f"schedule={self.schedule!r}, step={self.step_count}, ratio={self.ratio:.4g})")


def dynamic_ratio_range(base: float, sensitivity: float) -> tuple:
    """(lowest, highest) ratio :func:`dynamic_ratio` can return for this base."""
    return base * (1.0 - sensitivity), min(1.0, base * (1.0 + sensitivity))


def dynamic_ratio(base: float, mean_confidence: torch.Tensor, sensitivity: float) -> torch.Tensor:
    """Low mean confidence keeps more tokens, high fewer; a 0-d tensor, no host sync."""
    lo, hi = dynamic_ratio_range(base, sensitivity)
    ratio = base * (1.0 + sensitivity * (1.0 - 2.0 * mean_confidence.to(torch.float64)))
    return ratio.clamp(min=lo, max=hi)
