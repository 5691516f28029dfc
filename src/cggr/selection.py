"""Which valid rows carry loss (docs/semantics.md, "Selection"). Device-side only: no host sync.

All functions take flat ``[N]`` tensors: ``scores`` (float, NaN = hardest) and
``valid`` (bool), and return ``(mask [N] bool, weight [N] float)``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

SELECTIONS = ("topk", "stratified", "sequence_aware", "random", "importance")

Ratio = Union[float, torch.Tensor]

_IMPORTANCE_MIN_SCORE = 1e-6  # keeps c finite when a score is exactly 0


def ratio_tensor(ratio: Ratio, device: torch.device) -> torch.Tensor:
    """The ratio as a float64 0-d device tensor. A Python float is filled in on the device:
    ``torch.as_tensor(float, device='cuda')`` would be a blocking host-to-device copy."""
    if isinstance(ratio, torch.Tensor):
        return ratio.to(device=device, dtype=torch.float64)
    return torch.full((), ratio, dtype=torch.float64, device=device)


def token_budget(ratio: Ratio, n_valid: torch.Tensor) -> torch.Tensor:
    """k = max(1, ceil(ratio * n_valid - 1e-6)) in float64, 0 when n_valid == 0. int64 0-d."""
    n = n_valid.to(torch.float64)
    scaled = n * (ratio if isinstance(ratio, float) else ratio.to(torch.float64))
    k = (scaled - 1e-6).ceil_().clamp_(min=1.0)
    # min(., n) is 0 when there is no valid row, and guards a device ratio (not range-checked).
    return torch.minimum(k, n).to(torch.int64)


def hardness_rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each row along the last dim, 0 = hardest. Valid rows rank before invalid ones;
    NaN ranks hardest; equal scores go to the lower row index (stable sort)."""
    order = torch.sort(_ranking_key(scores, valid), dim=-1, descending=True, stable=True).indices
    return _inverse_permutation(order)


def _ranking_key(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores lie in [0, 1]: NaN becomes +inf (hardest) and invalid rows -inf (last)."""
    return torch.where(valid, torch.nan_to_num(scores, nan=float("inf")), float("-inf"))


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """Inverse of each permutation along the last dim."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


class SharedDraws:
    """Stands in for a generator when several processes select over one global batch: each
    draw is replaced by the first process's (``share`` broadcasts it), so all of them keep the
    same rows, those a single process with that generator would keep."""

    def __init__(self, generator: Optional[torch.Generator], share) -> None:
        self.generator, self.share = generator, share


def _draw(make, generator):
    if isinstance(generator, SharedDraws):
        return generator.share(make(generator.generator))
    return make(generator)


def _uniform(shape, device: torch.device, generator) -> torch.Tensor:
    return _draw(lambda g: torch.rand(shape, device=device, dtype=torch.float64, generator=g), generator)


def random_keys(n: int, device: torch.device, generator) -> torch.Tensor:
    """``[n]`` int32 keys uniform in [0, 2**31): ranking rows by them (ties to the lower index,
    which are rare) draws a uniformly random subset. Every backend draws the same keys from the
    same generator, so it keeps the same rows."""
    return _draw(lambda g: torch.randint(0, 2**31 - 1, (n,), device=device, dtype=torch.int32, generator=g),
                 generator)


def select_topk(scores, valid, k):
    # Invalid rows rank after every valid one and k <= n_valid, so the rank alone decides.
    mask = hardness_rank(scores, valid) < k
    return mask, mask.to(scores.dtype)


def select_random(scores, valid, k, generator):
    key = random_keys(scores.numel(), scores.device, generator).to(torch.float64)
    mask = valid & (hardness_rank(key, valid) < k)
    return mask, mask.to(scores.dtype)


def stratum_shares(k: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Rows to draw from each stratum (hardest first), summing to k: shares proportional to the
    weights S, S-1, ..., 1 by largest remainder (ties to the harder stratum), capped by each
    stratum's size, what a cap removes going to the hardest strata with room."""
    num_strata = sizes.numel()
    strata = torch.arange(num_strata, device=sizes.device)
    w = num_strata - strata  # S, S-1, ..., 1
    total_w = num_strata * (num_strata + 1) // 2
    exact = k * w  # share = exact / total_w
    share = exact // total_w
    remainder = exact - share * total_w
    leftover = k - share.sum()
    # Largest remainder first, ties to the harder (lower) stratum.
    order = torch.sort(-remainder, stable=True).indices
    bonus = (_inverse_permutation(order) < leftover).to(share.dtype)
    share = share + bonus
    capped = torch.minimum(share, sizes)
    excess = (share - capped).sum()
    room = sizes - capped
    room_before = torch.cumsum(room, 0) - room
    return capped + (excess - room_before).clamp(min=0).minimum(room)


def select_stratified(scores, valid, k, n_valid, num_strata, generator):
    rank = hardness_rank(scores, valid)
    q = n_valid // num_strata
    r = n_valid - q * num_strata
    strata = torch.arange(num_strata, device=scores.device)
    sizes = q + (strata < r).to(q.dtype)
    big = r * (q + 1)  # rows in the first r (larger) strata
    stratum = torch.where(rank < big, rank // (q + 1), r + (rank - big) // q.clamp(min=1))
    stratum = torch.where(valid, stratum, num_strata)
    shares = stratum_shares(k, sizes)
    # Inside a stratum the rows of largest random key (ties to the lower index) are a uniform
    # subset of the wanted size: order by stratum, then key descending, then index (stable).
    key = random_keys(scores.numel(), scores.device, generator).to(torch.int64)
    position = _inverse_permutation(torch.sort(stratum * 2**32 - key, stable=True).indices)
    starts = torch.cumsum(sizes, 0) - sizes
    padded_shares = torch.cat([shares, shares.new_zeros(1)])
    padded_starts = torch.cat([starts, n_valid.reshape(1)])
    in_stratum = position - padded_starts[stratum]
    mask = valid & (in_stratum < padded_shares[stratum])
    return mask, mask.to(scores.dtype)


def forced_rows(scores, valid, seq_shape, min_tokens_per_sequence: int) -> torch.Tensor:
    """``[N]`` bool: each sequence's ``min(m, its n_valid)`` hardest valid rows, ties to the lower
    index, NaN hardest (the rows ``sequence_aware`` keeps whatever the budget)."""
    batch, seq_len = seq_shape
    if min_tokens_per_sequence == 0 or scores.numel() == 0:
        return torch.zeros_like(valid)
    if min_tokens_per_sequence == 1:  # argmax returns the first of equal maxima: no sort needed
        hardest = _ranking_key(scores, valid).view(batch, seq_len).argmax(dim=1, keepdim=True)
        first = torch.zeros((batch, seq_len), dtype=torch.bool, device=valid.device).scatter_(1, hardest, True)
        return valid & first.view(-1)
    per_seq_rank = hardness_rank(scores.view(batch, seq_len), valid.view(batch, seq_len))
    return valid & (per_seq_rank.reshape(-1) < min_tokens_per_sequence)


def select_sequence_aware(scores, valid, k, seq_shape, min_tokens_per_sequence):
    forced = forced_rows(scores, valid, seq_shape, min_tokens_per_sequence)
    extra_budget = (k - forced.sum()).clamp(min=0)
    rest = valid & ~forced
    extra = rest & (hardness_rank(scores, rest) < extra_budget)
    mask = forced | extra
    return mask, mask.to(scores.dtype)


def importance_probabilities(scores, valid, k, n_valid, ratio) -> torch.Tensor:
    """pi_i = clamp(c * s_i, pi_min, 1) on valid rows (0 elsewhere), with c such that sum pi = k.

    ``s`` is the score in float64, NaN as 1 and at least 1e-6 (so c stays finite). sum pi is a
    continuous, non-decreasing, piecewise-linear function of c whose breakpoints are
    ``pi_min / s_i`` and ``1 / s_i``; it is evaluated at every breakpoint (from the sorted scores
    and their prefix sums), and c is interpolated between the two breakpoints that bracket k,
    where it is linear: an exact solution with one sort and no loop.
    """
    dtype = torch.float64
    if scores.numel() == 0:
        return scores.new_zeros(0, dtype=dtype)
    s = torch.nan_to_num(scores.to(dtype), nan=1.0).clamp(min=_IMPORTANCE_MIN_SCORE)
    pi_min = 0.05 * ratio_tensor(ratio, scores.device)
    kf, n = k.to(dtype), n_valid.to(dtype)
    ascending = torch.sort(torch.where(valid, s, float("inf"))).values  # invalid rows last, as +inf
    prefix = torch.cat([ascending.new_zeros(1), torch.cumsum(torch.where(ascending.isinf(), 0.0, ascending), 0)])

    def total(c: torch.Tensor) -> torch.Tensor:
        """sum pi at each c [M] (positive, finite)."""
        floored = torch.searchsorted(ascending, pi_min / c, right=True)  # rows with c * s <= pi_min
        below_one = torch.searchsorted(ascending, 1.0 / c)  # rows with c * s < 1
        floored = torch.minimum(floored, below_one)
        middle = prefix[below_one] - prefix[floored]
        return (n - below_one.to(dtype)) + pi_min * floored.to(dtype) + c * middle

    breaks = torch.cat([pi_min / s, 1.0 / s])
    breaks = torch.where(torch.cat([valid, valid]), breaks, float("inf"))
    sums = total(breaks.clamp(max=torch.finfo(dtype).max))
    # The bracket [c_lo, c_hi] holds no other breakpoint, so sum pi is linear on it.
    c_lo = torch.where(sums <= kf, breaks, 0.0).max()
    c_hi = torch.where(sums >= kf, breaks, float("inf")).min()
    at_lo, at_hi = total(torch.stack([c_lo, c_hi]).clamp(min=1e-300, max=torch.finfo(dtype).max)).unbind()
    step = torch.where(at_hi > at_lo, (kf - at_lo) / (at_hi - at_lo), 0.0)
    c = c_lo + step * (c_hi - c_lo)
    pi = torch.maximum(c * s, pi_min).clamp_(max=1.0)
    pi = torch.where(k >= n_valid, 1.0, pi)
    return torch.where(valid, pi, 0.0)


def systematic_sample(pi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows kept by systematic sampling in row order: with C_i the running sum of ``pi``
    (float64, 0 before the first row), row i is kept iff floor(C_i + u) > floor(C_{i-1} + u).
    Each row is kept with probability pi_i (rows with pi_i = 1 always); the count is
    floor(C_N + u)."""
    running = torch.cumsum(pi, 0)
    before = torch.cat([running.new_zeros(1), running[:-1]])
    return (pi >= 1.0) | ((running + u).floor() > (before + u).floor())


def select_importance(scores, valid, k, n_valid, ratio, generator):
    pi = importance_probabilities(scores, valid, k, n_valid, ratio)
    mask = valid & systematic_sample(pi, _uniform((), scores.device, generator))
    weight = torch.where(mask, 1.0 / pi.clamp(min=1e-30), 0.0)
    return mask, weight.to(scores.dtype)


def select_rows(
    scores: torch.Tensor,
    valid: torch.Tensor,
    ratio: Ratio,
    *,
    selection: str = "importance",
    seq_shape: Optional[tuple] = None,
    num_strata: int = 4,
    min_tokens_per_sequence: int = 1,
    generator: Optional[torch.Generator] = None,
    n_valid: Optional[torch.Tensor] = None,
):
    """Choose the rows that carry loss.

    Args:
        scores: ``[N]`` float difficulty (higher = harder, NaN = hardest).
        valid: ``[N]`` bool, rows whose target is not ``ignore_index``.
        ratio: float in (0, 1] or a 0-d tensor.
        seq_shape: ``(B, T)`` for ``sequence_aware``.
        n_valid: ``valid.sum()`` if the caller has it already.

    Returns:
        ``(mask, weight)``: ``[N]`` bool and ``[N]`` float (0 where not selected;
        ``1 / pi`` for ``importance``, else 1).
    """
    n_valid = valid.sum() if n_valid is None else n_valid
    k = token_budget(ratio, n_valid)
    if selection == "topk":
        return select_topk(scores, valid, k)
    if selection == "random":
        return select_random(scores, valid, k, generator)
    if selection == "stratified":
        return select_stratified(scores, valid, k, n_valid, num_strata, generator)
    if selection == "sequence_aware":
        return select_sequence_aware(scores, valid, k, seq_shape, min_tokens_per_sequence)
    if selection == "importance":
        return select_importance(scores, valid, k, n_valid, ratio, generator)
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
