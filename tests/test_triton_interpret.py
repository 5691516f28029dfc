"""The Triton kernels (under TRITON_INTERPRET=1 on CPU) against the reference backend."""
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cggr.core import LossOptions
from cggr.functional import cggr_cross_entropy
from cggr.scoring import SCORINGS, RowStats
from cggr.selection import SELECTIONS
from helpers import assert_backends_agree, loss_and_grad, make_batch, scoring_options

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter run only")
triton = pytest.importorskip("triton")

def _compare(logits, targets, ratio, tol, **kw):
    """Loss, gradient and info of the two backends on ``logits`` (or on ``view(logits)``)."""
    kw.update(scoring_options(kw.pop("scoring", "gradnorm"), targets))
    results = {}
    for backend in ("triton", "torch"):
        gen = torch.Generator().manual_seed(11)
        results[backend] = loss_and_grad(logits, targets, ratio, backend=backend, generator=gen, **kw)
    grad_tol = 1e-2 if logits.dtype in (torch.bfloat16, torch.float16) else tol
    assert_backends_agree(results["triton"], results["torch"], tol, grad_tol)


def _layout(name, b, t, vocab, pad):
    """(base shape, view of the base that the loss sees as [b, t, vocab], or None for the base)."""
    if name == "padded":  # rows of a wider buffer
        return (b, t, vocab + pad), lambda x: x[..., :vocab]
    if name == "later_steps":  # a prompt step sliced off: the pointer is one row in
        return (b, t + 1, vocab), lambda x: x[:, 1:]
    if name == "time_major":  # B stride V, T stride B*V
        return (t, b, vocab), lambda x: x.transpose(0, 1)
    return (b, t, vocab), None


@settings(max_examples=80, deadline=None)
@given(
    b=st.integers(1, 3), t=st.integers(1, 9), vocab=st.integers(2, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    ratio=st.floats(0.05, 1.0), scoring=st.sampled_from(SCORINGS), selection=st.sampled_from(SELECTIONS),
    reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0.0, 0.1]),
    z_loss=st.sampled_from([0.0, 1e-3]), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 999),
    layout=st.sampled_from(["contiguous", "padded", "later_steps", "time_major"]), pad=st.integers(1, 9),
)
def test_triton_matches_reference(b, t, vocab, dtype, ratio, scoring, selection, reduction, smoothing, z_loss,
                                  ignore_frac, seed, layout, pad):
    base_shape, view = _layout(layout, b, t, vocab, pad)
    base, _ = make_batch(base_shape[:-1], base_shape[-1], dtype, seed=seed)
    _, targets = make_batch((b, t), vocab, ignore_frac=ignore_frac, seed=seed + 1)
    _compare(base, targets, ratio, 1e-4, view=view, scoring=scoring, selection=selection, reduction=reduction,
             label_smoothing=smoothing, z_loss=z_loss)


def test_large_vocab_few_rows():
    logits, targets = make_batch((3,), 70000, torch.bfloat16, ignore_frac=0.0, seed=1)
    _compare(logits, targets, 1.0, 1e-4)


def test_special_values():
    logits, targets = make_batch((2, 6), 40, torch.float32, ignore_frac=0.0, seed=2)
    logits[0, 0, 5] = float("nan")
    logits[0, 1, 3] = float("inf")
    logits[1, 0, :10] = float("-inf")
    logits[1, 1] *= 1e4
    logits[1, 2, :] = 1.5  # every maximum shared
    targets[1, 0] = 20
    _compare(logits, targets, 0.5, 1e-4, selection="topk")


@pytest.mark.parametrize("view", ["later_steps", "earlier_steps", "padded_rows", "time_major"])
def test_strided_rows_and_int32_targets(view):
    """Views not viewable as 2-D: [2, 8, 33] of [2, 9, 33] (T stride 33, B stride 297), from the
    second step (pointer one element past a 16-byte boundary: passed from that boundary) or the
    first, [2, 9, 32] of padded rows, and [9, 2, 33] transposed (B stride 33, T stride 66): rows
    read shifted to 16-byte boundaries, into a gradient buffer strided (and offset) alike."""
    from cggr.ops import triton_backend

    big, targets = make_batch((2, 9), 33, torch.float32, ignore_frac=0.2, seed=3)
    if view == "padded_rows":
        def take(x):
            return x[..., :32]
        targets = torch.where(targets >= 0, targets % 32, targets)
    elif view == "time_major":
        big = big.transpose(0, 1).contiguous()

        def take(x):
            return x.transpose(0, 1)
    else:
        steps = slice(1, None) if view == "later_steps" else slice(None, -1)

        def take(x):
            return x[:, steps]
        targets = targets[:, steps]
    rows = take(big)
    offset = triton_backend._boundary_offset(rows)
    assert offset == (1 if view == "later_steps" else 0)
    grad = triton_backend._grad_buffer(rows, offset)
    assert grad.stride() == rows.stride() and grad.storage_offset() == offset
    config = triton_backend.launch_config(rows.shape[-1], "grad")
    align, passed, passed_offset = triton_backend._row_layout(config, rows, grad)
    assert (align, passed_offset) == (4, offset) and all(p.data_ptr() % 16 == 0 for p in passed)
    _compare(big, targets.to(torch.int32), 0.4, 1e-5, view=take)


def test_inplace_backward_writes_into_logits():
    logits, targets = make_batch((4, 5), 21, torch.float32, seed=4)
    _, expected, _ = loss_and_grad(logits, targets, 0.5, backend="triton",
                                   generator=torch.Generator().manual_seed(0))
    buffer = logits.clone().requires_grad_(True)
    loss = cggr_cross_entropy(buffer, targets, 0.5, backend="triton", inplace_backward=True,
                              generator=torch.Generator().manual_seed(0))
    loss.backward()
    torch.testing.assert_close(buffer.grad, expected)
    assert buffer.grad.data_ptr() == buffer.data_ptr() or torch.equal(buffer.detach(), expected)



@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_info_is_optional_work(backend):
    """Without return_info the info fields are never computed; loss and gradient are the same."""
    logits, targets = make_batch((3, 7), 50, torch.float32, seed=5)
    expected_loss, expected_grad, _ = loss_and_grad(logits, targets, 0.3, backend=backend, label_smoothing=0.1,
                                                    generator=torch.Generator().manual_seed(0))
    x = logits.clone().requires_grad_(True)
    loss = cggr_cross_entropy(x, targets, 0.3, backend=backend, label_smoothing=0.1,
                              generator=torch.Generator().manual_seed(0))
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("upstream_shape", [(), (3, 7)])
def test_upstream_gradient_is_folded_in(upstream_shape):
    """The kernel scales by the upstream gradient: one value, or one per row for reduction='none'."""
    logits, targets = make_batch((3, 7), 50, torch.float32, seed=6)
    upstream = torch.rand(upstream_shape, generator=torch.Generator().manual_seed(0)) + 0.5
    reduction = "none" if upstream_shape else "mean"
    grads = []
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_(True)
        cggr_cross_entropy(x, targets, 0.6, backend=backend, reduction=reduction,
                           generator=torch.Generator().manual_seed(0)).backward(upstream)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_ratio_one_is_cross_entropy_under_any_upstream_gradient(backend, upstream):
    """Ratio 1 matches F.cross_entropy, with an upstream gradient and through a retained graph."""
    logits, targets = make_batch((2, 9), 37, torch.float32, seed=7)
    x = logits.clone().requires_grad_(True)
    loss = cggr_cross_entropy(x, targets, 1.0, backend=backend)
    loss.backward(torch.tensor(upstream), retain_graph=True)
    y = logits.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(y.reshape(-1, 37), targets.reshape(-1))
    expected.backward(torch.tensor(upstream))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, y.grad)
    loss.backward(torch.tensor(upstream))
    torch.testing.assert_close(x.grad, 2 * y.grad)


def _fixed_block(size):
    """A stand-in for ``triton_backend.launch_config`` that gives every kernel blocks of ``size``."""
    return lambda length, kind, block_name="BLOCK_V": {block_name: size}


def _unreachable_boundary(shape, dtype):
    """A tensor of ``shape`` one element past a 16-byte boundary that lies before its storage
    (a buffer's memory, as from a foreign library): it can only be read as it is."""
    size, n = torch.empty((), dtype=dtype).element_size(), math.prod(shape)
    raw = bytearray(n * size + 32)
    address = torch.frombuffer(raw, dtype=torch.uint8).data_ptr()
    start = (size - address) % 16
    tensor = torch.frombuffer(raw, dtype=dtype, offset=start, count=n).view(shape)
    assert tensor.data_ptr() % 16 == size and tensor.storage_offset() == 0
    return tensor


@pytest.mark.parametrize("layout", ["aligned", "shifted", "offset", "unreachable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_many_small_blocks(monkeypatch, scoring, dtype, layout):
    """Rows spread over many blocks: the running maximum, the runner-up (ties within and across
    blocks) and the target's block are carried from block to block as on the GPU, in each of
    the kernels' row layouts: 'aligned' (V=208, every row 16-byte aligned: accumulators folded),
    'shifted' (V=101: rows start anywhere, read from the 16-byte boundary before them as a head,
    whole blocks, whole vectors and a last partial vector), 'offset' (a view one element in: the
    same, passed from the boundary before its pointer) and 'unreachable' (that boundary lies
    before the storage: rows read as they are)."""
    from cggr.ops import triton_backend

    config = {"BLOCK_V": 16}
    monkeypatch.setattr(triton_backend, "launch_config", _fixed_block(16))
    vocab = 208 if layout == "aligned" else 101
    g = torch.Generator().manual_seed(8)
    big = torch.randint(-3, 4, (2, 12, vocab + 1), generator=g).to(dtype)  # small integers: many ties
    big[..., 1:][0, 0, 5] = big[..., 1:][0, 0, 90] = 9.0  # a maximum shared by two blocks
    big[..., 1:][0, 1, 3:6] = 9.0  # shared inside one block
    big[..., 1:][0, 2, vocab - 1] = 9.0  # in the last block
    targets = torch.randint(0, vocab, (2, 12), generator=g)
    targets[1, :4] = torch.tensor([0, 15, vocab - 1, 7])  # first column, last of a block, last column, in a head

    def take(x):
        return x[..., 1:]
    rows = take(big) if layout == "offset" else big[..., 1:].contiguous()
    if layout == "unreachable":
        rows = _unreachable_boundary(rows.shape, dtype).copy_(rows)
    per_vector = 16 // rows.element_size()
    align, (passed,), _ = triton_backend._row_layout(config, rows)
    assert align == (1 if layout in ("aligned", "unreachable") else per_vector)
    vector_reads = align > 1 or triton_backend._rows_aligned(passed)
    assert triton_backend._fold_width(rows.element_size(), config, vector_reads) == (
        1 if layout == "unreachable" else per_vector)
    if layout == "offset":
        _compare(big, targets, 0.5, 1e-5, scoring=scoring, view=take)
    elif layout == "unreachable":  # a copy would be aligned: the loss sees one into such a buffer
        _compare(rows, targets, 0.5, 1e-5, scoring=scoring,
                 view=lambda x: _unreachable_boundary(x.shape, dtype).copy_(x))
    else:
        _compare(rows, targets, 0.5, 1e-5, scoring=scoring)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [1, 3, 8])
def test_gradient_in_place_stays_inside_its_rows(monkeypatch, dtype, pad):
    """Rows of a wider buffer (row stride V + pad: they start anywhere) overwritten by their
    gradient in place: it matches the reference's, and the padding between rows is never written."""
    from cggr.ops import reference, triton_backend

    monkeypatch.setattr(triton_backend, "launch_config", _fixed_block(16))
    vocab = 101
    logits, targets = make_batch((2, 12), vocab, dtype, seed=13)
    buffer = torch.full((2, 12, vocab + pad), 7.0, dtype=dtype)
    buffer[..., :vocab] = logits
    rows = buffer[..., :vocab]
    g = torch.Generator().manual_seed(14)
    lse = torch.logsumexp(logits.float(), -1).reshape(-1)
    coef = torch.rand(24, generator=g)
    mask = torch.rand(24, generator=g) < 0.6
    targets = targets.reshape(-1)
    opts = LossOptions(label_smoothing=0.1, z_loss=1e-3)
    expected = reference.logits_grad(logits, targets, lse, coef, mask, opts)
    triton_backend.logits_grad(rows, targets, lse, coef, mask, opts, out=rows)
    torch.testing.assert_close(rows, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert (buffer[..., vocab:] == 7.0).all()


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), levels=st.integers(1, 6), ratio=st.floats(0.01, 1.0), device_ratio=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), invalid=st.floats(0.0, 1.0), nan=st.booleans(),
       seed=st.integers(0, 999), chunk=st.sampled_from([None, 32]),
       selection=st.sampled_from(["topk", "random", "importance", "stratified", "sequence_aware"]),
       strata=st.integers(1, 6), seq_len=st.integers(1, 40), min_tokens=st.integers(0, 3))
def test_one_launch_selection_matches_the_pytorch_selection(n, levels, ratio, device_ratio, reduction, invalid, nan,
                                                            seed, chunk, selection, strata, seq_len, min_tokens):
    """On the same statistics (and the same generator) the one-program Triton selections and
    the PyTorch ones choose exactly the same rows, ties included, with the same weights, and
    reduce to the same loss; also when the selection walks the rows in several steps
    (``chunk``), carrying tie counts and running sums across them. ``sequence_aware`` over
    ``n // seq_len`` sequences, each keeping its ``min_tokens`` hardest rows."""
    from cggr.core import _select_and_reduce_rows
    from cggr.ops import triton_backend
    from cggr.scoring import RowStats

    seq_shape = None
    if selection == "sequence_aware":
        seq_len = min(seq_len, n)
        seq_shape, n = (n // seq_len, seq_len), n // seq_len * seq_len
    g = torch.Generator().manual_seed(seed)
    columns = torch.rand(n, len(RowStats._fields), generator=g)
    columns[:, 7] = torch.randint(0, levels, (n,), generator=g) / max(levels - 1, 1)  # scores with many ties
    valid = torch.rand(n, generator=g) >= invalid
    if nan:
        columns[torch.randint(0, n, (max(1, n // 10),), generator=g), 7:] = float("nan")
    columns[~valid] = 0.0
    stats = RowStats.from_columns(columns)
    spec = torch.tensor(ratio, dtype=torch.float64) if device_ratio else ratio
    config = triton_backend.launch_config if chunk is None else _fixed_block(chunk)
    with mock.patch.object(triton_backend, "launch_config", config):
        got = triton_backend.select(stats, valid, spec, LossOptions(
            selection=selection, reduction=reduction, num_strata=strata, min_tokens_per_sequence=min_tokens,
            generator=torch.Generator().manual_seed(seed)), seq_shape)
    want = _select_and_reduce_rows(stats, valid, spec, LossOptions(
        selection=selection, reduction=reduction, num_strata=strata, min_tokens_per_sequence=min_tokens,
        generator=torch.Generator().manual_seed(seed)), seq_shape)
    if got is None:  # stratified over more rows than one block: the PyTorch path
        assert selection == "stratified" and chunk is not None and n > chunk
        return
    assert torch.equal(got[0], want[0])  # mask
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6, equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), seq_len=st.integers(1, 45), levels=st.integers(1, 5), min_rows=st.integers(0, 50),
       invalid=st.floats(0.0, 1.0), nan=st.booleans(), seed=st.integers(0, 999), chunk=st.sampled_from([None, 16]))
def test_forced_rows_kernel_matches_pytorch(batch, seq_len, levels, min_rows, invalid, nan, seed, chunk):
    """``sequence_aware``'s forced rows from the one-launch kernel (a program a sequence, read
    from a strided score column, in steps of ``chunk`` rows) are the PyTorch ones: each
    sequence's ``min(m, its valid count)`` hardest valid rows, NaN hardest, ties to the lower
    row, none when m is 0."""
    from cggr.ops import triton_backend
    from cggr.selection import forced_rows

    g = torch.Generator().manual_seed(seed)
    n = batch * seq_len
    block = torch.rand(n, 9, generator=g)
    block[:, 7] = torch.randint(0, levels, (n,), generator=g) / max(levels - 1, 1)
    if nan:
        block[torch.randint(0, n, (max(1, n // 6),), generator=g), 7] = float("nan")
    valid = torch.rand(n, generator=g) >= invalid
    scores = block[:, 7]
    config = triton_backend.launch_config if chunk is None else _fixed_block(chunk)
    with mock.patch.object(triton_backend, "launch_config", config):
        got = triton_backend._forced_rows(scores, valid, (batch, seq_len), min_rows)
    want = forced_rows(scores, valid, (batch, seq_len), min_rows)
    assert torch.equal(got, want)
    per_sequence = torch.minimum(valid.view(batch, seq_len).sum(1), torch.tensor(min_rows))
    assert torch.equal(got.view(batch, seq_len).sum(1), per_sequence)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("ignore_index", [-100, 3, 7])
def test_bad_targets_counted_in_one_launch(dtype, ignore_index, monkeypatch):
    """The Triton target check counts what the PyTorch comparisons count (blocks of 16 over 3
    programs: several blocks each, the last one partial), and the loss refuses a bad target
    found by it with the usual message naming it."""
    from cggr.ops import triton_backend

    monkeypatch.setattr(triton_backend, "_CHECK_BLOCK", 16)
    monkeypatch.setattr(triton_backend, "_CHECK_PROGRAMS", 3)
    g = torch.Generator().manual_seed(21)
    vocab = 7
    targets = torch.randint(-2, vocab + 2, (101,), generator=g).to(dtype)
    targets[::5] = ignore_index
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    assert 0 < int(bad.sum()) < 101
    assert triton_backend.count_bad_targets(targets, vocab, ignore_index) == int(bad.sum())
    good = torch.where(bad, torch.zeros_like(targets), targets)
    assert triton_backend.count_bad_targets(good, vocab, ignore_index) == 0
    assert triton_backend.count_bad_targets(good[:0], vocab, ignore_index) == 0
    logits = torch.randn(101, vocab)
    cggr_cross_entropy(logits, good, 0.5, ignore_index=ignore_index, backend="triton")
    with pytest.raises(ValueError, match=f"found {int(targets[bad][0])}"):
        cggr_cross_entropy(logits, targets, 0.5, ignore_index=ignore_index, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [1.0, 2.5])
@pytest.mark.parametrize("programs", [None, 3])
def test_scaling_by_a_device_scalar(dtype, value, programs, monkeypatch):
    """mul_, scaled and add_mul_ of the Triton backend (a kernel over blocks, the last one partial;
    with ``programs``, fewer programs than blocks, each walking several) against the reference
    (scaled leaves its input as it was, a scale of 1 too); a strided tensor takes the PyTorch path."""
    from cggr.ops import reference, triton_backend

    if programs is not None:
        monkeypatch.setattr(triton_backend, "_scale_programs",
                            lambda n, out: min(-(-n // triton_backend._SCALE_BLOCK), programs))

    g = torch.Generator().manual_seed(12)
    scale = torch.tensor(value)
    x = torch.randn(3, 9000, generator=g).to(dtype)  # 7 blocks of 4096, the last partial
    out = torch.randn(3, 9000, generator=g).to(dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    for backend in (triton_backend, reference):
        torch.testing.assert_close(backend.mul_(x.clone(), scale), (value * x.float()).to(dtype), **tol)
        before = x.clone()
        torch.testing.assert_close(backend.scaled(x, scale), (value * x.float()).to(dtype), **tol)
        assert torch.equal(x, before)
        torch.testing.assert_close(backend.add_mul_(out.clone(), x, scale), (out + value * x.float()).to(dtype), **tol)
    strided = x.clone().t()
    torch.testing.assert_close(triton_backend.mul_(strided, scale), x.t() * value)


@pytest.mark.parametrize("programs", [None, 2])
def test_scaled_later_scales_several_tensors_in_one_launch(programs, monkeypatch):
    """``scaled_later`` of gradients of different sizes and dtypes, with a None among them: one
    launch (each program walking every tensor, with ``programs`` several blocks of each), the
    reference's result, the inputs untouched, and a second call (a second backward) new tensors."""
    from cggr.ops import launch as launch_module
    from cggr.ops import reference, triton_backend

    if programs is not None:
        monkeypatch.setattr(triton_backend, "_scale_programs",
                            lambda n, out: min(-(-n // triton_backend._SCALE_BLOCK), programs))
    g = torch.Generator().manual_seed(22)
    tensors = (torch.randn(3, 5000, generator=g).to(torch.bfloat16), None, torch.randn(9001, generator=g),
               torch.randn(7, generator=g).to(torch.bfloat16))
    before = [None if t is None else t.clone() for t in tensors]
    launches = []
    for module in (launch_module, triton_backend):  # prepared launches, then ordinary ones
        monkeypatch.setattr(module, "launch", lambda *a, real=module.launch, **k: (launches.append(a[0]),
                                                                                    real(*a, **k)))
    for value in (2.5, 1.0):
        scale = torch.tensor(value)
        want = reference.scaled_later(*tensors)(scale)
        scale_all = triton_backend.scaled_later(*tensors)
        outputs = []
        for call in range(2):
            launches.clear()
            got = scale_all(scale)
            assert launches == [triton_backend.scale_kernel]
            assert got[1] is None and len(got) == len(tensors)
            for a, b in zip(got, want):
                if b is not None:
                    assert a.dtype == b.dtype
                    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
            outputs.append(got)
        assert all(a is None or a.data_ptr() != b.data_ptr() for a, b in zip(*outputs))
        assert all(b is None and t is None or torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("n,ratio,strata", [(20, 0.25, 4), (4, 0.75, 4), (13, 0.5, 3), (50, 0.1, 5), (7, 1.0, 2),
                                            (16, 0.7, 8)])
def test_one_launch_stratified_shares_remainders_ties_and_caps(n, ratio, strata):
    """Cases where largest-remainder ties (to the harder stratum) and stratum caps decide the
    shares: the one-program stratified selection keeps what the PyTorch one keeps."""
    from cggr.core import _select_and_reduce_rows
    from cggr.ops import triton_backend
    from cggr.scoring import RowStats

    g = torch.Generator().manual_seed(n)
    columns = torch.rand(n, len(RowStats._fields), generator=g)
    stats = RowStats.from_columns(columns)
    valid = torch.ones(n, dtype=torch.bool)
    for seed in range(5):
        opts = LossOptions(selection="stratified", num_strata=strata, generator=torch.Generator().manual_seed(seed))
        got = triton_backend.select(stats, valid, ratio, opts)
        opts = LossOptions(selection="stratified", num_strata=strata, generator=torch.Generator().manual_seed(seed))
        want = _select_and_reduce_rows(stats, valid, ratio, opts, None)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[3], want[3])


@pytest.mark.parametrize("scoring", SCORINGS)
def test_statistics_without_the_entropy(monkeypatch, scoring):
    """Without a caller for the entropy (no info), the kernel may skip its sum: every other field
    is what the full statistics hold, and the entropy is 0 unless the scoring reads it."""
    from cggr.ops import triton_backend

    monkeypatch.setattr(triton_backend, "launch_config", _fixed_block(16))  # many blocks a row
    logits, targets = make_batch((2, 6), 101, torch.bfloat16, seed=21)
    logits[0, 1, :7] = float("-inf")
    valid = targets.reshape(-1) != -100
    opts = LossOptions(scoring=scoring)
    reference = torch.rand(12) if scoring == "excess" else None
    full = triton_backend.row_stats(logits, targets.reshape(-1), valid, opts, reference).columns()
    lean = triton_backend.row_stats(logits, targets.reshape(-1), valid, opts, reference, need_entropy=False).columns()
    entropy = RowStats._fields.index("entropy")
    others = [i for i in range(full.shape[1]) if i != entropy]
    torch.testing.assert_close(lean[:, others], full[:, others], rtol=1e-6, atol=1e-7)
    if scoring in ("entropy", "combined"):
        torch.testing.assert_close(lean[:, entropy], full[:, entropy])
    else:
        assert (lean[:, entropy] == 0).all() and (full[valid, entropy] > 0).all()
