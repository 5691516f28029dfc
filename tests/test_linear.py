"""cggr_linear_cross_entropy against cggr_cross_entropy(hidden @ weight.T + bias)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cggr.core import LossOptions
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy
from cggr.ops import autograd, get_backend
from cggr.selection import SELECTIONS

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _problem(dtype=torch.float64, bias=True, seed=0, vocab=37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 8, 6, generator=g, dtype=dtype)
    weight = torch.randn(vocab, 6, generator=g, dtype=dtype)
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    targets = torch.randint(0, vocab, (3, 8), generator=g)
    targets[0, :3] = -100
    return hidden, weight, b, targets


def _grads(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]
    loss = fn(*leaves)
    loss.sum().backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("reduction,ratio", [("mean", 0.3), ("none", 0.3), ("mean", 1.0), ("sum", 1.0),
                                             ("none", 1.0)])
def test_linear_matches_plain_path(backend, selection, reduction, ratio):
    hidden, weight, bias, targets = _problem()
    kw = dict(selection=selection, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, backend=backend)

    def linear(h, w, b):
        return cggr_linear_cross_entropy(h, w, targets, ratio, bias=b, chunk_size=5,
                                         generator=torch.Generator().manual_seed(2), **kw)

    def plain(h, w, b):
        return cggr_cross_entropy(h @ w.T + b, targets, ratio, generator=torch.Generator().manual_seed(2), **kw)

    loss_l, grads_l = _grads(linear, hidden, weight, bias)
    loss_p, grads_p = _grads(plain, hidden, weight, bias)
    if reduction != "none":  # an upstream gradient other than 1 must scale every gradient
        _, grads_l3 = _grads(lambda *a: 3.0 * linear(*a), hidden, weight, bias)
        for a, b in zip(grads_l3, grads_p):
            torch.testing.assert_close(a, 3.0 * b)
    torch.testing.assert_close(loss_l, loss_p)
    for a, b in zip(grads_l, grads_p):
        torch.testing.assert_close(a, b)


def _seeded():
    """The same draws for the two paths compared (importance, the default, samples)."""
    return torch.Generator().manual_seed(0)


def test_linear_without_bias_float32_and_gradient_accumulation():
    hidden, weight, _, targets = _problem(torch.float32, bias=False, seed=1)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    for _ in range(2):  # weight.grad accumulates like any parameter's
        cggr_linear_cross_entropy(h, w, targets, 0.5, chunk_size=7, fp32_grad_accumulation=True,
                                  generator=_seeded()).backward()
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    (2 * cggr_cross_entropy(h2 @ w2.T, targets, 0.5, generator=_seeded())).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-5)


def test_tied_weight_gets_both_gradients():
    vocab, dim = 29, 8
    embedding = torch.nn.Embedding(vocab, dim)
    tokens = torch.randint(0, vocab, (2, 7))
    targets = torch.randint(0, vocab, (2, 7))
    hidden = torch.tanh(embedding(tokens))
    cggr_linear_cross_entropy(hidden, embedding.weight, targets, 0.5, generator=_seeded()).backward()
    got = embedding.weight.grad.clone()
    embedding.weight.grad = None
    hidden = torch.tanh(embedding(tokens))
    cggr_cross_entropy(hidden @ embedding.weight.T, targets, 0.5, generator=_seeded()).backward()
    torch.testing.assert_close(got, embedding.weight.grad)


def test_unselected_rows_get_zero_hidden_grad():
    hidden, weight, bias, targets = _problem()
    h = hidden.clone().requires_grad_(True)
    loss, info = cggr_linear_cross_entropy(h, weight, targets, 0.25, bias=bias, return_info=True)
    loss.backward()
    assert (h.grad[~info.mask] == 0).all()
    assert (h.grad[info.mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_bf16_matches_plain_path(backend):
    hidden, weight, bias, targets = _problem(torch.float32, seed=3, vocab=45)
    hidden, weight, bias = (t.to(torch.bfloat16) for t in (hidden, weight, bias))

    def linear(h, w, b):
        return cggr_linear_cross_entropy(h, w, targets, 0.4, bias=b, chunk_size=6, backend=backend,
                                         fp32_grad_accumulation=True, generator=_seeded())

    def plain(h, w, b):
        return cggr_cross_entropy(h @ w.T + b, targets, 0.4, backend=backend, generator=_seeded())

    loss_l, grads_l = _grads(linear, hidden, weight, bias)
    loss_p, grads_p = _grads(plain, hidden, weight, bias)
    torch.testing.assert_close(loss_l, loss_p, rtol=1e-3, atol=1e-3)
    for a, b in zip(grads_l, grads_p):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_empty_batch_gives_zero_loss_and_gradients(backend, ratio):
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    loss = cggr_linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), ratio, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio,held_chunks,recomputed", [(0.4, None, 0), (1.0, None, 0), (1.0, 0.3, 32),
                                                         (1.0, 0.0, 37)])
def test_weight_grad_in_place_accumulates_like_autograd(monkeypatch, backend, ratio, held_chunks, recomputed):
    """The in-place mode leaves in weight.grad what autograd would, scaled by the upstream
    gradient: returned as usual while weight.grad is None (nothing to add into), added into it
    once it exists; hooks on the weight run either way. At ratio 1
    the forward holds the gradient of the last weight rows (all of them at this size, 5 of 37
    with ``held_chunks`` 0.3, none with 0) and the backward recomputes the logits of the other
    columns."""
    if held_chunks is not None:
        monkeypatch.setattr(autograd, "_HELD_CHUNKS", held_chunks)
    assert autograd._recomputed_columns(37, 6, 5, "in_place") == recomputed
    hidden, weight, bias, targets = _problem(seed=4)
    hooks = []
    results = {}
    for in_place in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        w.register_hook(lambda grad: hooks.append((grad.shape, grad.layout)))
        for upstream in (1.0, 2.5):  # the second step adds to the existing weight.grad
            loss = cggr_linear_cross_entropy(h, w, targets, ratio, bias=b, chunk_size=5, backend=backend,
                                             label_smoothing=0.1, z_loss=1e-3, weight_grad_in_place=in_place,
                                             generator=_seeded())
            (upstream * loss).backward()
        results[in_place] = (w.grad, h.grad, b.grad)
    returned, added = (weight.shape, torch.strided), (weight.shape, torch.sparse_coo)
    assert hooks == [returned, returned, returned, added]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start,stop", [(0, 12), (12, 30)])
def test_logits_grad_of_a_slice_of_columns(backend, start, stop):
    """Given some consecutive columns of each row (targets counted from the first, and the full
    vocabulary size), the gradient is those columns of the full gradient: smoothing spread over
    all V, the target's term only where the target is among the columns."""
    impl = get_backend(backend, torch.device("cpu"))
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 6, 40, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 11, 12, 25, 39, 3])
    lse = torch.logsumexp(logits[0], dim=1)
    coef = torch.rand(6, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, True, False])
    opts = LossOptions(label_smoothing=0.1, z_loss=1e-3)
    full = impl.logits_grad(logits, targets, lse, coef, mask, opts)
    part = logits[..., start:stop].clone()
    got = impl.logits_grad(part, targets - start, lse, coef, mask, opts, out=part, vocab_size=40)
    torch.testing.assert_close(got, full[..., start:stop])


def test_weight_grad_in_place_with_a_tied_weight():
    vocab, dim = 29, 8
    embedding = torch.nn.Embedding(vocab, dim).double()
    tokens = torch.randint(0, vocab, (2, 7))
    targets = torch.randint(0, vocab, (2, 7))
    grads = []
    for in_place in (False, True):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(tokens))
        cggr_linear_cross_entropy(hidden, embedding.weight, targets, 0.5, weight_grad_in_place=in_place,
                                  generator=_seeded()).backward()
        grads.append(embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_weight_grad_in_place_errors():
    hidden, weight, _, targets = _problem()
    leaf = weight.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="weight_grad_in_place.*leaf"):
        cggr_linear_cross_entropy(hidden, leaf * 2, targets, 0.5, weight_grad_in_place=True)
    with pytest.raises(ValueError, match="fp32_grad_accumulation"):
        cggr_linear_cross_entropy(hidden, leaf, targets, 0.5, weight_grad_in_place=True, fp32_grad_accumulation=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(selection=st.sampled_from(SELECTIONS), reduction=st.sampled_from(["mean", "sum", "none"]),
       ratio=st.sampled_from([0.3, 0.7, 1.0]), scoring=st.sampled_from(["gradnorm", "combined", "excess"]),
       bias=st.booleans(), softcap=st.sampled_from([None, 3.0]), upstream=st.sampled_from([1.0, 2.5]),
       frozen_weight=st.booleans(), backend=st.sampled_from(BACKENDS), seed=st.integers(0, 99))
def test_small_head_formed_whole_matches_the_chunked_path(monkeypatch, selection, reduction, ratio, scoring, bias,
                                                          softcap, upstream, frozen_weight, backend, seed):
    """A head small enough to form whole (F.linear, then the logits loss) gives the loss, info and
    gradients of the chunked path with recomputation, which every larger head takes."""
    import cggr.functional as functional

    hidden, weight, b, targets = _problem(bias=bias, seed=seed)
    reference = torch.rand(targets.shape, generator=torch.Generator().manual_seed(seed)) * 3
    kw = dict(selection=selection, reduction=reduction, scoring=scoring, logit_softcap=softcap, return_info=True,
              reference_loss=reference if scoring == "excess" else None, backend=backend)
    results = []
    for limit in (1 << 62, 0):  # formed whole, then chunked
        monkeypatch.setattr(functional, "_MATERIALISE_MAX_MACS", limit)
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(not frozen_weight)
        bb = None if b is None else b.clone().requires_grad_(True)
        loss, info = cggr_linear_cross_entropy(h, w, targets, ratio, bias=bb, generator=_seeded(), **kw)
        (upstream * loss.sum()).backward()
        results.append((loss.detach(), info.mask, info.weight, h.grad, w.grad, None if bb is None else bb.grad))
    whole, chunked = results
    for a, c in zip(whole, chunked):
        if a is None or c is None:
            assert a is None and c is None
        else:
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("ratio,chunk_size", [(1.0, 5), (0.3, None), (1.0, None)])
def test_no_gradient_formed_without_autograd(monkeypatch, ratio, chunk_size):
    """Ratio 1 and a small head form their gradients in the forward, but not under no_grad or
    when no input needs one; a second backward (retain_graph) recomputes what the first used up."""
    formed = []
    original_add = autograd._HeadGrads.add
    monkeypatch.setattr(autograd._HeadGrads, "add", lambda self, *a: formed.append(1) or original_add(self, *a))
    hidden, weight, b, targets = _problem()
    with torch.no_grad():
        cggr_linear_cross_entropy(hidden.requires_grad_(True), weight, targets, ratio, bias=b, chunk_size=chunk_size)
    cggr_linear_cross_entropy(hidden.detach(), weight, targets, ratio, bias=b, chunk_size=chunk_size)
    assert not formed
    h, w = hidden.detach().clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = cggr_linear_cross_entropy(h, w, targets, ratio, bias=b, chunk_size=chunk_size,
                                     generator=torch.Generator().manual_seed(1))
    assert formed
    (2.5 * loss).backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    (2.5 * loss).backward()
    torch.testing.assert_close((h.grad, w.grad), first)


def test_default_chunk(monkeypatch):
    """The default chunk holds about _LINEAR_CHUNK_ELEMENTS logits, in whole 128-row tiles from
    128 rows on, whatever the weight gradient's dtype; chunk_size overrides it."""
    from cggr import functional

    assert functional._default_chunk_rows(151936) == 3584
    assert functional._default_chunk_rows(1 << 30) == 1
    seen = []
    original = autograd.CGGRLinearCrossEntropyFunction.apply
    monkeypatch.setattr(autograd.CGGRLinearCrossEntropyFunction, "apply",
                        lambda *args: seen.append(args[-1].plan.chunk_rows) or original(*args))
    vocab = 1000
    monkeypatch.setattr(functional, "_LINEAR_CHUNK_ELEMENTS", 16 * vocab)  # 16 rows a chunk by default
    hidden = torch.randn(100, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    targets = torch.randint(0, vocab, (100,))
    cggr_linear_cross_entropy(hidden, weight, targets, 0.5).backward()
    cggr_linear_cross_entropy(hidden, weight, targets, 0.5, fp32_grad_accumulation=True).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cggr_linear_cross_entropy(hidden, weight, targets, 0.5)
    loss.backward()
    cggr_linear_cross_entropy(hidden, weight, targets, 0.5, chunk_size=7).backward()
    assert seen == [16, 16, 16, 7]


@pytest.mark.parametrize("ratio,chunk_size", [(0.5, 16), (1.0, 16), (0.5, None)])
def test_backward_inside_an_autocast_region(ratio, chunk_size):
    """``loss.backward()`` called inside the autocast region (as in many training loops) gives the
    same gradients as outside it: the backward does not let autocast recast its matmuls."""
    hidden, weight, b, targets = _problem(torch.float32)
    grads = []
    for backward_inside in (False, True):
        h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = cggr_linear_cross_entropy(h, w, targets, ratio, bias=b, chunk_size=chunk_size,
                                             generator=torch.Generator().manual_seed(3))
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[0], grads[1])
