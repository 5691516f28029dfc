"""Which valid rows carry loss (SPEC.md §4). Device-side only: no host sync.

All functions take flat ``[N]`` tensors: ``scores`` (float, NaN = hardest) and
``valid`` (bool), and return ``(mask [N] bool, weight [N] float)``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

SELECTIONS = ("topk", "stratified", "sequence_aware", "random", "importance")

Ratio = Union[float, torch.Tensor]

_IMPORTANCE_MIN_SCORE = 1e-6  # keeps c finite when a score is exactly 0
_IMPORTANCE_GRID = 33  # candidate values of c per refinement round
_IMPORTANCE_ROUNDS = 6  # 32**6 ~ 1e9-fold narrowing of log(c): far below 1e-4 relative


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


def _uniform(n: int, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(n, device=device, dtype=torch.float64, generator=generator)


def select_topk(scores, valid, k):
    # Invalid rows rank after every valid one and k <= n_valid, so the rank alone decides.
    mask = hardness_rank(scores, valid) < k
    return mask, mask.to(scores.dtype)


def select_random(scores, valid, k, generator):
    key = _uniform(scores.numel(), scores.device, generator)
    # Among valid rows a uniformly random key order is a uniformly random subset.
    mask = valid & (hardness_rank(key, valid) < k)
    return mask, mask.to(scores.dtype)


def stratum_shares(k: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Rows to draw from each stratum (hardest first), summing to k; see SPEC.md §4."""
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
    # Inside a stratum, a random key order picks a uniform subset of the wanted size.
    key = stratum.to(torch.float64) + _uniform(scores.numel(), scores.device, generator)
    position = _inverse_permutation(torch.sort(key, stable=True).indices)
    starts = torch.cumsum(sizes, 0) - sizes
    padded_shares = torch.cat([shares, shares.new_zeros(1)])
    padded_starts = torch.cat([starts, n_valid.reshape(1)])
    in_stratum = position - padded_starts[stratum]
    mask = valid & (in_stratum < padded_shares[stratum])
    return mask, mask.to(scores.dtype)


def select_sequence_aware(scores, valid, k, seq_shape, min_tokens_per_sequence):
    batch, seq_len = seq_shape
    per_seq_rank = hardness_rank(scores.view(batch, seq_len), valid.view(batch, seq_len))
    forced = valid & (per_seq_rank.reshape(-1) < min_tokens_per_sequence)
    extra_budget = (k - forced.sum()).clamp(min=0)
    rest = valid & ~forced
    extra = rest & (hardness_rank(scores, rest) < extra_budget)
    mask = forced | extra
    return mask, mask.to(scores.dtype)


def importance_probabilities(scores, valid, k, n_valid, ratio) -> torch.Tensor:
    """pi_i = clamp(c * score_i, pi_min, 1) with c found so that sum pi = k (0 on invalid rows)."""
    dtype = torch.float64
    s = torch.nan_to_num(scores.to(dtype), nan=1.0).clamp(min=_IMPORTANCE_MIN_SCORE)
    s = torch.where(valid, s, torch.zeros_like(s))
    pi_min = 0.05 * ratio_tensor(ratio, scores.device)
    kf = k.to(dtype)

    def clamp_pi(raw: torch.Tensor) -> torch.Tensor:
        # maximum() with the 0-d device tensor: clamp(min=tensor, max=float) would copy the
        # float to the device from the host (a sync).
        return torch.maximum(raw, pi_min).clamp_(max=1.0)

    def expected_count(c: torch.Tensor) -> torch.Tensor:  # c: [G] -> [G]
        pi = clamp_pi(c[:, None] * s[None, :])
        return torch.where(valid[None, :], pi, torch.zeros_like(pi)).sum(dim=1)

    # sum pi is non-decreasing in c; refine log(c) on a grid, keeping the bracket around k.
    lo = torch.full((), -30.0, dtype=dtype, device=scores.device)
    hi = torch.full((), 1.0 - math.log(_IMPORTANCE_MIN_SCORE), dtype=dtype, device=scores.device)
    steps = torch.linspace(0.0, 1.0, _IMPORTANCE_GRID, dtype=dtype, device=scores.device)
    for _ in range(_IMPORTANCE_ROUNDS):
        grid = lo + (hi - lo) * steps
        below = expected_count(torch.exp(grid)) < kf
        last_below = below.sum().clamp(min=1, max=_IMPORTANCE_GRID - 1) - 1
        # index_select, not grid[t]: indexing with a 0-d tensor reads it on the host (a sync).
        lo, hi = grid.index_select(0, torch.stack([last_below, last_below + 1])).unbind()
    pi = clamp_pi(torch.exp(hi) * s)
    pi = torch.where(k >= n_valid, torch.ones_like(pi), pi)
    return torch.where(valid, pi, torch.zeros_like(pi))


def select_importance(scores, valid, k, n_valid, ratio, generator):
    pi = importance_probabilities(scores, valid, k, n_valid, ratio)
    mask = valid & (_uniform(scores.numel(), scores.device, generator) < pi)
    weight = torch.where(mask, 1.0 / pi.clamp(min=1e-30), torch.zeros_like(pi))
    return mask, weight.to(scores.dtype)


def select_rows(
    scores: torch.Tensor,
    valid: torch.Tensor,
    ratio: Ratio,
    *,
    selection: str = "topk",
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
