"""GPU checks of the Triton kernels against the reference backend (skipped without CUDA).

Run on an H100/H200: ``python -m pytest tests/test_gpu.py -q``.
"""
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

import cggr
from cggr import CGGRLoss
from cggr.functional import cggr_cross_entropy as _cggr_cross_entropy
from cggr.scoring import SCORINGS
from cggr.selection import SELECTIONS
from helpers import assert_backends_agree, assert_equal_steps, with_and_without_graphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# These checks compare separate calls, so they use the deterministic topk selection unless a
# test names another (with a seeded generator); the sampling selections have their own tests.
cggr_cross_entropy = functools.partial(_cggr_cross_entropy, selection="topk", scoring="combined")
cggr_linear_cross_entropy = functools.partial(cggr.cggr_linear_cross_entropy, selection="topk", scoring="combined")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}

_GRAD = 3  # the logits gradient's place among a logits graph's outputs (ops.autograd._graphed_logits)


def _pair(logits, targets, ratio, **kw):
    """Loss, grad and info from the Triton and the torch backend on the same GPU tensors."""
    out = []
    if kw.get("scoring") == "excess":
        kw["reference_loss"] = torch.rand(targets.shape, device=targets.device) * 3
    for backend in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        gen = torch.Generator(device="cuda").manual_seed(0) if "generator" in kw else None
        options = dict(kw, generator=gen) if gen is not None else kw
        loss, info = cggr_cross_entropy(x, targets, ratio, backend=backend, return_info=True, **options)
        loss.float().sum().backward()
        out.append((loss.detach(), x.grad, info))
    return out


def _close(a, b, tol):
    """max |a - b| <= tol * max |b| (gradients of large vocabularies are tiny everywhere, so an
    absolute tolerance would pass anything)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-30)
    return ((a - b).abs().max() / scale).item() <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 151936, 262144])
def test_large_vocab_matches_reference(dtype, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(48, vocab, device="cuda") * 4).to(dtype)
    targets = torch.randint(0, vocab, (48,), device="cuda")
    targets[::7] = -100
    triton_result, torch_result = _pair(logits, targets, 0.25)
    assert_backends_agree(triton_result, torch_result, 1e-4, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps", ["first", "later"])
@pytest.mark.parametrize("inplace", [False, True])
def test_shifted_sequence_view_with_odd_vocab(dtype, steps, inplace):
    """``logits[:, :-1]`` of [4, 65, 50257] (the usual next-token shift) and ``logits[:, 1:]``
    (a prompt sliced off: the view's pointer is not 16-byte aligned either): rows start
    anywhere and are read shifted to 16-byte boundaries, into a gradient buffer with the
    view's strides and offset, or into the logits."""
    torch.manual_seed(6)
    logits = (torch.randn(4, 65, 50257, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, 50257, (4, 64), device="cuda")
    take = (lambda x: x[:, :-1]) if steps == "first" else (lambda x: x[:, 1:])
    out = []
    for backend in ("triton", "torch"):
        base = logits.clone().requires_grad_(True)
        loss, info = cggr_cross_entropy(take(base), targets, 0.3, backend=backend, return_info=True,
                                        inplace_backward=inplace and backend == "triton")
        loss.backward()
        out.append((loss.detach(), take(base.grad), info))
    assert_backends_agree(*out, 1e-4, TOL[dtype])


def test_cached_launches_respecialise_on_alignment_and_dtype():
    """The launch cache (cggr.ops.launch) must not reuse a kernel compiled for 16-byte aligned
    rows (vectorised loads) on rows that are not, nor one compiled for another dtype: the same
    shapes alternate between an aligned buffer, rows of stride V + 1 (read shifted to 16-byte
    boundaries), a view one element in (passed from the boundary before it), and float16."""
    torch.manual_seed(5)
    vocab = 4096
    storage = (torch.randn(64 * (vocab + 1) + 1, device="cuda") * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (64,), device="cuda")

    def rows_of(flat, layout):
        if layout == "padded":
            return flat[:64 * (vocab + 1)].view(64, vocab + 1)[:, :vocab]
        offset = 1 if layout == "offset" else 0
        return flat[offset:offset + 64 * vocab].view(64, vocab)  # not a copy: an offset stays unaligned

    for _ in range(2):  # the second round runs every variant from the cache
        for layout, dtype in (("aligned", torch.bfloat16), ("padded", torch.bfloat16), ("offset", torch.bfloat16),
                              ("padded", torch.float16), ("offset", torch.float16)):
            out = []
            for backend in ("triton", "torch"):
                base = storage.to(dtype).clone().requires_grad_(True)
                loss, info = cggr_cross_entropy(rows_of(base, layout), targets, 0.5, backend=backend,
                                                return_info=True)
                loss.backward()
                out.append((loss.detach(), rows_of(base.grad, layout), info))
            assert_backends_agree(*out, 1e-4, TOL[dtype])
            if layout == "padded":  # in place, the gradient overwrites the rows and nothing between them
                base = storage.to(dtype).clone().requires_grad_(True)
                cggr_cross_entropy(rows_of(base, layout), targets, 0.5, inplace_backward=True).backward()
                torch.testing.assert_close(rows_of(base.grad, layout), out[0][1], rtol=0, atol=0)
                between = storage.to(dtype)[:64 * (vocab + 1)].view(64, vocab + 1)[:, vocab]
                assert torch.equal(base.detach()[:64 * (vocab + 1)].view(64, vocab + 1)[:, vocab], between)


def test_extreme_logits_and_neg_inf():
    torch.manual_seed(1)
    vocab = 50257
    logits = (torch.randn(64, vocab, device="cuda") * 1e4).clamp(-1e4, 1e4)
    logits[:, ::3] = float("-inf")
    targets = torch.randint(0, vocab // 3 - 1, (64,), device="cuda") * 3 + 1  # never a -inf column
    # Saturated probabilities make every score tie, so compare the numerics at ratio 1.
    (lt, gt, it), (lr, gr, ir) = _pair(logits, targets, 1.0, reduction="none")
    assert torch.isfinite(lt).all() and torch.isfinite(gt).all()
    assert _close(lt, lr, 1e-5) and _close(gt, gr, 1e-5)
    # Many logits tie at the clamp (1e4): the entropy is that of a near-uniform top set. In
    # float32 at magnitude 1e4, x - lse carries ~1e-3 of rounding, so compare with float64.
    probs = torch.softmax(logits.double(), -1)
    exact = torch.special.entr(probs).sum(-1)
    assert _close(it.entropy, exact, 1e-4) and _close(ir.entropy, exact, 1e-3)
    assert _close(it.confidence, probs.amax(-1), 2e-3)  # exp(m - lse): the same rounding, relative


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_target_check_on_gpu(dtype):
    """The one-launch target check counts every bad target of a batch larger than its programs'
    first blocks (so they walk several), and the loss names the first bad one."""
    from cggr.ops import triton_backend

    n, vocab = 300_000, 50
    targets = torch.randint(0, vocab, (n,), device="cuda", dtype=dtype)
    targets[::7] = -100
    assert triton_backend.count_bad_targets(targets, vocab, -100) == 0
    targets[[5, n - 1]] = torch.tensor([vocab, -3], device="cuda", dtype=dtype)
    assert triton_backend.count_bad_targets(targets, vocab, -100) == 2
    with pytest.raises(ValueError, match=f"found {vocab}"):
        cggr_cross_entropy(torch.randn(n, vocab, device="cuda"), targets, 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepared_backward_scaling_on_gpu(dtype):
    """The gradient formed in the forward is scaled in the backward through a launch prepared in
    the forward: repeated calls (the first launch compiles, later ones go straight to the
    launcher) with upstream gradients of 1, 2.5 and one not 16-byte aligned match the reference."""
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(64, 1000, device="cuda", generator=g).to(dtype)
    targets = torch.randint(0, 1000, (64,), device="cuda", generator=g)
    upstream = torch.tensor([0.0, 2.5], device="cuda")
    for scale in [None, torch.tensor(2.5, device="cuda"), upstream[1], None, upstream[1]]:
        grads = []
        for backend in ("triton", "torch"):
            x = logits.clone().requires_grad_(True)
            loss = cggr_cross_entropy(x, targets, 1.0, backend=backend)  # every row: no near-tie to split
            loss.backward(scale)
            grads.append(x.grad.float())
        torch.testing.assert_close(grads[0], grads[1], rtol=TOL[dtype], atol=TOL[dtype] / 100)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_small_head_graph_replays_match_eager_calls(selection, monkeypatch):
    """The small head's captured forward (first call eager, second captured, later ones
    replayed) gives the eager calls' losses and gradients to the bit, random selections too
    (the default generator advances as in eager calls), while the weight changes in place
    between calls and hidden is a new tensor each time; a loss kept from an earlier call is not
    overwritten by later replays."""
    g = torch.Generator(device="cuda").manual_seed(5)
    weight0 = torch.randn(1000, 64, device="cuda", generator=g, dtype=torch.bfloat16) / 8
    hiddens = [torch.randn(4, 96, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(5)]
    targets = torch.randint(0, 1000, (4, 96), device="cuda", generator=g)
    targets[:, ::9] = -100

    def calls():
        weight = weight0.clone().requires_grad_(True)
        out = []
        for hidden in hiddens:
            h = hidden.clone().requires_grad_(True)
            loss = cggr.cggr_linear_cross_entropy(h, weight, targets, 0.3, selection=selection)
            (loss * 0.5).backward()
            out.append((loss.detach(), h.grad, weight.grad))
            with torch.no_grad():
                weight -= weight.grad
            weight.grad = None
        return out

    (replayed, entries), (eager, _) = with_and_without_graphs(monkeypatch, calls, seed=11)
    # Captured by the second call and replayed by it and every later one: a backward frees the
    # graph for the next call although its loss is still held.
    assert len(entries) == 1 and entries[0].replays == len(hiddens) - 1
    assert_equal_steps(replayed, eager)
    assert len({loss.item() for loss, _, _ in replayed}) == len(replayed)  # kept losses not overwritten


def test_small_head_graph_busy_and_retained():
    """Two losses of the same shapes before one backward: the second call runs eagerly (the
    first's gradients are still to be read), and both backward passes, with retain_graph, give
    what eager calls give."""
    from cggr.ops import graphs

    graphs.clear()
    g = torch.Generator(device="cuda").manual_seed(6)
    weight = (torch.randn(500, 32, device="cuda", generator=g) / 6).requires_grad_(True)
    hidden = [torch.randn(128, 32, device="cuda", generator=g).requires_grad_(True) for _ in range(2)]
    targets = torch.randint(0, 500, (128,), device="cuda", generator=g)

    def loss_of(h):
        return cggr.cggr_linear_cross_entropy(h, weight, targets, 1.0)

    for _ in range(2):  # seen, then captured
        loss_of(hidden[0]).backward()
    weight.grad = hidden[0].grad = None
    total = loss_of(hidden[0]) + 2 * loss_of(hidden[1])
    total.backward(retain_graph=True)
    first = [t.grad.clone() for t in (weight, *hidden)]
    for t in (weight, *hidden):
        t.grad = None
    total.backward()
    torch.testing.assert_close([t.grad for t in (weight, *hidden)], first)
    want = torch.autograd.grad(F.cross_entropy(hidden[0] @ weight.T, targets)
                               + 2 * F.cross_entropy(hidden[1] @ weight.T, targets), (weight, *hidden))
    torch.testing.assert_close(first, list(want), rtol=1e-4, atol=1e-5)
    del total
    assert not any(e.busy for e in graphs.entries())

    # A second backward after the graph ran again would read overwritten gradients: refused.
    loss = loss_of(hidden[0])
    loss.backward(retain_graph=True)
    loss_of(hidden[1])
    with pytest.raises(RuntimeError, match="CGGR_CUDA_GRAPHS=0"):
        loss.backward()


@pytest.mark.parametrize("selection", SELECTIONS)
def test_logits_graph_replays_match_eager_calls(selection, monkeypatch):
    """Small logits' captured forward (first call eager, second captured, later ones replayed)
    gives the eager calls' losses and gradients to the bit, random selections too, with the
    logits changed in place between calls and another upstream gradient each time; the
    gradient becomes the leaf's ``.grad`` with no copy."""
    from cggr.ops import graphs

    g = torch.Generator(device="cuda").manual_seed(8)
    x0 = (torch.randn(4, 256, 3000, device="cuda", generator=g) * 2).to(torch.bfloat16)
    targets = torch.randint(0, 3000, (4, 256), device="cuda", generator=g)
    targets[:, ::7] = -100

    def calls():
        x = x0.clone().requires_grad_(True)
        out = []
        for scale in (1.0, 0.5, 1.0, 2.0, 1.0):
            loss = _cggr_cross_entropy(x, targets, 0.3, selection=selection)
            (loss * scale).backward()
            out.append((loss.detach(), x.grad.clone()))
            entries = graphs.entries()
            if entries:
                assert x.grad.data_ptr() == entries[0].outputs[_GRAD].data_ptr()  # taken without a copy
            x.grad = None
            with torch.no_grad():
                x.mul_(0.75)
        return out

    (replayed, entries), (eager, _) = with_and_without_graphs(monkeypatch, calls, seed=12)
    assert len(entries) == 1 and entries[0].replays == 4
    assert_equal_steps(replayed, eager)


def test_logits_graph_in_a_training_loop_and_cggrloss(monkeypatch):
    """Logits formed anew each step by a head (the allocator's address repeats): the graphed
    steps give the eager ones; a held ``.grad`` or a retained autograd graph holds a graph, and
    a second one takes over or the call runs eagerly; ``CGGRLoss`` replays with the metrics of
    an eager run."""
    from cggr.ops import graphs

    g = torch.Generator(device="cuda").manual_seed(9)
    hidden = torch.randn(512, 64, device="cuda", generator=g)
    weight0 = torch.randn(2000, 64, device="cuda", generator=g) / 8
    targets = torch.randint(0, 2000, (512,), device="cuda", generator=g)

    def train():
        weight = weight0.clone().requires_grad_(True)
        out = []
        for _ in range(5):
            loss = _cggr_cross_entropy(hidden @ weight.T, targets, 1.0)
            loss.backward()
            out.append((loss.detach(), weight.grad.clone()))
            with torch.no_grad():
                weight -= weight.grad
            weight.grad = None
        return out

    (graphed, entries), (eager, _) = with_and_without_graphs(monkeypatch, train, seed=0)
    assert [e.replays for e in entries] == [4]
    assert_equal_steps(graphed, eager)
    w = weight0.clone().requires_grad_(True)
    want = torch.autograd.grad(F.cross_entropy(hidden @ w.T, targets), w)[0]
    torch.testing.assert_close(graphed[0][1], want, rtol=1e-4, atol=1e-6)

    x = torch.randn(300, 999, device="cuda", generator=g).requires_grad_(True)
    t = torch.randint(0, 999, (300,), device="cuda", generator=g)
    graphs.clear()
    _cggr_cross_entropy(x, t, 0.5, selection="topk").backward()
    x.grad = None
    _cggr_cross_entropy(x, t, 0.5, selection="topk").backward()  # captured: .grad is the graph's
    entry = graphs.entries()[0]
    assert x.grad.data_ptr() == entry.outputs[_GRAD].data_ptr()
    first = x.grad.clone()
    loss = _cggr_cross_entropy(x, t, 0.5, selection="topk")  # .grad holds the first graph: a second one
    spare = graphs.entries()[1]
    assert entry.replays == 1 and spare.replays == 1
    x.grad = None
    loss.backward(retain_graph=True)
    assert torch.equal(x.grad, first) and x.grad.data_ptr() == spare.outputs[_GRAD].data_ptr()
    x.grad = None
    for _ in range(2):  # the first graph, free again; the second stays held by the retained graph
        _cggr_cross_entropy(x, t, 0.5, selection="topk")
    assert entry.replays == 3 and spare.replays == 1
    loss.backward()  # recomputed from the saved rows, which no replay has overwritten
    torch.testing.assert_close(x.grad, first)
    x.grad.zero_()  # kept: the gradients are added in
    del loss
    for _ in range(3):
        _cggr_cross_entropy(x, t, 0.5, selection="topk").backward()
    assert entry.replays == 6 and spare.replays == 1 and torch.equal(x.grad, 3 * first)
    x.grad = None

    def metrics():
        criterion = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0)
        y = x.detach().clone().requires_grad_(True)
        out = []
        for _ in range(4):
            criterion(y, t).backward()
            out.append((criterion.get_metrics(), y.grad.clone()))
            y.grad = None
            with torch.no_grad():
                y.mul_(1.25)
        return out
    (graphed, entries), (eager, _) = with_and_without_graphs(monkeypatch, metrics, seed=3)
    assert len(entries) == 1 and entries[0].replays == 3  # seen, then captured and replayed
    for (m_a, grad_a), (m_b, grad_b) in zip(graphed, eager):
        assert m_a == m_b and torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("strata", [1, 4, 7, 64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_stratified_program_per_stratum_on_gpu(strata, reduction):
    """The stratified selection, one program a stratum over 8000 rows, keeps the PyTorch
    selection's rows (same generator), and its loss, summed by the last program to finish, is
    the same to the bit in every repeat."""
    from cggr.core import LossOptions, _select_and_reduce_rows
    from cggr.ops import triton_backend
    from cggr.scoring import RowStats

    g = torch.Generator(device="cuda").manual_seed(strata)
    columns = torch.rand(8000, len(RowStats._fields), device="cuda", generator=g)
    columns[:, 7] = torch.randint(0, 50, (8000,), device="cuda", generator=g) / 49  # ties
    valid = torch.rand(8000, device="cuda", generator=g) > 0.1
    stats = RowStats.from_columns(columns)
    losses = []
    for _ in range(5):
        opts = [LossOptions(selection="stratified", num_strata=strata, reduction=reduction,
                            generator=torch.Generator(device="cuda").manual_seed(7)) for _ in range(2)]
        got = triton_backend.select(stats, valid, 0.3, opts[0])
        want = _select_and_reduce_rows(stats, valid, 0.3, opts[1], None)
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)
        losses.append(got[3].sum() if reduction == "none" else got[3])
    assert all(torch.equal(loss, losses[0]) for loss in losses)


@pytest.mark.parametrize("with_bias", [False, True])
def test_prepared_small_head_scaling_on_gpu(with_bias):
    """A small head's gradients (hidden [B, T, H], weight and bias), formed in the forward and
    scaled in the backward by one launch prepared in the forward (into buffers allocated there,
    then new ones for a second backward), match the reference for upstream gradients of 1, 2.5
    and one not 16-byte aligned."""
    g = torch.Generator(device="cuda").manual_seed(4)
    hidden = torch.randn(4, 64, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = torch.randn(1000, 64, device="cuda", generator=g, dtype=torch.bfloat16) / 8
    bias = torch.randn(1000, device="cuda", generator=g, dtype=torch.bfloat16) if with_bias else None
    targets = torch.randint(0, 1000, (4, 64), device="cuda", generator=g)
    upstream = torch.tensor([0.0, 2.5], device="cuda")
    for scale in [None, torch.tensor(2.5, device="cuda"), upstream[1], None]:
        grads = []
        for backend in ("triton", "torch"):
            inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
            loss = cggr_linear_cross_entropy(inputs[0], inputs[1], targets, 1.0, *inputs[2:], backend=backend)
            loss.backward(scale, retain_graph=True)
            first = [t.grad.float() for t in inputs]
            for t in inputs:
                t.grad = None
            loss.backward(scale)
            torch.testing.assert_close([t.grad.float() for t in inputs], first)
            grads.append(first)
        assert grads[0][0].shape == hidden.shape
        torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=1e-4)


def test_nan_row_is_selected_and_gives_nan():
    logits = torch.randn(32, 1000, device="cuda")
    logits[5, 17] = float("nan")
    targets = torch.randint(0, 1000, (32,), device="cuda")
    loss, info = cggr_cross_entropy(logits, targets, 0.1, backend="triton", return_info=True)
    assert bool(info.mask[5]) and torch.isnan(loss)


@pytest.mark.parametrize("vocab", [131072, 131071])  # rows 16-byte aligned, and rows read shifted
def test_more_than_2_pow_31_elements(vocab):
    rows = 16500  # 2.16e9 elements > 2**31
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    x = logits.requires_grad_(True)
    loss, info = cggr_cross_entropy(x, targets, 0.25, backend="triton", return_info=True)
    loss.backward()
    tail = slice(rows - 64, rows)  # rows whose offsets exceed 2**31
    ref = F.cross_entropy(logits[tail].float(), targets[tail], reduction="none")
    assert _close(info.nll[tail], ref, 1e-3)
    sel = info.mask[tail]
    expected = torch.softmax(logits[tail].float(), -1)
    expected[torch.arange(64), targets[tail]] -= 1
    expected = expected / info.n_selected.float()
    assert _close(x.grad[tail][sel].float(), expected[sel], 2e-2)
    assert (x.grad[tail][~sel] == 0).all()


@pytest.mark.parametrize("scoring,selection", list(itertools.product(SCORINGS, SELECTIONS)))
def test_every_strategy_without_host_sync(scoring, selection):
    torch.manual_seed(2)
    logits = torch.randn(4, 256, 4096, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 4096, (4, 256), device="cuda")
    targets[:, -10:] = -100
    triton_result, torch_result = _pair(logits, targets, 0.3, scoring=scoring, selection=selection,
                                        generator=True, check_targets=False)
    assert_backends_agree(triton_result, torch_result, 1e-4, 2e-2)
    x = logits.clone().requires_grad_(True)
    gen = torch.Generator(device="cuda").manual_seed(3)
    reference = torch.rand(targets.shape, device="cuda") if scoring == "excess" else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = cggr_cross_entropy(x, targets, 0.3, scoring=scoring, selection=selection, generator=gen,
                                  check_targets=False, reference_loss=reference)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_inplace_backward_matches():
    logits = torch.randn(512, 32000, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32000, (512,), device="cuda")
    x = logits.clone().requires_grad_(True)
    cggr_cross_entropy(x, targets, 0.25).backward()
    y = logits.clone().requires_grad_(True)
    cggr_cross_entropy(y, targets, 0.25, inplace_backward=True).backward()
    assert torch.equal(y.grad, x.grad)


def test_torch_compile_fullgraph_and_cuda_graph():
    logits = torch.randn(1024, 32000, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32000, (1024,), device="cuda")

    def step(x):
        return cggr_cross_entropy(x, targets, 0.25, check_targets=False)

    compiled = torch.compile(step, fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    compiled(x1).backward()
    x2 = logits.clone().requires_grad_(True)
    step(x2).backward()
    assert _close(x1.grad, x2.grad, 1e-2)

    static = logits.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (compiles kernels) outside the capture
            static.grad = None
            step(static).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        captured = step(static)
        captured.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert _close(static.grad, x2.grad, 1e-2)


def test_torch_compile_of_an_unaligned_view():
    """``x[:, 1:]`` with V odd inside a compiled function: the statistics read the view from the
    16-byte boundary before it; the compiled gradient buffer starts its own storage (as the
    op's fake says), so logits and gradient rows are not shifted alike and are read as they are."""
    torch.manual_seed(7)
    logits = torch.randn(4, 257, 32001, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32001, (4, 256), device="cuda")

    def step(x):
        return cggr_cross_entropy(x[:, 1:], targets, 0.25, check_targets=False)

    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        x = logits.clone().requires_grad_(True)
        fn(x).backward()
        grads.append(x.grad)
    assert _close(*grads, 1e-2)


def test_linear_path_matches_reference_on_gpu():
    torch.manual_seed(4)
    hidden = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(5003, 256, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_(True)
    bias = torch.randn(5003, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 5003, (2, 300), device="cuda")
    grads = []
    for backend in ("triton", "torch"):
        loss = cggr_linear_cross_entropy(hidden, weight, targets, 0.25, bias=bias, backend=backend, chunk_size=128,
                                         fp32_grad_accumulation=True)
        grads.append(torch.autograd.grad(loss, (hidden, weight, bias)))
    for a, b in zip(*grads):
        assert _close(a, b, 2e-2)


def test_cggrloss_on_gpu_dynamic_threshold():
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=True)
    logits = torch.randn(2048, 8192, device="cuda", requires_grad=True)
    targets = torch.randint(0, 8192, (2048,), device="cuda")
    crit(logits, targets).backward()
    metrics = crit.get_metrics()
    assert 0 < metrics["tokens_selected"] <= 2048


def test_linear_path_compiles_and_makes_no_host_sync():
    hidden = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(8000, 256, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_(True)
    targets = torch.randint(0, 8000, (4, 128), device="cuda")

    def step(h, w):
        return cggr_linear_cross_entropy(h, w, targets, 0.25, check_targets=False, chunk_size=200)

    eager = torch.autograd.grad(step(hidden, weight), (hidden, weight))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(hidden, weight), (hidden, weight))
    for a, b in zip(compiled, eager):
        assert _close(a, b, 1e-2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for ratio in (0.25, 1.0):
            for chunk_size in (200, None):  # chunks with recomputation; the small head formed whole
                loss = cggr_linear_cross_entropy(hidden, weight, targets, ratio, check_targets=False,
                                                 chunk_size=chunk_size)
                torch.autograd.grad(loss, (hidden, weight))
        # In place at ratio 1 with 64-row chunks: half the weight gradient held from the forward.
        cggr_linear_cross_entropy(hidden, weight, targets, 1.0, check_targets=False, chunk_size=64,
                                  weight_grad_in_place=True).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("ratio,chunk_size", [(0.25, 256), (1.0, 64)])
def test_linear_weight_grad_in_place_saves_the_weight_sized_buffer(ratio, chunk_size):
    """With weight.grad already there, the in-place mode adds into it: the same gradient, and
    the step's peak extra memory stays below one weight's size (the default mode needs one more).
    At ratio 1 with 64-row chunks the forward holds the gradient of a quarter of the weight.
    With weight.grad None it runs as the default mode, in the same memory."""
    torch.manual_seed(5)
    hidden = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(32768, 512, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_(True)
    targets = torch.randint(0, 32768, (2048,), device="cuda")
    weight_bytes = weight.numel() * weight.element_size()
    grads, peaks = [], []
    for in_place, kept in ((False, True), (True, True), (False, False), (True, False)):
        weight.grad = torch.ones_like(weight) if kept else None
        hidden.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        cggr_linear_cross_entropy(hidden, weight, targets, ratio, check_targets=False, chunk_size=chunk_size,
                                  label_smoothing=0.1, weight_grad_in_place=in_place).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        grads.append((weight.grad.clone(), hidden.grad.clone()))
    for a, b in zip(*grads[:2]):
        assert _close(a, b, 1e-2)
    for a, b in zip(*grads[2:]):
        assert _close(a, b, 1e-2)
    assert peaks[0] > weight_bytes > peaks[1] and peaks[2] == peaks[3], (peaks, weight_bytes)


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_fp32_grad_accumulation_on_gpu_against_float64(ratio):
    """bf16 inputs, weight gradient accumulated in float32 over several chunks (the matmul writes
    float32 from bf16 inputs). At ratio 1 (every row kept, so the same rows as the reference):
    close to float64 and no further from it than the bf16 default. At 0.25 the bf16 scores may
    select other rows than float64 ones: close to the default, which selects the same rows."""
    torch.manual_seed(6)
    hidden = torch.randn(600, 128, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(3001, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    targets = torch.randint(0, 3001, (600,), device="cuda")

    def weight_grad(h, w, **kw):
        w = w.clone().requires_grad_(True)
        loss = cggr_linear_cross_entropy(h, w, targets.to(h.device), ratio, chunk_size=128, **kw)
        return torch.autograd.grad(loss, w)[0]
    fp32 = weight_grad(hidden, weight, fp32_grad_accumulation=True)
    native = weight_grad(hidden, weight)
    assert fp32.dtype == torch.bfloat16
    exact = weight_grad(hidden.double().cpu(), weight.double().cpu()) if ratio == 1.0 else native.double().cpu()
    error = lambda g: ((g.double().cpu() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(fp32) < 1e-2
    if ratio == 1.0:
        assert error(fp32) <= error(native) * 1.01


@pytest.mark.parametrize("ratio,chunk_size", [(1.0, 128), (0.25, 128), (0.25, None)])
def test_linear_under_autocast_on_gpu(ratio, chunk_size):
    """fp32 parameters under bf16 autocast on the GPU: fp32 gradients, close to the same call on
    bf16 copies (the weight's formed in fp32 by the matmul, not cast back from bf16)."""
    torch.manual_seed(7)
    hidden = torch.randn(600, 128, device="cuda")
    weight = torch.randn(3001, 128, device="cuda") * 0.05
    targets = torch.randint(0, 3001, (600,), device="cuda")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = cggr_linear_cross_entropy(h, w, targets, ratio, chunk_size=chunk_size)
    loss.backward()
    hb, wb = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    cggr_linear_cross_entropy(hb, wb, targets, ratio, chunk_size=chunk_size).backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert _close(h.grad, hb.grad.float(), 2e-2) and _close(w.grad, wb.grad.float(), 2e-2)
