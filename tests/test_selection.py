"""Selection rules (docs/semantics.md, "Selection"), on the shared selection module and through the public API."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cggr.functional import cggr_cross_entropy
from cggr.selection import importance_probabilities, select_rows, stratum_shares, token_budget
from helpers import make_batch


@pytest.mark.parametrize("ratio,n,k", [(1.0, 10, 10), (0.3, 10, 3), (0.25, 10, 3), (0.01, 10, 1), (0.5, 0, 0),
                                       (0.1, 30, 3), (1 / 3, 9, 3)])
def test_token_budget(ratio, n, k):
    assert int(token_budget(ratio, torch.tensor(n))) == k


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.9, 0.1])
    valid = torch.tensor([True, True, True, True, True, True])
    mask, _ = select_rows(scores, valid, 0.5, selection="topk")  # k = 3: both 0.9s, then the first 0.5
    assert mask.tolist() == [True, True, False, False, True, False]


def test_nan_scores_rank_hardest_and_invalid_never_selected():
    scores = torch.tensor([0.2, float("nan"), 0.9, 0.95])
    valid = torch.tensor([True, True, True, False])
    mask, _ = select_rows(scores, valid, 0.5, selection="topk")  # 3 valid -> k = 2
    assert mask.tolist() == [False, True, True, False]


def _random_scores(n, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:
        scores = (scores * 4).floor() / 4
    return scores, torch.rand(n, generator=g) > 0.2


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), ratio=st.floats(0.01, 1.0), strata=st.integers(1, 7), seed=st.integers(0, 9999))
def test_stratified_counts_and_shares(n, ratio, strata, seed):
    scores, valid = _random_scores(n, seed, ties=True)
    mask, weight = select_rows(scores, valid, ratio, selection="stratified", num_strata=strata,
                               generator=torch.Generator().manual_seed(seed))
    n_valid = int(valid.sum())
    k = int(token_budget(ratio, torch.tensor(n_valid)))
    assert int(mask.sum()) == k and not (mask & ~valid).any()
    assert torch.equal(weight, mask.double())
    # Rebuild the strata from the hardest-first order and check each one's count.
    order = [i for i in sorted(range(n), key=lambda i: (-scores[i].item(), i)) if valid[i]]
    sizes = [n_valid // strata + (s < n_valid % strata) for s in range(strata)]
    shares = stratum_shares(torch.tensor(k), torch.tensor(sizes)).tolist()
    start = 0
    for size, share in zip(sizes, shares):
        assert sum(bool(mask[i]) for i in order[start:start + size]) == share
        start += size
    assert sum(shares) == k


def test_stratum_shares_by_hand():
    # k=10 over 4 equal strata of 5: 10*4/10=4, 3, 2, 1 -> exact.
    assert stratum_shares(torch.tensor(10), torch.tensor([5, 5, 5, 5])).tolist() == [4, 3, 2, 1]
    # k=5: 2.0, 1.5, 1.0, 0.5 -> floors 2,1,1,0 (sum 4); largest remainders 0.5 tie -> harder stratum.
    assert stratum_shares(torch.tensor(5), torch.tensor([5, 5, 5, 5])).tolist() == [2, 2, 1, 0]
    # Caps: stratum sizes 1,1,1,1 with k=3: 1.2,0.9,0.6,0.3 -> 1,0,0,0 + remainders (.9,.6) -> 1,1,1,0.
    assert stratum_shares(torch.tensor(3), torch.tensor([1, 1, 1, 1])).tolist() == [1, 1, 1, 0]
    # Overflow moves to the hardest strata with room: sizes 1,5,5,5, k=10 -> 4 capped to 1, +3 to stratum 1.
    assert stratum_shares(torch.tensor(10), torch.tensor([1, 5, 5, 5])).tolist() == [1, 5, 3, 1]


def test_stratified_draws_uniformly_inside_a_stratum():
    scores = torch.linspace(1, 0, 40, dtype=torch.float64)
    valid = torch.ones(40, dtype=torch.bool)
    counts = torch.zeros(40)
    for seed in range(300):
        mask, _ = select_rows(scores, valid, 0.25, selection="stratified",
                              generator=torch.Generator().manual_seed(seed))
        counts += mask
    # k=10: stratum 0 (rows 0-9) gets 4 of 10 -> each row 40% of the time.
    first = counts[:10] / 300
    assert (first - 0.4).abs().max() < 0.15 and counts[:10].sum() == 4 * 300


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 6), t=st.integers(1, 12), ratio=st.floats(0.01, 1.0), m=st.integers(0, 3),
       ties=st.booleans(), seed=st.integers(0, 9999))
def test_sequence_aware_coverage(b, t, ratio, m, ties, seed):
    scores, valid = _random_scores(b * t, seed, ties)
    mask, _ = select_rows(scores, valid, ratio, selection="sequence_aware", seq_shape=(b, t),
                          min_tokens_per_sequence=m)
    k = int(token_budget(ratio, valid.sum()))
    hardness = lambda i: (-scores[i].item(), i)  # noqa: E731
    forced = set()
    for seq in range(b):
        rows = range(seq * t, (seq + 1) * t)
        forced.update(sorted((i for i in rows if valid[i]), key=hardness)[:m])
    # The rest of the budget goes to the hardest remaining rows over the batch.
    rest = [i for i in sorted(range(b * t), key=hardness) if valid[i] and i not in forced]
    expected = forced | set(rest[:max(k - len(forced), 0)])
    assert set(torch.nonzero(mask).flatten().tolist()) == expected
    assert int(mask.sum()) == max(k, len(forced))


def test_random_selection_is_seeded_and_uniform():
    logits, targets = make_batch((200,), 5, ignore_frac=0.0)
    masks = [cggr_cross_entropy(logits, targets, 0.1, selection="random", return_info=True,
                                generator=torch.Generator().manual_seed(s))[1].mask for s in (1, 1, 2)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert all(int(m.sum()) == 20 for m in masks)
    counts = torch.zeros(200)
    for s in range(200):
        counts += select_rows(torch.rand(200), torch.ones(200, dtype=torch.bool), 0.1, selection="random",
                              generator=torch.Generator().manual_seed(s))[0]
    # Each row is kept with probability 0.1: 20 expected over 200 draws; the hardest rows are not favoured.
    assert counts.mean() == 20 and counts.std() < 8


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 9999))
def test_importance_probabilities_sum_to_k(n, ratio, seed):
    scores, valid = _random_scores(n, seed)
    n_valid = valid.sum()
    k = token_budget(ratio, n_valid)
    pi = importance_probabilities(scores, valid, k, n_valid, ratio)
    assert (pi[~valid] == 0).all()
    if int(n_valid):
        assert abs(pi.sum().item() - int(k)) <= 1e-4 * int(k)
        assert (pi[valid] >= 0.05 * ratio - 1e-12).all() and (pi <= 1).all()
    if int(k) == int(n_valid):
        assert (pi[valid] == 1).all()


def test_importance_weights_are_inverse_probabilities():
    logits, targets = make_batch((64,), 9, torch.float64, ignore_frac=0.1, seed=2)
    _, info = cggr_cross_entropy(logits, targets, 0.3, selection="importance", return_info=True,
                                 generator=torch.Generator().manual_seed(0))
    valid = targets != -100
    k = token_budget(0.3, valid.sum())
    pi = importance_probabilities(info.difficulty.double(), valid, k, valid.sum(), 0.3)
    torch.testing.assert_close(info.weight[info.mask], 1 / pi[info.mask])
    assert (info.weight[~info.mask] == 0).all()


def test_importance_is_unbiased():
    """Over seeded draws the mean estimate must lie within 4 standard errors of the full mean."""
    logits, targets = make_batch((400,), 50, torch.float64, ignore_frac=0.1, seed=9)
    full = cggr_cross_entropy(logits, targets, 1.0).item()
    estimates = torch.tensor([
        cggr_cross_entropy(logits, targets, 0.2, selection="importance",
                           generator=torch.Generator().manual_seed(s)).item()
        for s in range(400)
    ])
    standard_error = estimates.std().item() / math.sqrt(len(estimates))
    assert abs(estimates.mean().item() - full) < 4 * standard_error
    # And a biased estimator (plain top-k) is far from it: the test can fail.
    topk = cggr_cross_entropy(logits, targets, 0.2, selection="topk").item()
    assert abs(topk - full) > 4 * standard_error


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), ratio=st.floats(0.01, 1.0), seed=st.integers(0, 9999), ties=st.booleans())
def test_importance_keeps_a_fixed_count(n, ratio, seed, ties):
    """Systematic sampling keeps k rows, or k +- 1 where sum pi misses k by its tolerance."""
    scores, valid = _random_scores(n, seed, ties=ties)
    k = int(token_budget(ratio, valid.sum()))
    for draw in range(5):
        mask, weight = select_rows(scores, valid, ratio, selection="importance",
                                   generator=torch.Generator().manual_seed(seed * 7 + draw))
        assert abs(int(mask.sum()) - k) <= 1 and not (mask & ~valid).any()
        assert (weight[~mask] == 0).all() and (weight[mask] >= 1).all()


def test_systematic_sampling_by_hand():
    from cggr.selection import systematic_sample

    pi = torch.tensor([0.5, 0.25, 0.0, 0.75, 0.5], dtype=torch.float64)  # C = .5 .75 .75 1.5 2.0
    assert systematic_sample(pi, torch.tensor(0.0, dtype=torch.float64)).tolist() == [False, False, False, True,
                                                                                       True]
    assert systematic_sample(pi, torch.tensor(0.6, dtype=torch.float64)).tolist() == [True, False, False, True,
                                                                                       False]
    assert systematic_sample(pi, torch.tensor(0.3, dtype=torch.float64)).tolist() == [False, True, False, False,
                                                                                       True]


def test_importance_inclusion_frequencies_are_the_probabilities():
    scores, valid = _random_scores(40, 3)
    k = token_budget(0.3, valid.sum())
    pi = importance_probabilities(scores, valid, k, valid.sum(), 0.3)
    counts = torch.zeros(40, dtype=torch.float64)
    draws = 2000
    for s in range(draws):
        counts += select_rows(scores, valid, 0.3, selection="importance",
                              generator=torch.Generator().manual_seed(s))[0]
    frequency = counts / draws
    # Binomial standard error at most 0.5 / sqrt(2000) ~ 0.011: 5 of them.
    assert (frequency - pi).abs().max() < 0.056
    assert (frequency[~valid] == 0).all()
