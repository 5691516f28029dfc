"""Per-row statistics and the formulas built on them (docs/semantics.md: statistics,
scores, per-row loss).

Every backend produces a :class:`RowStats`; everything after that (difficulty
scores, per-row loss, selection, reduction) is computed here, once, in torch. The Triton
kernels repeat :func:`transform_logits`, :func:`difficulty` and :func:`row_loss` in their
epilogues; the tests hold them to these.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SCORINGS = ("entropy", "margin", "loss", "combined", "gradnorm", "excess")


class _Column:
    """A :class:`RowStats` field of a statistics block: a view of the block's column, made on
    first access (a call needs only two or three of the nine; each view costs host time)."""

    def __init__(self, index: int):
        self.index = index

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, stats, owner=None):
        if stats is None:
            return self
        value = stats.block[:, self.index]
        stats.__dict__[self.name] = value  # shadows this descriptor from now on
        return value


class RowStats:
    """One value per row, float32 (float64 for float64 logits), 0 on invalid rows.

    A row holding NaN or +inf has every field NaN. ``score`` and ``loss`` depend on the
    options (scoring, label smoothing, z-loss); :func:`with_score_and_loss` defines them.
    Built from the fields (``RowStats(lse, target_logit, ...)``) or from an ``[N, 9]`` block of
    them (:meth:`from_columns`), whose columns become fields when first read.
    """

    _fields = ("lse", "target_logit", "entropy", "max_prob", "second_prob", "sum_sq_other_prob", "sum_logits",
               "score", "loss")
    lse = _Column(0)  # logsumexp(x)
    target_logit = _Column(1)  # x[y]
    entropy = _Column(2)  # H = -sum p log p, nats
    max_prob = _Column(3)  # p1
    second_prob = _Column(4)  # p2 (== p1 when the maximum is shared)
    sum_sq_other_prob = _Column(5)  # sum over j != y of p_j^2 (gradnorm without cancellation)
    sum_logits = _Column(6)  # sum x
    score = _Column(7)  # difficulty, see difficulty()
    loss = _Column(8)  # per-row loss l_i, see row_loss()

    def __init__(self, *values: torch.Tensor, **named: torch.Tensor):
        fields = dict(zip(self._fields, values), **named)
        if len(values) > len(self._fields) or set(fields) != set(self._fields):
            raise TypeError(f"RowStats needs exactly the fields {self._fields}")
        self.__dict__.update(fields)
        self.block = None  # no [N, 9] block: the fields are separate tensors

    @classmethod
    def from_columns(cls, columns: torch.Tensor) -> "RowStats":
        """The statistics held by an ``[N, 9]`` tensor (fields in declaration order)."""
        stats = cls.__new__(cls)
        stats.block = columns
        return stats

    def __iter__(self):
        return (getattr(self, name) for name in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def _replace(self, **changes: torch.Tensor) -> "RowStats":
        return RowStats(**{name: changes.get(name, getattr(self, name)) for name in self._fields})

    def columns(self) -> torch.Tensor:
        """The ``[N, 9]`` tensor of the fields: the block itself where there is one, else a
        stacked copy."""
        return self.block if self.block is not None else torch.stack(tuple(self), 1)


def transform_logits(x: torch.Tensor, logit_scale: float, logit_softcap) -> torch.Tensor:
    """The logits every formula sees: ``x * logit_scale``, then ``c * tanh(x / c)`` for a
    softcap ``c`` (None: no cap)."""
    if logit_scale != 1.0:
        x = x * logit_scale
    if logit_softcap is not None:
        x = torch.tanh(x / logit_softcap) * logit_softcap
    return x


def transform_slope(transformed: torch.Tensor, logit_scale: float, logit_softcap) -> torch.Tensor:
    """d transformed / d x, from the transformed logits: ``scale * (1 - (t / c)^2)``."""
    if logit_softcap is None:
        return torch.full_like(transformed, logit_scale)
    return (1.0 - (transformed / logit_softcap).square()) * logit_scale


def scoring_reads(scoring: str):
    """(second_prob, sum_sq_other_prob, entropy): which optional fields ``scoring`` reads; a
    backend may leave the others 0 (the entropy only where no caller asks for it either)."""
    return scoring in ("margin", "combined"), scoring == "gradnorm", scoring in ("entropy", "combined")


def nll(stats: RowStats) -> torch.Tensor:
    return stats.lse - stats.target_logit


def target_miss(stats: RowStats) -> torch.Tensor:
    """1 - p_y, computed as -expm1(x_y - lse): exact even when p_y is close to 1."""
    return -torch.expm1(stats.target_logit - stats.lse)


def excess_score(nll_: torch.Tensor, reference_loss: torch.Tensor) -> torch.Tensor:
    """sigmoid(nll - reference loss): high where this model is wrong and the reference right."""
    return torch.sigmoid(nll_ - reference_loss.to(nll_.dtype))


def difficulty(stats: RowStats, scoring: str, vocab_size: int,
               reference_loss: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Difficulty score in [0, 1], higher = harder. NaN rows stay NaN. ``reference_loss``
    ([N], needed by ``'excess'``) is each row's loss under a reference model."""
    if scoring == "excess":
        return excess_score(nll(stats), reference_loss)
    if scoring == "gradnorm":
        # ||p - onehot(y)||^2 = sum p^2 - 2 p_y + 1 = (1 - p_y)^2 + sum_{j != y} p_j^2; the second
        # form does not cancel when p_y is near 1, where the score is near 0.
        sq = target_miss(stats).square() + stats.sum_sq_other_prob
        return (torch.sqrt(sq) / math.sqrt(2.0)).clamp(0.0, 1.0)
    parts = {
        "entropy": lambda: (stats.entropy / math.log(vocab_size) - stats.max_prob + 1.0) / 2.0,
        "margin": lambda: 1.0 - (stats.max_prob - stats.second_prob),
        "loss": lambda: target_miss(stats),
    }
    if scoring == "combined":
        score = (parts["entropy"]() + parts["margin"]() + parts["loss"]()) / 3.0
    else:
        score = parts[scoring]()
    return score.clamp(0.0, 1.0)


def row_loss(stats: RowStats, label_smoothing: float, z_loss: float, vocab_size: int) -> torch.Tensor:
    """Per-row loss l_i = (1-eps) nll + eps (lse - sum x / V) + z lse^2."""
    loss = nll(stats)
    # Terms are added only when their factor is non-zero: 0 * inf would turn a legal
    # -inf logit into a NaN loss.
    if label_smoothing:
        smooth = stats.lse - stats.sum_logits / vocab_size
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth
    if z_loss:
        loss = loss + z_loss * stats.lse.square()
    return loss


def with_score_and_loss(stats: RowStats, valid: torch.Tensor, scoring: str, label_smoothing: float,
                        z_loss: float, vocab_size: int, reference_loss: Optional[torch.Tensor] = None) -> RowStats:
    """``stats`` with ``score`` and ``loss`` filled in (0 on invalid rows). The Triton kernel
    computes the same two fields in its epilogue."""
    return stats._replace(
        score=torch.where(valid, difficulty(stats, scoring, vocab_size, reference_loss), 0.0),
        loss=torch.where(valid, row_loss(stats, label_smoothing, z_loss, vocab_size), 0.0),
    )
