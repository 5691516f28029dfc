"""The reference backend against F.cross_entropy, float64 autograd and the formulas of docs/semantics.md."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cggr.functional import cggr_cross_entropy
from cggr.scoring import SCORINGS
from cggr.selection import SELECTIONS
from helpers import loss_and_grad, make_batch, scoring_options

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3, 1.0])
def test_ratio_one_topk_equals_cross_entropy(dtype, reduction, smoothing, ignore_frac):
    logits, targets = make_batch((3, 7), 13, dtype, ignore_frac=ignore_frac)
    loss, grad, _ = loss_and_grad(logits, targets, 1.0, reduction=reduction, label_smoothing=smoothing)
    # F.cross_entropy on the float32/64 upcast: our arithmetic is float32 for bf16 inputs.
    x = logits.detach().to(torch.float64).requires_grad_(True)
    ref = F.cross_entropy(x.flatten(0, 1), targets.flatten(), reduction=reduction, label_smoothing=smoothing)
    if reduction == "none":
        ref = ref.view(3, 7)
    ref.sum().backward()
    expected_dtype = dtype if dtype != torch.bfloat16 else torch.float32
    assert loss.dtype == expected_dtype and grad.dtype == dtype
    if ignore_frac == 1.0 and reduction == "mean":
        assert loss.item() == 0.0  # F.cross_entropy gives NaN here; an empty selection is 0
    else:
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=TOL[dtype], atol=TOL[dtype])
    tol = 1e-2 if dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(grad.double(), x.grad, rtol=tol, atol=tol)


def test_z_loss_adds_lse_squared():
    logits, targets = make_batch((10,), 9, torch.float64, ignore_frac=0.0)
    loss, grad, _ = loss_and_grad(logits, targets, 1.0, z_loss=1e-2, reduction="sum")
    x = logits.clone().requires_grad_(True)
    ref = (F.cross_entropy(x, targets, reduction="none") + 1e-2 * torch.logsumexp(x, -1) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, x.grad)


@pytest.mark.parametrize("scoring,selection", list(itertools.product(SCORINGS, SELECTIONS)))
def test_gradcheck_selected_rows_and_zero_elsewhere(scoring, selection):
    logits, targets = make_batch((3, 6), 7, torch.float64, ignore_frac=0.2, seed=1)

    def fn(x):
        gen = torch.Generator().manual_seed(5)  # same selection for every perturbed call
        return cggr_cross_entropy(x, targets, 0.4, selection=selection, generator=gen,
                                  label_smoothing=0.05, z_loss=1e-3, **scoring_options(scoring, targets))

    x = logits.clone().requires_grad_(True)
    if selection != "importance":  # 1/pi moves with x but is stop-gradient: finite differences see it
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    fn(x).backward()
    gen = torch.Generator().manual_seed(5)
    _, info = cggr_cross_entropy(logits, targets, 0.4, selection=selection, generator=gen,
                                 return_info=True, **scoring_options(scoring, targets))
    assert (x.grad[~info.mask] == 0).all()
    assert (x.grad[info.mask].abs().sum(-1) > 0).all()
    # float64 autograd of the per-row loss with the selection and weights held fixed.
    y = logits.clone().requires_grad_(True)
    safe = targets.clamp(min=0)
    rows = (F.cross_entropy(y.flatten(0, 1), safe.flatten(), reduction="none", label_smoothing=0.05)
            + 1e-3 * torch.logsumexp(y, -1).flatten() ** 2)
    denominator = info.n_valid if selection == "importance" else info.n_selected
    (torch.where(info.mask.flatten(), info.weight.flatten() * rows, 0).sum() / denominator).backward()
    torch.testing.assert_close(x.grad, y.grad)


def _scores_by_hand(x, y, scoring, reference=None):
    """The difficulty scores written out for one row."""
    p = torch.softmax(x, -1)
    top = p.topk(2).values
    entropy = -(p * torch.log(p)).sum()
    entropy_score = (entropy / math.log(x.numel()) - top[0] + 1) / 2
    margin = 1 - (top[0] - top[1])
    loss = 1 - p[y]
    onehot = F.one_hot(torch.tensor(y), x.numel()).double()
    if scoring == "excess":
        return 1 / (1 + torch.exp(torch.log(p[y]) + reference))
    return {"entropy": entropy_score, "margin": margin, "loss": loss,
            "combined": (entropy_score + margin + loss) / 3,
            "gradnorm": torch.linalg.vector_norm(p - onehot) / math.sqrt(2)}[scoring]


@pytest.mark.parametrize("scoring", SCORINGS)
def test_difficulty_formulas(scoring):
    logits, targets = make_batch((8,), 11, torch.float64, ignore_frac=0.0, seed=3)
    options = scoring_options(scoring, targets)
    _, info = cggr_cross_entropy(logits, targets, 1.0, return_info=True, **options)
    for i in range(8):
        reference = options["reference_loss"][i] if scoring == "excess" else None
        expected = _scores_by_hand(logits[i], int(targets[i]), scoring, reference)
        assert abs(info.difficulty[i].item() - expected.item()) < 1e-10
        assert 0.0 <= info.difficulty[i].item() <= 1.0


def test_equal_maxima_give_zero_margin():
    logits = torch.tensor([[2.0, 2.0, 0.0, -1.0]])
    _, info = cggr_cross_entropy(logits, torch.tensor([2]), 1.0, scoring="margin", return_info=True)
    assert info.difficulty.item() == pytest.approx(1.0)


def test_info_fields_and_full_loss():
    logits, targets = make_batch((4, 5), 17, torch.float64, ignore_frac=0.3, seed=4)
    loss, info = cggr_cross_entropy(logits, targets, 0.5, selection="topk", return_info=True)
    valid = targets != -100
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(4, 5)
    for name in ("mask", "weight", "difficulty", "confidence", "entropy", "nll"):
        field = getattr(info, name)
        assert field.shape == targets.shape
        assert (field[~valid] == 0).all(), name
    torch.testing.assert_close(info.nll, ce)
    torch.testing.assert_close(info.full_loss, ce[valid].mean())
    torch.testing.assert_close(info.confidence[valid], torch.softmax(logits, -1).amax(-1)[valid])
    assert int(info.n_valid) == int(valid.sum()) and int(info.n_selected) == int(info.mask.sum())
    assert float(info.ratio) == 0.5
    torch.testing.assert_close(loss, ce[info.mask].mean())


def test_all_ignored_gives_zero_and_zero_grad():
    for reduction in ("mean", "sum", "none"):
        for selection in SELECTIONS:
            logits, targets = make_batch((2, 4), 5, ignore_frac=1.0)
            loss, grad, info = loss_and_grad(logits, targets, 0.5, reduction=reduction, selection=selection)
            assert (loss == 0).all() and not torch.isnan(loss).any()
            assert (grad == 0).all() and int(info.n_selected) == 0


def test_nan_and_inf_rows_rank_hardest_and_give_nan():
    logits, targets = make_batch((12,), 6, ignore_frac=0.0, seed=6)
    logits[3, 2] = float("nan")
    logits[7, 1] = float("inf")
    loss, grad, info = loss_and_grad(logits, targets, 0.2, selection="topk")  # k = 3
    assert info.mask[3] and info.mask[7]
    assert torch.isnan(loss)
    assert (grad[~info.mask] == 0).all()


def test_neg_inf_entries_are_legal():
    logits, targets = make_batch((6,), 8, ignore_frac=0.0, seed=7)
    logits[:, 0] = float("-inf")
    targets = targets.clamp(min=1)
    loss, grad, info = loss_and_grad(logits, targets, 1.0, reduction="none")
    ref = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(loss, ref)
    assert torch.isfinite(grad).all() and (grad[:, 0] == 0).all()
    assert torch.isfinite(info.entropy).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), ratio=st.floats(0.01, 1.0), smoothing=st.sampled_from([0.0, 0.2]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 10**6))
def test_topk_mask_and_loss_against_a_sort(n, ratio, smoothing, reduction, seed):
    logits, targets = make_batch((n,), 6, torch.float64, ignore_frac=0.3, seed=seed)
    loss, info = cggr_cross_entropy(logits, targets, ratio, scoring="loss", selection="topk", reduction=reduction,
                                    label_smoothing=smoothing, return_info=True)
    valid = targets != -100
    n_valid = int(valid.sum())
    k = max(1, math.ceil(ratio * n_valid - 1e-6)) if n_valid else 0
    order = sorted(range(n), key=lambda i: (-info.difficulty[i].item(), i))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[[i for i in order if valid[i]][:k]] = True
    assert torch.equal(info.mask, expected)
    per_row = F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)
    kept = torch.where(expected, per_row, torch.zeros_like(per_row))
    want = {"none": kept, "sum": kept.sum(), "mean": kept.sum() / max(k, 1)}[reduction]
    torch.testing.assert_close(loss, want)


@settings(max_examples=25, deadline=None)
@given(selection=st.sampled_from(SELECTIONS), reduction=st.sampled_from(["mean", "sum"]),
       scoring=st.sampled_from(["gradnorm", "combined", "excess"]), ratio=st.sampled_from([0.3, 1.0]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), upstream=st.sampled_from([1.0, 2.5, 1 / 3]),
       backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 99))
def test_gradient_formed_in_the_forward_equals_the_backward_one(selection, reduction, scoring, ratio, dtype, upstream,
                                                                backend, seed):
    """Small logits get their gradient in the forward and the backward scales it; larger ones get
    it in the backward. Both give the same gradient for any upstream gradient, and a second
    backward (retain_graph) gives it again."""
    import cggr.ops.autograd as autograd

    logits, targets = make_batch((2, 9), 11, dtype, seed=seed)
    kw = dict(selection=selection, reduction=reduction, backend=backend, **scoring_options(scoring, targets, seed))
    grads = []
    for limit in (1 << 27, 0):  # in the forward, then in the backward
        original, autograd._GRAD_NOW_MAX_ELEMENTS = autograd._GRAD_NOW_MAX_ELEMENTS, limit
        try:
            x = logits.clone().requires_grad_(True)
            loss = cggr_cross_entropy(x, targets, ratio, generator=torch.Generator().manual_seed(seed), **kw)
            (upstream * loss).backward(retain_graph=True)
            first = x.grad.clone()
            x.grad = None
            (upstream * loss).backward()
            torch.testing.assert_close(x.grad, first)
            grads.append(first)
        finally:
            autograd._GRAD_NOW_MAX_ELEMENTS = original
    torch.testing.assert_close(grads[0], grads[1])
